"""Pod networks through the real CNI plugins: namespaces, bridge, host-local IPs, and cleanup.

Every test gets its own state dir, agent id, bridge and /24, and removes what it made (pods,
namespaces, the bridge link), so tests can run next to each other and next to a real agent.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from common.errors import InvalidArgument, RikletError
from services.manager.containerd.cni import NETNS_DIR, NetworkError, PodNet, PodNetworks
from tests.support import need

REAL_CNI = "/usr/lib/cni"
IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"

SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(8)
print("ready", flush=True)
while True:
    c, addr = s.accept()
    c.sendall(("hello from " + sys.argv[2] + " to " + addr[0]).encode())
    c.close()
"""

CLIENT = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as c:
    print(c.recv(100).decode())
"""


def _run(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=10).stdout


def _need_cni(cni_path: str = REAL_CNI) -> None:
    reason = PodNetworks("/nonexistent", "probe", cni_path=cni_path).available()
    need(reason is None, reason or "")


def _free_subnet() -> str:
    """A random /24 in 10.200-250/16 that no interface here is on (tests may run side by side)."""
    used = _run("ip", "-4", "-o", "addr")
    for _ in range(50):
        net = ipaddress.ip_network(f"10.{random.randint(200, 250)}.{random.randint(0, 255)}.0/24")
        if str(net.network_address)[:-1] not in used:
            return str(net)
    raise AssertionError("no free /24 in 10.200.0.0-10.250.255.0")


def _reservations(nets: PodNetworks) -> list[str]:
    """host-local's reservation files: one per leased IP, named by the IP."""
    path = os.path.join(nets.ipam_dir, nets.network_name)
    names = os.listdir(path) if os.path.isdir(path) else []
    return sorted(n for n in names if n[0].isdigit())


def _our_netns(nets: PodNetworks) -> list[str]:
    return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(f"riklet-{nets.agent_id}-"))


