"""riklet's configuration: defaults < CHaS file < riklet's YAML file < environment < flags.

Every setting is declared once in :data:`SETTINGS` with its YAML key, environment variable,
flag and parser. The CHaS Node Agent's file (``/etc/chas/node-agent.yaml``, seed 003) is read
too, its keys mapped onto the same settings by :data:`CHAS_KEYS`. An unknown YAML key or a
value that does not parse is an error naming the file (or variable, or flag) and the key.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from common import paths
from common.errors import InvalidArgument
from common.units import parse_duration, parse_memory


def _str(value: object, field: str) -> str:
    if not isinstance(value, (str, int)) or isinstance(value, bool) or str(value) == "":
        raise InvalidArgument("expected a non-empty string", field)
    return str(value)


def _address(value: object, field: str) -> str:
    text = _str(value, field)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"expected HOST:PORT, got {text!r}", field)
    return text


def _level(value: object, field: str) -> str:
    text = _str(value, field).upper()
    if text not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise InvalidArgument(f"unknown log level {value!r}", field)
    return text


def _runtime(value: object, field: str) -> str:
    text = _str(value, field)
    if text not in {"process", "containerd"}:
        raise InvalidArgument(f"unknown runtime {text!r} (process, containerd)", field)
    return text


def _socket_path(value: object, field: str) -> str:
    text = _str(value, field)
    if text.startswith("unix://"):
        text = text[len("unix://"):]
    if not text.startswith("/"):
        raise InvalidArgument(f"expected an absolute unix socket path, got {text!r}", field)
    return text


def _subnet(value: object, field: str) -> str:
    try:
        net = ipaddress.ip_network(_str(value, field), strict=True)
    except ValueError as exc:
        raise InvalidArgument(f"expected an IPv4 subnet like 10.88.0.0/16: {exc}", field) from exc
    if net.version != 4 or net.prefixlen > 28:
        raise InvalidArgument("expected an IPv4 subnet of at least 16 addresses", field)
    return str(net)


def _name(value: object, field: str) -> str:
    text = _str(value, field)
    if not all(ch.isalnum() or ch in "._-" for ch in text) or len(text) > 15:
        raise InvalidArgument("expected at most 15 letters, digits, '.', '_' or '-'", field)
    return text


def _hosts(value: object, field: str) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise InvalidArgument("expected a list of registry hosts (HOST or HOST:PORT)", field)
    hosts = tuple(i.strip() for i in items if i.strip())
    for h in hosts:
        if "/" in h or " " in h:
            raise InvalidArgument(f"expected HOST or HOST:PORT, got {h!r}", field)
    return hosts


def _url(value: object, field: str) -> str | None:
    if value in (None, ""):
        return None
    text = _str(value, field).rstrip("/")
    scheme, sep, rest = text.partition("://")
    if scheme not in ("http", "https") or not sep or not rest or " " in rest:
        raise InvalidArgument(f"expected an http:// or https:// URL, got {text!r}", field)
    return text


def _port(value: object, field: str) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 65536:
        raise InvalidArgument("expected a port number (0 to 65535; 0 turns the listener off)", field)
    return value


def _port_range(value: object, field: str) -> tuple[int, int]:
    text = _str(value, field)
    lo, sep, hi = text.partition("-")
    if not sep or not lo.isdigit() or not hi.isdigit() or not 0 < int(lo) <= int(hi) < 65536:
        raise InvalidArgument(f"expected LOW-HIGH within 1-65535, got {text!r}", field)
    return int(lo), int(hi)


def _bool(value: object, field: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise InvalidArgument("expected true or false", field)


def _optional_path(value: object, field: str) -> str | None:
    return None if value in (None, "") else os.path.abspath(_str(value, field))


def _optional_cpu(value: object, field: str) -> int | None:
    from common.units import parse_cpu
    return None if value in (None, "") else parse_cpu(value, field)


def _optional_memory(value: object, field: str) -> int | None:
    return None if value in (None, "") else parse_memory(value, field)


def _path_prefixes(value: object, field: str) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
        raise InvalidArgument("expected a list of absolute paths", field)
    paths = tuple(os.path.normpath(i.strip()) for i in items if i.strip())
    for path in paths:
        if not path.startswith("/") or "\0" in path:
            raise InvalidArgument(f"expected absolute paths, got {path!r}", field)
    return paths


def _user(value: object, field: str) -> tuple[int, int]:
    text = _str(value, field)
    uid, _, gid = text.partition(":")
    if not uid.isdigit() or (gid and not gid.isdigit()):
        raise InvalidArgument(f"expected UID or UID:GID (numbers), got {text!r}", field)
    return int(uid), int(gid or uid)


def _host_ip(value: object, field: str) -> str:
    return _ip(value, field)


def _primary_ip() -> str:
    """The address other machines reach this node at: the source of the default route."""
    import contextlib
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent, only a route is chosen
        return str(s.getsockname()[0])
    return "127.0.0.1"


def _count(value: object, field: str) -> int:
    if isinstance(value, str) and value.isdigit():  # from a flag or the environment
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgument("expected a positive integer", field)
    return value


def _count_or_zero(value: object, field: str) -> int:
    return 0 if value in (0, "0") else _count(value, field)


def _duration_or_zero(value: object, field: str) -> float:
    secs = parse_duration(value, field)
    if secs < 0:
        raise InvalidArgument("must not be negative", field)
    return secs


def _ip(value: object, field: str) -> str:
    # An IP literal only: the proxy opens listeners on its data path, which must never resolve.
    try:
        return str(ipaddress.ip_address(_str(value, field)))
    except ValueError as exc:
        raise InvalidArgument(f"expected an IP address, got {value!r}", field) from exc


def _positive(value: object, field: str) -> float:
    secs = parse_duration(value, field)
    if secs <= 0:
        raise InvalidArgument("must be more than zero", field)
    return secs


def _positive_duration(value: object, field: str) -> float:
    secs = parse_duration(value, field)
    if secs <= 0:
        raise InvalidArgument("must be a positive duration", field)
    return secs


def _optional_address(value: object, field: str) -> str | None:
    return None if value in (None, "") else _address(value, field)


def _resolution(value: object, field: str) -> float:
    secs = parse_duration(value, field)
    if not 0.05 <= secs <= 3600:
        raise InvalidArgument("expected between 50ms and 1h", field)
    return secs


def _proxy_mode(value: object, field: str) -> str:
    text = _str(value, field).lower()
    if text not in ("auto", "kernel", "userspace"):
        raise InvalidArgument(f"unknown proxy mode {value!r} (auto, kernel, userspace)", field)
    return text


def _path(value: object, field: str) -> str:
    return os.path.abspath(_str(value, field))


@dataclass(frozen=True)
class Setting:
    key: str                      # dotted YAML key, also the attribute name with '.' -> '_'
    parse: Callable[[object, str], Any]
    default: Callable[[], Any]
    env: str | None = None
    flag: str | None = None
    help: str = ""

    @property
    def attr(self) -> str:
        return self.key.replace(".", "_")


SETTINGS: tuple[Setting, ...] = (
    Setting("paths.run_dir", _path, paths.default_run_dir, "RIKLET_RUN_DIR", "--run-dir",
            "IPC sockets (created 0700)"),
    Setting("paths.state_dir", _path, paths.default_state_dir, "RIKLET_STATE_DIR", "--state-dir",
            "database, logs, shim records"),
    Setting("node.id", _str, socket.gethostname, "NODE_ID", "--node-id", "this node's id"),
    Setting("api.address", _address, lambda: "127.0.0.1:9091", "RIKLET_API_ADDRESS",
            "--api-address", "Node API (gRPC) listen address"),
    Setting("api.max_streams", _count, lambda: 64, None, None,
            "streaming calls (watch, logs -f, image pull/import) the Node API serves at once"),
    Setting("api.max_streams_per_client", _count, lambda: 32, None, None,
            "streaming calls one client (one host) may hold open at once"),
    Setting("metrics.address", _address, lambda: "127.0.0.1:9092", "RIKLET_METRICS_ADDRESS",
            "--metrics-address", "Prometheus /metrics listen address"),
    Setting("logging.level", _level, lambda: "INFO", "LOG_LEVEL", "--log-level", "log level"),
    Setting("runtime.default", _runtime, lambda: "process", "RIKLET_RUNTIME", "--runtime",
            "runtime for containers that do not say"),
    Setting("runtime.stop_grace_period", parse_duration, lambda: 10.0, None, None,
            "SIGTERM to SIGKILL delay when a pod does not set one"),
    Setting("reconcile.resync_interval", _positive_duration, lambda: 30.0, "RIKLET_RESYNC_INTERVAL",
            "--resync-interval", "every pod is observed once per this long, spread evenly (a "
            "safety net: changes reach the manager as events)"),
    Setting("containerd.address", _socket_path, lambda: "/run/containerd/containerd.sock",
            "CONTAINERD_SOCKET", "--containerd-socket", "containerd's gRPC socket"),
    Setting("containerd.namespace", _name, lambda: "riklet", "RIKLET_CONTAINERD_NAMESPACE", None,
            "containerd namespace the agent's containers and images live in"),
    Setting("containerd.snapshotter", _name, lambda: "overlayfs", "RIKLET_SNAPSHOTTER", None,
            "containerd snapshotter for container filesystems"),
    Setting("containerd.insecure_registries", _hosts, lambda: (), "RIKLET_INSECURE_REGISTRIES", None,
            "registries pulled from over plain HTTP (comma-separated HOST:PORT)"),
    Setting("network.bridge", _name, lambda: "riklet0", "RIKLET_BRIDGE", None,
            "bridge the pods' interfaces are attached to"),
    Setting("network.subnet", _subnet, lambda: "10.88.0.0/16", "RIKLET_POD_SUBNET", "--pod-subnet",
            "pod IP addresses are taken from this subnet"),
    Setting("network.cni_path", _path, lambda: "/usr/lib/cni", "CNI_PATH", None,
            "directory of the CNI plugins (bridge, host-local, loopback)"),
    Setting("chas.api_url", _url, lambda: None, "CHAS_API_URL", "--chas-url",
            "the CHaS API server to register with and report health to; unset: no reports"),
    Setting("chas.token_file", _optional_path, lambda: None, "CHAS_API_TOKEN_FILE", None,
            "bearer token sent to the CHaS API server (a file holding it), if it wants one"),
    Setting("chas.port", _port, lambda: 9090, "NODE_PORT", "--node-port",
            "port of the CHaS HTTP API (0: off)"),
    Setting("chas.bind_address", _host_ip, lambda: "127.0.0.1", "RIKLET_CHAS_BIND_ADDRESS", None,
            "address the CHaS HTTP API listens on"),
    Setting("chas.health_interval", _positive, lambda: 30.0, "HEALTH_INTERVAL", "--health-interval",
            "seconds between health reports to the CHaS API server"),
    Setting("chas.host_ports", _port_range, lambda: "30000-32767", "RIKLET_HOST_PORTS", None,
            "host ports the agent picks from when a deploy request gives none"),
    Setting("chas.max_connections", _count, lambda: 128, None, None,
            "connections the CHaS HTTP API holds at once; the oldest idle one is closed for a new one"),
    Setting("chas.header_timeout", _positive, lambda: 10.0, None, None,
            "a connection must send a request's headers within this long (else it is closed)"),
    Setting("node.hostname", _str, socket.gethostname, None, None, "hostname reported to CHaS"),
    Setting("node.ip_address", _host_ip, _primary_ip, "NODE_IP", None,
            "address reported to CHaS (default: the source address of the default route)"),
    Setting("auth.token_file", _optional_path, lambda: None, "RIKLET_TOKEN_FILE", "--token-file",
            "bearer token both APIs require (default <state_dir>/api-token; made 0600 when absent)"),
    Setting("tls.cert_file", _optional_path, lambda: None, "RIKLET_TLS_CERT", "--tls-cert",
            "certificate (PEM) both APIs serve; with tls.key_file turns TLS on"),
    Setting("tls.key_file", _optional_path, lambda: None, "RIKLET_TLS_KEY", "--tls-key", "its key (PEM)"),
    Setting("tls.ca_file", _optional_path, lambda: None, "RIKLET_TLS_CA", "--tls-ca",
            "CA (PEM) client certificates must be signed by: turns on mutual TLS"),
    Setting("security.insecure", _bool, lambda: False, "RIKLET_INSECURE", "--insecure",
            "allow listening on a non-loopback address without TLS"),
    Setting("policy.allowed_registries", _hosts, lambda: (), "RIKLET_ALLOWED_REGISTRIES", None,
            "registries images may come from (HOST[:PORT]; empty: any)"),
    Setting("policy.max_cpu", _optional_cpu, lambda: None, None, None, "most CPU a pod may ask for"),
    Setting("policy.max_memory", _optional_memory, lambda: None, None, None,
            "most memory a pod may ask for"),
    Setting("policy.host_ports", _port_range, lambda: "1-65535", None, None,
            "host ports a pod may ask for"),
    Setting("policy.allow_host_network", _bool, lambda: False, None, None,
            "whether pods may use hostNetwork"),
    Setting("volumes.host_path_prefixes", _path_prefixes, lambda: (), "RIKLET_HOST_PATH_PREFIXES", None,
            "host directories hostPath volumes may name (comma-separated absolute paths; empty: "
            "no hostPath volume)"),
    Setting("volumes.size_check_interval", _positive_duration, lambda: 10.0, None, None,
            "how often disk emptyDirs with a sizeLimit are measured (a pod over its limit is evicted)"),
    Setting("runtime.user", _user, lambda: "65534:65534", "RIKLET_WORKLOAD_USER", None,
            "UID[:GID] workloads run as unless their image names a user (0: root)"),
    Setting("monitoring.metrics_enabled", _bool, lambda: True, None, None,
            "serve Prometheus metrics"),
    Setting("logging.file", _optional_path, lambda: None, None, None,
            "also append the services' JSON log lines to this file"),
    Setting("restart.backoff_initial", parse_duration, lambda: 1.0, None, None,
            "first restart delay of a crashing container"),
    Setting("restart.backoff_max", parse_duration, lambda: 300.0, None, None,
            "longest restart delay"),
    Setting("restart.backoff_reset", parse_duration, lambda: 600.0, None, None,
            "running this long resets the back-off"),
    Setting("logs.max_size", parse_memory, lambda: 10 * 1024 * 1024, None, None,
            "rotate a container log at this size"),
    Setting("logs.max_files", _count, lambda: 3, None, None, "rotated files kept per container"),
    Setting("scheduler.address", _optional_address, lambda: None, "RIKLET_SCHEDULER", "--scheduler",
            "a RIK scheduler's HOST:PORT; unset, the agent runs stand-alone"),
    Setting("monitoring.metric_resolution", _resolution, lambda: 5.0, "RIKLET_METRIC_RESOLUTION",
            "--metric-resolution", "how often metrics are pushed to the scheduler (5s, 500ms, 1m)"),
    Setting("proxy.mode", _proxy_mode, lambda: "auto", "RIKLET_PROXY_MODE", "--proxy-mode",
            "kernel (nftables DNAT), userspace (the proxy forwards), or auto: kernel where nftables "
            "works and the proxy has CAP_NET_ADMIN"),
    Setting("proxy.health_interval", _positive, lambda: 2.0, None, None,
            "kernel mode: how often each endpoint of a port with several is probed (TCP connect)"),
    Setting("proxy.health_timeout", _positive, lambda: 1.0, None, None,
            "kernel mode: a probe not connected within this long fails"),
    Setting("proxy.health_fall", _count, lambda: 2, None, None,
            "kernel mode: failed probes in a row that take an endpoint out of the kernel's maps"),
    Setting("proxy.health_rise", _count, lambda: 1, None, None,
            "kernel mode: passed probes in a row that put it back"),
    Setting("proxy.bind_address", _ip, lambda: "0.0.0.0", "RIKLET_PROXY_BIND_ADDRESS",
            "--bind-address", "address the host ports listen on"),
    Setting("proxy.connect_timeout", _positive, lambda: 3.0, None, "--connect-timeout",
            "wait for an endpoint this long before trying the next one"),
    Setting("proxy.udp_max_flows", _count, lambda: 4096, None, "--udp-max-flows",
            "UDP flows kept per route; the least recently used is evicted"),
    Setting("proxy.udp_idle_timeout", _positive, lambda: 60.0, None, "--udp-idle-timeout",
            "an idle UDP flow is closed after this long"),
    Setting("proxy.max_connections", _count_or_zero, lambda: 4096, None, "--max-connections",
            "TCP clients per host port; more are reset at once (0: no limit)"),
    Setting("proxy.idle_timeout", _duration_or_zero, lambda: 3600.0, None, "--idle-timeout",
            "a TCP connection with no byte either way for this long is closed (0: never)"),
)

_BY_KEY = {s.key: s for s in SETTINGS}


@dataclass(frozen=True)
class Config:
    paths_run_dir: str
    paths_state_dir: str
    node_id: str
    api_address: str
    api_max_streams: int
    api_max_streams_per_client: int
    metrics_address: str
    logging_level: str
    runtime_default: str
    runtime_stop_grace_period: float
    reconcile_resync_interval: float
    containerd_address: str
    containerd_namespace: str
    containerd_snapshotter: str
    containerd_insecure_registries: tuple[str, ...]
    network_bridge: str
    network_subnet: str
    network_cni_path: str
    chas_api_url: str | None
    chas_token_file: str | None
    chas_port: int
    chas_bind_address: str
    chas_health_interval: float
    chas_host_ports: tuple[int, int]
    chas_max_connections: int
    chas_header_timeout: float
    node_hostname: str
    node_ip_address: str
    auth_token_file: str | None
    tls_cert_file: str | None
    tls_key_file: str | None
    tls_ca_file: str | None
    security_insecure: bool
    policy_allowed_registries: tuple[str, ...]
    policy_max_cpu: int | None
    policy_max_memory: int | None
    policy_host_ports: tuple[int, int]
    policy_allow_host_network: bool
    runtime_user: tuple[int, int]
    volumes_host_path_prefixes: tuple[str, ...]
    volumes_size_check_interval: float
    monitoring_metrics_enabled: bool
    logging_file: str | None
    restart_backoff_initial: float
    restart_backoff_max: float
    restart_backoff_reset: float
    logs_max_size: int
    logs_max_files: int
    scheduler_address: str | None
    monitoring_metric_resolution: float
    proxy_mode: str
    proxy_health_interval: float
    proxy_health_timeout: float
    proxy_health_fall: int
    proxy_health_rise: int
    proxy_bind_address: str
    proxy_connect_timeout: float
    proxy_udp_max_flows: int
    proxy_udp_idle_timeout: float
    proxy_max_connections: int
    proxy_idle_timeout: float
    sources: Mapping[str, str]     # key -> where its value came from

    @property
    def agent_id(self) -> str:
        """8 hex digits naming this agent's own things on a shared node (its cgroups, its
        nftables table): agents side by side on one machine never share one."""
        return hashlib.sha256(os.path.abspath(self.paths_state_dir).encode()).hexdigest()[:8]

    # IPC endpoints, all in the run directory.
    @property
    def token_path(self) -> str:
        return self.auth_token_file or os.path.join(self.paths_state_dir, "api-token")

    @property
    def manager_endpoint(self) -> str:
        return f"ipc://{self.paths_run_dir}/manager.sock"

    @property
    def memory_endpoint(self) -> str:
        return f"ipc://{self.paths_run_dir}/memory.sock"

    @property
    def memory_events_endpoint(self) -> str:
        return f"ipc://{self.paths_run_dir}/memory-events.sock"

    @property
    def monitor_endpoint(self) -> str:
        return f"ipc://{self.paths_run_dir}/monitor.sock"

    @property
    def proxy_endpoint(self) -> str:
        return f"ipc://{self.paths_run_dir}/proxy.sock"


# The CHaS Node Agent's configuration file (seed 003, "Configuration"): read alongside riklet's
# own, its keys mapped onto riklet's settings. Precedence: defaults < CHaS file < riklet's file
# < environment < flags.
CHAS_CONFIG_PATH = "/etc/chas/node-agent.yaml"   # read when it exists; CHAS_CONFIG / --chas-config
CHAS_KEYS: Mapping[str, str] = {                  # CHaS key -> riklet setting
    "api.chas_url": "chas.api_url",
    "api.port": "chas.port",
    "node.id": "node.id",
    "node.hostname": "node.hostname",
    "containerd.socket": "containerd.address",
    "containerd.namespace": "containerd.namespace",
    "monitoring.health_interval": "chas.health_interval",
    "monitoring.metrics_enabled": "monitoring.metrics_enabled",
    "logging.level": "logging.level",
    "logging.file": "logging.file",
}
if not set(CHAS_KEYS.values()) <= set(_BY_KEY):
    raise RuntimeError(f"CHAS_KEYS names settings SETTINGS lacks: {set(CHAS_KEYS.values()) - set(_BY_KEY)}")
_CHAS_BY_SETTING = {v: k for k, v in CHAS_KEYS.items()}

# Settings whose value `riklet config show` never prints (none yet: the token *file* is a path).
SECRET_KEYS: frozenset[str] = frozenset()


def _flatten(data: Mapping[str, Any], prefix: str, source: str,
             known: Mapping[str, Any] = _BY_KEY) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, key + ".", source, known))
        elif key in known:
            out[key] = value
        else:
            raise InvalidArgument(f"unknown configuration key in {source}", key)
    return out


def _read_mapping(path: str, field: str) -> Mapping[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise InvalidArgument(f"cannot read configuration file {path}: {exc.strerror}", field) from exc
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"{path} is not valid YAML: {exc}", field) from exc
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise InvalidArgument(f"{path} must hold a mapping at the top level", field)
    return data


def read_yaml(path: str) -> dict[str, Any]:
    """riklet's own file: setting key -> raw value."""
    return _flatten(_read_mapping(path, "config"), "", path)


