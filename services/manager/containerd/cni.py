"""Pod networking for the containerd driver: one network namespace per pod, wired to a host bridge
by calling the CNI plugins (Debian's containernetworking-plugins) directly.

Why call the plugins ourselves rather than through libcni or nerdctl: the protocol is small (env
vars in, one JSON config on stdin, one JSON result on stdout) and this keeps riklet free of another
daemon or Go dependency.

Per pod, ``setup`` does, in this order:

    record (pending) -> ip netns add -> bridge ADD (veth + host-local IP) -> loopback ADD -> record (ip)

and ``teardown`` undoes it in reverse: loopback DEL, bridge DEL (releases the IP), ip netns delete,
remove the record. The pending record is written first so that a crash at any later point leaves
evidence that the next ``setup`` or ``teardown`` cleans up: host-local refuses a second ADD for the
same container id until it has been DELeted, so a lost reservation would otherwise block the pod.

Everything a pod needs for DEL derives from its name (container id = netns name, same config), so a
restarted manager can tear down pods it never set up itself. State lives under
``<state_dir>/cni``: ``pods/<pod>.json`` (our records) and ``ipam/<network>/`` (host-local's
reservations). Keep state_dir on disk: after a reboot the namespaces are gone but reservations are
not, and the records are how they get released.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import zlib
from dataclasses import dataclass
from typing import Any

from common import errors
from common.model import dns_label

log = logging.getLogger(__name__)

NETNS_DIR = "/var/run/netns"
PLUGINS = ("bridge", "host-local", "loopback")
TIMEOUT = 10.0
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_IFNAME = re.compile(r"[a-zA-Z0-9_.-]{1,15}")            # the kernel's IFNAMSIZ - 1
_NETWORK_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}")   # the CNI spec's rule, bounded
_AGENT_ID = re.compile(r"[a-zA-Z0-9_]{1,32}")   # no '-': "riklet-<agent>-<pod>" must split one way

# `ip netns add` makes /run/netns a shared mount the first time; two at once can stack two mounts.
_NETNS_LOCK = threading.Lock()


class NetworkError(errors.Unavailable):
    """A CNI plugin or `ip netns` failed: pod networking cannot be set up now (retry later)."""


@dataclass(frozen=True)
class PodNet:
    netns: str                # path, e.g. /var/run/netns/riklet-<agent>-<pod>
    ip: str                   # pod IPv4 address without prefix
    gateway: str | None


class PodNetworks:
    """The pods' networks of one agent: a bridge, a subnet and a netns per pod."""

    def __init__(self, state_dir: str, agent_id: str, bridge: str = "riklet0", subnet: str = "10.88.0.0/16",
                 cni_path: str = "/usr/lib/cni", network_name: str = "riklet") -> None:
        if not _AGENT_ID.fullmatch(agent_id):
            raise errors.InvalidArgument(
                f"{agent_id!r} is not an agent id (1-32 letters, digits or '_')", "network.agent_id")
        if not _IFNAME.fullmatch(bridge):
            raise errors.InvalidArgument(
                f"{bridge!r} is not an interface name (1-15 of letters, digits, '_', '.', '-')",
                "network.bridge")
        if not _NETWORK_NAME.fullmatch(network_name):
            raise errors.InvalidArgument(f"{network_name!r} is not a CNI network name", "network.name")
        try:
            net = ipaddress.ip_network(subnet)
        except ValueError as exc:
            raise errors.InvalidArgument(f"{subnet!r} is not a subnet: {exc}", "network.subnet") from None
        if net.version != 4 or net.prefixlen > 30:
            # a /31 or /32 has no room for the bridge's gateway address and a pod
            raise errors.InvalidArgument(f"{subnet!r} must be an IPv4 subnet of /30 or larger",
                                         "network.subnet")
        self.state_dir = state_dir
        self.agent_id = agent_id
        self.bridge = bridge
        self.subnet = str(net)
        self.cni_path = cni_path
        self.network_name = network_name
        self.ipam_dir = os.path.join(state_dir, "cni", "ipam")
        self.pods_dir = os.path.join(state_dir, "cni", "pods")
        self._prefix = f"riklet-{agent_id}-"
        self._version: str | None = None
        self._version_lock = threading.Lock()
        # Striped locks: one pod's setup/teardown are serialised, different pods run in parallel.
        self._locks = [threading.Lock() for _ in range(32)]

    # -- queries ---------------------------------------------------------------------------------

    def available(self) -> str | None:
        """None when pods can get networks here; else why not (so the driver can say so up front)."""
        reasons = []
        if os.geteuid() != 0:
            reasons.append("pod networking needs root")
        if shutil.which("ip", path=_PATH) is None:
            reasons.append("`ip` (iproute2) not found")
        missing = [p for p in PLUGINS if not os.access(os.path.join(self.cni_path, p), os.X_OK)]
        if missing:
            reasons.append(f"CNI plugins missing in {self.cni_path}: {', '.join(missing)}"
                           " (install containernetworking-plugins)")
        return "; ".join(reasons) or None

    def netns_name(self, pod: str) -> str:
        return f"{self._prefix}{pod}"

    def netns_path(self, pod: str) -> str:
        return os.path.join(NETNS_DIR, self.netns_name(pod))

    def lookup(self, pod: str) -> PodNet | None:
        """What ``setup`` returned for ``pod``, from its record; None unless both it and the netns exist."""
        record = self._read_record(pod)
        if record is None or not isinstance(record.get("ip"), str) or not os.path.exists(record["netns"]):
            return None
        gateway = record.get("gateway")
        return PodNet(record["netns"], record["ip"], gateway if isinstance(gateway, str) else None)

    def leaked(self) -> dict[str, list[str]]:
        """What this agent holds with nothing to account for it, by kind; {} when all is clean.

        ``netns``: namespaces named for this agent with no record; ``ips``: host-local reservations
        whose namespace is gone; ``records``: records whose namespace is gone. Pods mid-setup show
        up briefly, so ask when nothing is in flight.
        """
        out: dict[str, list[str]] = {}
        records = {name[:-5] for name in _listdir(self.pods_dir) if name.endswith(".json")}
        netns = [n for n in _listdir(NETNS_DIR)
                 if n.startswith(self._prefix) and n[len(self._prefix):] not in records]
        if netns:
            out["netns"] = sorted(netns)
        ips = []
        reservations = os.path.join(self.ipam_dir, self.network_name)
        for name in _listdir(reservations):
            try:
                ipaddress.ip_address(name)   # the other files are host-local's lock and cursor
                with open(os.path.join(reservations, name)) as f:
                    owner = f.read().splitlines()[0].strip()
            except (ValueError, OSError, IndexError):
                continue
            if not os.path.exists(os.path.join(NETNS_DIR, owner)):
                ips.append(name)
        if ips:
            out["ips"] = sorted(ips)
        stale = [pod for pod in records if not os.path.exists(self.netns_path(pod))]
        if stale:
            out["records"] = sorted(stale)
        return out

    # -- changes ---------------------------------------------------------------------------------

    def setup(self, pod: str) -> PodNet:
        """Give ``pod`` a netns with eth0 on the bridge and lo up; idempotent.

        If the pod already has a netns and a recorded IP (e.g. the manager restarted), that is
        returned as is. Leftovers of a half-done setup or teardown are cleaned first. On failure,
        everything done here is undone and NetworkError raised.
        """
        dns_label(pod, "pod")
        with self._lock(pod):
            known = self.lookup(pod)
            if known is not None:
                return known
            if os.path.exists(self.netns_path(pod)) or os.path.exists(self._record_path(pod)):
                log.info("cleaning up a previous network before setup", extra={"pod": pod})
                self._teardown(pod)
            netns = self.netns_path(pod)
            bridge, loopback = self._bridge_config(), self._loopback_config()   # asks VERSION first
            self._write_record(pod, {"netns": netns, "ip": None, "gateway": None})
            try:
                self._ip_netns("add", pod)
                result = self._plugin("bridge", "ADD", pod, "eth0", bridge)
                self._plugin("loopback", "ADD", pod, "lo", loopback)
                ip, gateway = _ipv4_of(result)
                net = PodNet(netns=netns, ip=ip, gateway=gateway)
                self._write_record(pod, {"netns": netns, "ip": ip, "gateway": gateway})
            except BaseException:
                self._undo(pod)
                raise
            return net

    def teardown(self, pod: str) -> None:
        """Release ``pod``'s IP and delete its netns and record; what is already gone is skipped.

        A plugin's DEL failing raises NetworkError and leaves the netns and record in place, so a
        later teardown (or setup) retries the whole thing.
        """
        dns_label(pod, "pod")
        with self._lock(pod):
            self._teardown(pod)

    # -- internals -------------------------------------------------------------------------------

    def _teardown(self, pod: str) -> None:
        # Reverse order of ADD, as the CNI spec asks. DEL of something gone succeeds (plugins must
        # tolerate it), including when the netns itself is gone: bridge DEL still frees the IP.
        self._plugin("loopback", "DEL", pod, "lo", self._loopback_config())
        self._plugin("bridge", "DEL", pod, "eth0", self._bridge_config())
        if os.path.exists(self.netns_path(pod)):
            self._ip_netns("delete", pod)
        _remove(self._record_path(pod))

    def _undo(self, pod: str) -> None:
        """Best effort after a failed setup: every step is tried, whatever the others did."""
        for plugin, ifname, config in (("loopback", "lo", self._loopback_config),
                                       ("bridge", "eth0", self._bridge_config)):
            try:
                self._plugin(plugin, "DEL", pod, ifname, config())
            except errors.RikletError as exc:
                log.warning("undoing a failed setup", extra={"pod": pod, "error": str(exc)})
        try:
            if os.path.exists(self.netns_path(pod)):
                self._ip_netns("delete", pod)
        except errors.RikletError as exc:
            log.warning("undoing a failed setup", extra={"pod": pod, "error": str(exc)})
        _remove(self._record_path(pod))

    def _lock(self, pod: str) -> threading.Lock:
        return self._locks[zlib.crc32(pod.encode()) % len(self._locks)]

    def _cni_version(self) -> str:
        """1.0.0 when every plugin we call speaks it (Debian 12's do), else 0.4.0; asked once."""
        with self._version_lock:
            if self._version is None:
                versions = [set(self._exec(p, "VERSION", {"CNI_COMMAND": "VERSION"}, {}).get(
                    "supportedVersions", [])) for p in PLUGINS]
                self._version = "1.0.0" if all("1.0.0" in v for v in versions) else "0.4.0"
            return self._version

    def _bridge_config(self) -> dict[str, Any]:
        return {
            "cniVersion": self._cni_version(),
            "name": self.network_name,
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": True,    # the bridge gets the subnet's first address; pods route through it
            "ipMasq": False,      # no iptables rules: pods reach the host and each other only
            "hairpinMode": True,  # a pod can reach itself through a service address
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": self.subnet}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": self.ipam_dir,
            },
        }

    def _loopback_config(self) -> dict[str, Any]:
        return {"cniVersion": self._cni_version(), "name": self.network_name, "type": "loopback"}

    def _plugin(self, plugin: str, command: str, pod: str, ifname: str,
                config: dict[str, Any]) -> dict[str, Any]:
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": self.netns_name(pod),
               "CNI_NETNS": self.netns_path(pod), "CNI_IFNAME": ifname, "CNI_PATH": self.cni_path}
        return self._exec(plugin, f"{command} {ifname} for pod {pod}", env, config)

    def _exec(self, plugin: str, what: str, env: dict[str, str], config: dict[str, Any]) -> dict[str, Any]:
        """Run one plugin; its JSON result, or NetworkError naming the plugin and carrying its msg."""
        path = os.path.join(self.cni_path, plugin)
        try:
            proc = subprocess.run([path], input=json.dumps(config).encode(), capture_output=True,
                                  env={"PATH": _PATH, **env}, timeout=TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise NetworkError(f"CNI plugin {plugin} {what}: no answer in {TIMEOUT:g}s", "network") from None
        except OSError as exc:
            raise NetworkError(f"CNI plugin {plugin} {what}: cannot run {path}: {exc}", "network") from None
        try:
            out = json.loads(proc.stdout) if proc.stdout.strip() else {}
        except ValueError:
            out = None
        if proc.returncode != 0 or not isinstance(out, dict):
            raise NetworkError(f"CNI plugin {plugin} {what} failed: {_error_text(out, proc)}", "network")
        return out

    def _ip_netns(self, action: str, pod: str) -> None:
        with _NETNS_LOCK:
            try:
                proc = subprocess.run(["ip", "netns", action, self.netns_name(pod)], capture_output=True,
                                      env={"PATH": _PATH}, timeout=TIMEOUT, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise NetworkError(f"ip netns {action} for pod {pod}: {exc}", "network") from None
        if proc.returncode != 0:
            msg = proc.stderr.decode(errors="replace").strip() or f"exit status {proc.returncode}"
            raise NetworkError(f"ip netns {action} for pod {pod} failed: {msg}", "network")

    def _record_path(self, pod: str) -> str:
        return os.path.join(self.pods_dir, f"{pod}.json")

    def _read_record(self, pod: str) -> dict[str, Any] | None:
        try:
            with open(self._record_path(pod)) as f:
                record = json.load(f)
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and isinstance(record.get("netns"), str) else None

    def _write_record(self, pod: str, record: dict[str, Any]) -> None:
        """Atomically (temp file + rename): a reader or a crash never sees half a record."""
        os.makedirs(self.pods_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.pods_dir, prefix=f".{pod}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._record_path(pod))
        except BaseException:
            _remove(tmp)
            raise


def _ipv4_of(result: dict[str, Any]) -> tuple[str, str | None]:
    for entry in result.get("ips") or []:
        try:
            iface = ipaddress.ip_interface(str(entry.get("address")))
        except ValueError:
            continue
        if iface.version == 4:
            gateway = entry.get("gateway")
            return str(iface.ip), str(gateway) if gateway else None
    raise NetworkError(f"CNI plugin bridge returned no IPv4 address: {result.get('ips')!r}", "network")


def _error_text(out: dict[str, Any] | None, proc: subprocess.CompletedProcess[bytes]) -> str:
    if out and out.get("msg"):
        text = str(out["msg"])
        if out.get("details"):
            text += f" ({out['details']})"
        return f"{text} [code {out.get('code')}]" if out.get("code") is not None else text
    raw = (proc.stderr or proc.stdout).decode(errors="replace").strip()
    return raw[-500:] or f"exit status {proc.returncode} with no output"


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