@dataclass
class Net:
    """One test's network: the PodNetworks under test plus what the finalizer must remove."""

    nets: PodNetworks
    bridge: str
    state_dir: str
    pods: set[str] = field(default_factory=set)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def again(self) -> PodNetworks:
        """A fresh PodNetworks over the same state: what a restarted manager builds."""
        return PodNetworks(self.state_dir, self.nets.agent_id, bridge=self.bridge, subnet=self.nets.subnet,
                           cni_path=self.nets.cni_path)

    def serve(self, pod: str, port: int) -> None:
        """A TCP server inside the pod's netns that greets each client; ready when this returns."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.nets.netns_name(pod), sys.executable, "-c",
                                 SERVER, str(port), pod], stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"


@pytest.fixture(scope="module", autouse=True)
def _restore_ip_forward() -> Iterator[None]:
    """The bridge plugin (isGateway) turns on IPv4 forwarding host-wide; put it back afterwards."""
    before = Path(IP_FORWARD).read_text() if os.access(IP_FORWARD, os.R_OK) else None
    yield
    if before is not None and os.geteuid() == 0 and Path(IP_FORWARD).read_text() != before:
        Path(IP_FORWARD).write_text(before)


def _make_net(tmp_path: Path, cni_path: str = REAL_CNI) -> Net:
    bridge = f"rkt{uuid.uuid4().hex[:8]}"
    state = str(tmp_path / "state")
    return Net(PodNetworks(state, uuid.uuid4().hex[:8], bridge=bridge, subnet=_free_subnet(),
                           cni_path=cni_path), bridge, state)


def _cleanup(net: Net) -> None:
    for proc in net.procs:
        proc.kill()
        proc.wait()
    real = PodNetworks(net.state_dir, net.nets.agent_id, bridge=net.bridge, subnet=net.nets.subnet)
    for pod in net.pods:
        with contextlib.suppress(RikletError):
            real.teardown(pod)
    for name in _our_netns(net.nets):
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)
    subprocess.run(["ip", "link", "del", net.bridge], capture_output=True, check=False)


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    _need_cni()
    n = _make_net(tmp_path)
    try:
        yield n
    finally:
        _cleanup(n)


def _setup(net: Net, pod: str, nets: PodNetworks | None = None) -> PodNet:
    net.pods.add(pod)
    return (nets or net.nets).setup(pod)


def test_setup_gives_an_ip_reachable_from_the_host(net: Net) -> None:
    pod = _setup(net, "web")
    assert ipaddress.ip_address(pod.ip) in ipaddress.ip_network(net.nets.subnet)
    assert pod.gateway == str(next(ipaddress.ip_network(net.nets.subnet).hosts()))
    assert pod.netns == f"{NETNS_DIR}/riklet-{net.nets.agent_id}-web" == net.nets.netns_path("web")
    assert os.path.exists(pod.netns)

    inside = ["ip", "netns", "exec", net.nets.netns_name("web")]
    addrs = _run(*inside, "ip", "-4", "-o", "addr")
    assert any(ln.split()[1] == "eth0" and f"inet {pod.ip}/24" in ln for ln in addrs.splitlines()), addrs
    lo = _run(*inside, "ip", "-o", "link", "show", "lo")
    assert ",UP" in lo, lo
    assert f"default via {pod.gateway} dev eth0" in _run(*inside, "ip", "-4", "route")

    net.serve("web", 8080)
    with socket.create_connection((pod.ip, 8080), timeout=5) as c:
        assert c.recv(100).decode().startswith("hello from web to ")


def test_two_pods_get_distinct_ips_and_reach_each_other(net: Net) -> None:
    a, b = _setup(net, "a"), _setup(net, "b")
    assert a.ip != b.ip
    net.serve("a", 9000)
    out = _run("ip", "netns", "exec", net.nets.netns_name("b"), sys.executable, "-c", CLIENT, a.ip, "9000")
    assert out.strip() == f"hello from a to {b.ip}"
    assert len(_reservations(net.nets)) == 2


def test_setup_is_idempotent_and_survives_a_manager_restart(net: Net) -> None:
    first = _setup(net, "web")
    leases = _reservations(net.nets)
    assert leases == [first.ip]
    assert net.nets.setup("web") == first
    assert _reservations(net.nets) == leases
    assert net.nets.lookup("web") == first
    assert net.nets.lookup("other") is None

    restarted = net.again()
    assert restarted.lookup("web") == first
    assert _setup(net, "web", restarted) == first
    assert _reservations(net.nets) == leases
    assert restarted.leaked() == {}


def test_setup_cleans_up_after_a_crash_or_reboot(net: Net) -> None:
    """A netns without a record (crash mid-setup) and a lease without a netns (reboot) do not block."""
    _setup(net, "web")
    os.remove(os.path.join(net.nets.pods_dir, "web.json"))
    assert net.nets.lookup("web") is None
    assert net.nets.leaked() == {"netns": [net.nets.netns_name("web")]}
    second = _setup(net, "web")
    assert _reservations(net.nets) == [second.ip]

    _run("ip", "netns", "delete", net.nets.netns_name("web"))   # as a reboot would
    assert net.nets.lookup("web") is None
    assert net.nets.leaked() == {"ips": [second.ip], "records": ["web"]}
    third = _setup(net, "web")   # host-local refuses a second lease for the same id until DEL
    assert _reservations(net.nets) == [third.ip]
    assert net.nets.leaked() == {}


def test_teardown_releases_everything(net: Net) -> None:
    nets = net.nets
    net.pods.add("cycle")
    ips, t_setup, t_teardown = set(), 0.0, 0.0
    for _ in range(50):
        t0 = time.perf_counter()
        ips.add(nets.setup("cycle").ip)
        t1 = time.perf_counter()
        nets.teardown("cycle")
        t2 = time.perf_counter()
        t_setup, t_teardown = t_setup + t1 - t0, t_teardown + t2 - t1
        assert not os.path.exists(nets.netns_path("cycle"))
    print(f"setup {t_setup * 20:.1f} ms, teardown {t_teardown * 20:.1f} ms (mean of 50)")
    assert _our_netns(nets) == []
    assert _reservations(nets) == []
    assert nets.leaked() == {}
    assert nets.lookup("cycle") is None
    nets.teardown("cycle")
    nets.teardown("never-set-up")
    assert nets.leaked() == {}


def test_concurrent_pods(net: Net) -> None:
    pods = [f"p{i}" for i in range(8)]
    net.pods.update(pods)
    results: dict[str, str] = {}
    failures: list[BaseException] = []

    def work(names: list[str]) -> None:
        try:
            for name in names:
                results[name] = net.nets.setup(name).ip
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(pods[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    assert len(set(results.values())) == len(pods)
    assert _reservations(net.nets) == sorted(results.values())

    def down(names: list[str]) -> None:
        try:
            for name in names:
                net.nets.teardown(name)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=down, args=(pods[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    assert _our_netns(net.nets) == [] and _reservations(net.nets) == [] and net.nets.leaked() == {}


@pytest.mark.parametrize(("subnet", "bridge", "field_name"), [
    ("nonsense", "riklet0", "network.subnet"),
    ("10.0.0.1/24", "riklet0", "network.subnet"),        # host bits set
    ("fd00::/64", "riklet0", "network.subnet"),
    ("10.0.0.0/31", "riklet0", "network.subnet"),        # no room for gateway and pod
    ("10.88.0.0/16", "sixteen-chars-xx", "network.bridge"),
    ("10.88.0.0/16", "bad name", "network.bridge"),
    ("10.88.0.0/16", "", "network.bridge"),
])
def test_bad_config_names_the_field(tmp_path: Path, subnet: str, bridge: str, field_name: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        PodNetworks(str(tmp_path), "agent", bridge=bridge, subnet=subnet)
    assert info.value.field == field_name


def test_bad_agent_and_pod_names(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument) as info:
        PodNetworks(str(tmp_path), "has-dash")
    assert info.value.field == "network.agent_id"
    nets = PodNetworks(str(tmp_path), "agent")
    for bad in ("../etc", "UPPER", "x" * 64):
        with pytest.raises(InvalidArgument):
            nets.setup(bad)


FAKE = """#!/bin/sh
cat >/dev/null
if [ "$CNI_COMMAND" = VERSION ]; then
    echo '{"cniVersion":"1.0.0","supportedVersions":["0.4.0","1.0.0"]}'
    exit 0