def read_chas_yaml(path: str, field: str = "chas-config") -> dict[str, Any]:
    """The CHaS file: CHaS key (``api.port``) -> raw value; an unknown key is an error."""
    return _flatten(_read_mapping(path, field), "", path, CHAS_KEYS)


def chas_config_path(flags: argparse.Namespace | None, environ: Mapping[str, str]) -> str | None:
    """The CHaS file to read: --chas-config, else CHAS_CONFIG (both must exist; /dev/null reads
    as empty, so it turns the default off), else the default path when it exists, else none."""
    for path, field in ((getattr(flags, "chas_config", None), "--chas-config"),
                        (environ.get("CHAS_CONFIG"), "CHAS_CONFIG")):
        if path:
            if not os.path.exists(path):
                raise InvalidArgument(f"CHaS configuration file {path} does not exist", field)
            if os.path.isdir(path):
                raise InvalidArgument(f"CHaS configuration file {path} is a directory", field)
            return path
    return CHAS_CONFIG_PATH if os.path.exists(CHAS_CONFIG_PATH) else None


def describe_source(key: str, source: str) -> str:
    """``Config.sources[key]`` for people: default, FILE: KEY, environment VAR or flag --FLAG."""
    s = _BY_KEY[key]
    if source == "environment":
        return f"environment {s.env}"
    if source == "flags":
        return f"flag {s.flag}"
    chas_key = _CHAS_BY_SETTING.get(key)
    if source == "default" or (chas_key and source.endswith(f": {chas_key}")):
        return source               # the CHaS file's entry already names its key
    return f"{source}: {key}"       # riklet's file: the key is the setting's


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML configuration file (env RIKLET_CONFIG)")
    parser.add_argument("--chas-config", help="CHaS node-agent YAML file (env CHAS_CONFIG; "
                        f"default {CHAS_CONFIG_PATH} when it exists)")
    for s in SETTINGS:
        if s.flag:
            parser.add_argument(s.flag, dest=s.attr, help=s.help)