fi
echo '{"cniVersion":"1.0.0","code":100,"msg":"fake %s says no","details":"for testing"}'
exit 1
"""


@pytest.mark.parametrize("broken", ["bridge", "loopback"])
def test_a_failing_plugin_is_reported_and_undone(tmp_path: Path, broken: str) -> None:
    _need_cni()
    cni = tmp_path / "cni"
    cni.mkdir()
    for plugin in ("bridge", "host-local", "loopback"):
        if plugin == broken:
            (cni / plugin).write_text(FAKE % plugin)
            (cni / plugin).chmod(stat.S_IRWXU)
        else:
            (cni / plugin).symlink_to(f"{REAL_CNI}/{plugin}")
    n = _make_net(tmp_path, str(cni))
    try:
        with pytest.raises(NetworkError) as info:
            n.nets.setup("web")
        text = str(info.value)
        assert f"CNI plugin {broken} ADD" in text and f"fake {broken} says no (for testing)" in text, text
        assert info.value.field == "network"
        assert _our_netns(n.nets) == []
        assert _reservations(n.nets) == []       # a bridge ADD that worked was DELeted again
        assert n.nets.leaked() == {}
        assert n.nets.lookup("web") is None
    finally:
        _cleanup(n)


def test_available_says_what_is_missing(tmp_path: Path) -> None:
    reason = PodNetworks(str(tmp_path), "agent", cni_path=str(tmp_path)).available()
    assert reason is not None and "bridge, host-local, loopback" in reason