def load(flags: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Defaults < CHaS file < riklet's file < environment < flags.

    ``Config.sources[key]`` says where each value came from: ``default``, ``<CHaS file>:
    <CHaS key>``, ``<riklet file>``, ``environment`` or ``flags`` (:func:`describe_source`
    spells out the key, variable or flag)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    # (setting key, raw value, where: named in errors, source: recorded in Config.sources)
    layers: list[list[tuple[str, Any, str, str]]] = []
    chas_path = chas_config_path(flags, env)
    if chas_path:
        layers.append([(CHAS_KEYS[k], raw, f"{chas_path}: {k}", f"{chas_path}: {k}")
                       for k, raw in read_chas_yaml(chas_path).items()])
    path = getattr(flags, "config", None) or env.get("RIKLET_CONFIG")
    if path:
        layers.append([(k, raw, f"{path}: {k}", path) for k, raw in read_yaml(path).items()])
    layers.append([(s.key, env[s.env], s.env, "environment") for s in SETTINGS if s.env and env.get(s.env)])
    if flags is not None:
        layers.append([(s.key, getattr(flags, s.attr), s.flag, "flags") for s in SETTINGS
                       if s.flag and getattr(flags, s.attr, None) is not None])
    for layer in layers:
        for key, raw, where, source in layer:
            values[key] = _BY_KEY[key].parse(raw, where)
            sources[key] = source
    for s in SETTINGS:
        if s.key not in values:
            values[s.key] = s.parse(s.default(), s.key)
            sources[s.key] = "default"
    # Unix socket paths are limited to 107 bytes; the longest one riklet makes is this one.
    longest = os.path.join(values["paths.run_dir"], "memory-events.sock")
    if len(longest.encode()) > 107:
        raise InvalidArgument(f"too long for unix sockets ({len(longest)} > 107 bytes with "
                              "'/memory-events.sock'): pick a shorter directory", "paths.run_dir")
    return Config(**{_BY_KEY[k].attr: v for k, v in values.items()}, sources=sources)


def parse_args(prog: str, argv: Sequence[str] | None = None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None,
               ) -> tuple[Config, argparse.Namespace]:
    """The command line every service shares; exits with a clear message on a bad setting."""
    parser = argparse.ArgumentParser(prog=prog)
    add_flags(parser)
    if extra:
        extra(parser)
    ns = parser.parse_args(argv)
    try:
        return load(ns), ns
    except InvalidArgument as exc:
        parser.exit(2, f"{prog}: configuration error: {exc}\n")
