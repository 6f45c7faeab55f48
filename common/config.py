"""riklet's configuration: defaults < CHaS file < riklet's YAML file < environment < flags.

Every setting is a field of :class:`Config`, a msgspec struct: the field's type carries its
constraints (:mod:`common.configtypes`), its ``opt(...)`` its environment variable, flag and
help; the YAML key is the attribute with its first ``_`` made a ``.`` (``api_max_streams`` is
``api.max_streams``). The CHaS Node Agent's file (``/etc/chas/node-agent.yaml``, seed 003) is
read too, its keys mapped onto the same settings by :data:`CHAS_KEYS`. Each raw value is
validated on its own, so an unknown YAML key or a value that does not parse is an error naming
the file (or variable, or flag) and the key.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args, get_origin

import msgspec
import yaml

from common import paths
from common.configtypes import (
    IP,
    PATTERNS,
    Address,
    After,
    Before,
    Bool,
    Count,
    CountOrZero,
    Duration,
    Hosts,
    Level,
    Memory,
    Name,
    OptionalAddress,
    OptionalCpu,
    OptionalMemory,
    OptionalPath,
    Path,
    PathPrefixes,
    Port,
    PortRange,
    PositiveDuration,
    ProxyMode,
    Resolution,
    Runtime,
    SocketPath,
    Subnet,
    Text,
    Tristate,
    Url,
    User,
)
from common.errors import InvalidArgument


def opt(*, help: str, env: str | None = None, flag: str | None = None) -> msgspec.Meta:
    """A setting's environment variable, flag and help, kept in its type's metadata."""
    return msgspec.Meta(description=help, extra={"env": env, "flag": flag})


def _primary_ip() -> str:
    """The address other machines reach this node at: the source of the default route."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent, only a route is chosen
        return str(s.getsockname()[0])
    return "127.0.0.1"


class Config(msgspec.Struct, frozen=True, kw_only=True):
    paths_run_dir: Annotated[Path, opt(env="RIKLET_RUN_DIR", flag="--run-dir",
        help="IPC sockets (created 0700)")] = msgspec.field(default_factory=paths.default_run_dir)
    paths_state_dir: Annotated[Path, opt(env="RIKLET_STATE_DIR", flag="--state-dir",
        help="database, logs, shim records")] = msgspec.field(default_factory=paths.default_state_dir)
    node_id: Annotated[Text, opt(env="NODE_ID", flag="--node-id",
        help="this node's id")] = msgspec.field(default_factory=socket.gethostname)
    api_address: Annotated[Address, opt(env="RIKLET_API_ADDRESS", flag="--api-address",
        help="Node API (gRPC) listen address")] = "127.0.0.1:9091"
    api_max_streams: Annotated[Count, opt(
        help="streaming calls (watch, logs -f, image pull/import) the Node API serves at once")] = 64
    api_max_streams_per_client: Annotated[Count, opt(
        help="streaming calls one client (one host) may hold open at once")] = 32
    metrics_address: Annotated[Address, opt(env="RIKLET_METRICS_ADDRESS", flag="--metrics-address",
        help="Prometheus /metrics listen address")] = "127.0.0.1:9092"
    logging_level: Annotated[Level, opt(env="LOG_LEVEL", flag="--log-level", help="log level")] = "INFO"
    runtime_default: Annotated[Runtime, opt(env="RIKLET_RUNTIME", flag="--runtime",
        help="runtime for containers that do not say")] = "process"
    runtime_stop_grace_period: Annotated[Duration, opt(
        help="SIGTERM to SIGKILL delay when a pod does not set one")] = 10.0
    reconcile_resync_interval: Annotated[PositiveDuration, opt(
        env="RIKLET_RESYNC_INTERVAL", flag="--resync-interval",
        help="every pod is observed once per this long, spread evenly (a safety net: changes reach the "
        "manager as events)")] = 30.0
    containerd_address: Annotated[SocketPath, opt(env="CONTAINERD_SOCKET", flag="--containerd-socket",
        help="containerd's gRPC socket")] = "/run/containerd/containerd.sock"
    containerd_namespace: Annotated[Name, opt(env="RIKLET_CONTAINERD_NAMESPACE",
        help="containerd namespace the agent's containers and images live in")] = "riklet"
    containerd_snapshotter: Annotated[Name, opt(env="RIKLET_SNAPSHOTTER",
        help="containerd snapshotter for container filesystems")] = "overlayfs"
    containerd_insecure_registries: Annotated[Hosts, opt(env="RIKLET_INSECURE_REGISTRIES",
        help="registries pulled from over plain HTTP (comma-separated HOST:PORT)")] = ()
    network_bridge: Annotated[Name, opt(env="RIKLET_BRIDGE",
        help="bridge the pods' interfaces are attached to")] = "riklet0"
    network_subnet: Annotated[Subnet, opt(env="RIKLET_POD_SUBNET", flag="--pod-subnet",
        help="pod IP addresses are taken from this subnet")] = "10.88.0.0/16"
    network_cni_path: Annotated[Path, opt(env="CNI_PATH",
        help="directory of the CNI plugins (bridge, host-local, loopback)")] = "/usr/lib/cni"
    chas_api_url: Annotated[Url, opt(env="CHAS_API_URL", flag="--chas-url",
        help="the CHaS API server to register with and report health to; unset: no reports")] = None
    chas_token_file: Annotated[OptionalPath, opt(env="CHAS_API_TOKEN_FILE",
        help="bearer token sent to the CHaS API server (a file holding it), if it wants one")] = None
    chas_port: Annotated[Port, opt(env="NODE_PORT", flag="--node-port",
        help="port of the CHaS HTTP API (0: off)")] = 9090
    chas_bind_address: Annotated[IP, opt(env="RIKLET_CHAS_BIND_ADDRESS",
        help="address the CHaS HTTP API listens on")] = "127.0.0.1"
    chas_health_interval: Annotated[PositiveDuration, opt(env="HEALTH_INTERVAL", flag="--health-interval",
        help="seconds between health reports to the CHaS API server")] = 30.0
    chas_host_ports: Annotated[PortRange, opt(env="RIKLET_HOST_PORTS",
        help="host ports the agent picks from when a deploy request gives none")] = (30000, 32767)
    chas_max_connections: Annotated[Count, opt(
        help="connections the CHaS HTTP API holds at once; the oldest idle one is closed for a new "
        "one")] = 128
    chas_header_timeout: Annotated[PositiveDuration, opt(
        help="a connection must send a request's headers within this long (else it is closed)")] = 10.0
    node_hostname: Annotated[Text, opt(
        help="hostname reported to CHaS")] = msgspec.field(default_factory=socket.gethostname)
    node_ip_address: Annotated[IP, opt(env="NODE_IP",
        help="address reported to CHaS (default: the source address of the default "
        "route)")] = msgspec.field(default_factory=_primary_ip)
    auth_token_file: Annotated[OptionalPath, opt(env="RIKLET_TOKEN_FILE", flag="--token-file",
        help="bearer token both APIs require (default <state_dir>/api-token; made 0600 when absent)")] = None
    tls_cert_file: Annotated[OptionalPath, opt(env="RIKLET_TLS_CERT", flag="--tls-cert",
        help="certificate (PEM) both APIs serve; with tls.key_file turns TLS on")] = None
    tls_key_file: Annotated[OptionalPath, opt(env="RIKLET_TLS_KEY", flag="--tls-key",
        help="its key (PEM)")] = None
    tls_ca_file: Annotated[OptionalPath, opt(env="RIKLET_TLS_CA", flag="--tls-ca",
        help="CA (PEM) client certificates must be signed by: turns on mutual TLS")] = None
    security_insecure: Annotated[Bool, opt(env="RIKLET_INSECURE", flag="--insecure",
        help="allow listening on a non-loopback address without TLS")] = False
    policy_allowed_registries: Annotated[Hosts, opt(env="RIKLET_ALLOWED_REGISTRIES",
        help="registries images may come from (HOST[:PORT]; empty: any)")] = ()
    policy_max_cpu: Annotated[OptionalCpu, opt(help="most CPU a pod may ask for")] = None
    policy_max_memory: Annotated[OptionalMemory, opt(help="most memory a pod may ask for")] = None
    policy_host_ports: Annotated[PortRange, opt(help="host ports a pod may ask for")] = (1, 65535)
    policy_allow_host_network: Annotated[Bool, opt(help="whether pods may use hostNetwork")] = False
    volumes_host_path_prefixes: Annotated[PathPrefixes, opt(env="RIKLET_HOST_PATH_PREFIXES",
        help="host directories hostPath volumes may name (comma-separated absolute paths; empty: no "
        "hostPath volume)")] = ()
    volumes_size_check_interval: Annotated[PositiveDuration, opt(
        help="how often disk emptyDirs with a sizeLimit are measured (a pod over its limit is "
        "evicted)")] = 10.0
    runtime_user: Annotated[User, opt(env="RIKLET_WORKLOAD_USER",
        help="UID[:GID] workloads run as unless their image names a user (0: root)")] = (65534, 65534)
    monitoring_metrics_enabled: Annotated[Bool, opt(help="serve Prometheus metrics")] = True
    logging_file: Annotated[OptionalPath, opt(
        help="also write the services' JSON log lines to this file, rotated by size")] = None
    logging_max_size: Annotated[Memory, opt(
        help="rotate logging.file when a line would take it past this size")] = 10 * 1024 * 1024
    logging_max_files: Annotated[Count, opt(
        help="rotated copies of logging.file kept (FILE.1 the newest)")] = 5
    logging_journald: Annotated[Tristate, opt(env="RIKLET_LOG_JOURNALD", help=(
        "log to the systemd journal with structured fields: auto (when run by systemd and its socket "
        "exists), true or false"))] = "auto"
    restart_backoff_initial: Annotated[Duration, opt(
        help="first restart delay of a crashing container")] = 1.0
    restart_backoff_max: Annotated[Duration, opt(help="longest restart delay")] = 300.0
    restart_backoff_reset: Annotated[Duration, opt(help="running this long resets the back-off")] = 600.0
    logs_max_size: Annotated[Memory, opt(help="rotate a container log at this size")] = 10 * 1024 * 1024
    logs_max_files: Annotated[Count, opt(help="rotated files kept per container")] = 3
    scheduler_address: Annotated[OptionalAddress, opt(env="RIKLET_SCHEDULER", flag="--scheduler",
        help="a RIK scheduler's HOST:PORT; unset, the agent runs stand-alone")] = None
    monitoring_metric_resolution: Annotated[Resolution, opt(
        env="RIKLET_METRIC_RESOLUTION", flag="--metric-resolution",
        help="how often metrics are pushed to the scheduler (5s, 500ms, 1m)")] = 5.0
    proxy_mode: Annotated[ProxyMode, opt(env="RIKLET_PROXY_MODE", flag="--proxy-mode",
        help="kernel (nftables DNAT), userspace (the proxy forwards), or auto: kernel where nftables works "
        "and the proxy has CAP_NET_ADMIN")] = "auto"
    proxy_health_interval: Annotated[PositiveDuration, opt(
        help="kernel mode: how often each endpoint of a port with several is probed (TCP connect)")] = 2.0
    proxy_health_timeout: Annotated[PositiveDuration, opt(
        help="kernel mode: a probe not connected within this long fails")] = 1.0
    proxy_health_fall: Annotated[Count, opt(
        help="kernel mode: failed probes in a row that take an endpoint out of the kernel's maps")] = 2
    proxy_health_rise: Annotated[Count, opt(help="kernel mode: passed probes in a row that put it back")] = 1
    proxy_bind_address: Annotated[IP, opt(env="RIKLET_PROXY_BIND_ADDRESS", flag="--bind-address",
        help="address the host ports listen on")] = "0.0.0.0"
    proxy_connect_timeout: Annotated[PositiveDuration, opt(flag="--connect-timeout",
        help="wait for an endpoint this long before trying the next one")] = 3.0
    proxy_udp_max_flows: Annotated[Count, opt(flag="--udp-max-flows",
        help="UDP flows kept per route; the least recently used is evicted")] = 4096
    proxy_udp_idle_timeout: Annotated[PositiveDuration, opt(flag="--udp-idle-timeout",
        help="an idle UDP flow is closed after this long")] = 60.0
    proxy_max_connections: Annotated[CountOrZero, opt(flag="--max-connections",
        help="TCP clients per host port; more are reset at once (0: no limit)")] = 4096
    proxy_idle_timeout: Annotated[Duration, opt(flag="--idle-timeout",
        help="a TCP connection with no byte either way for this long is closed (0: never)")] = 3600.0
    sources: Mapping[str, str] = msgspec.field(default_factory=dict)   # key -> where its value came from

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


@dataclass(frozen=True)
class Setting:
    """One field of :class:`Config` as the sources see it: its key, variable, flag and checks."""
    key: str                      # dotted YAML key; the attribute is the key with '.' -> '_'
    attr: str
    type: Any                     # the field's Annotated type, constraints included
    default: Callable[[], Any]
    env: str | None
    flag: str | None
    help: str
    before: tuple[Callable[[Any], Any], ...]
    after: tuple[Callable[[Any], Any], ...]

    def parse(self, raw: object, where: str) -> Any:
        """``raw`` (YAML, environment or flag text) as this setting's value; an error names ``where``."""
        try:
            value = raw
            for step in self.before:
                value = step(value)
            value = msgspec.convert(value, self.type, strict=False)   # strict=False: "5" is 5
            for step in self.after:
                value = step(value)
            return value
        except InvalidArgument as exc:
            message = exc.message
        except msgspec.ValidationError as exc:
            message = str(exc)
            choices = _choices(self.type)
            if choices and message.startswith("Invalid enum value"):
                message = f"expected one of {', '.join(choices)}, got {raw!r}"
            else:
                message = _plain(message.split(" - at ")[0], raw)
        except (ValueError, TypeError) as exc:
            message = str(exc)
        raise InvalidArgument(message[:1].lower() + message[1:], where)


# msgspec's words for types, as a user reads them
_PLAIN = (("`int`", "an integer"), ("`float`", "a number"), ("`str`", "a string"),
          ("`bool`", "true or false"), ("`array`", "a list"), ("`object`", "a mapping"),
          ("`null`", "nothing"))


def _plain(message: str, raw: object) -> str:
    """msgspec's message in a user's words, with the value that was refused."""
    for pattern, words in PATTERNS.items():
        if f"matching regex {pattern!r}" in message:
            return f"{words}, got {raw!r}"
    for word, plain in _PLAIN:
        message = message.replace(word, plain)
    return f"{message.split(', got ')[0]}, got {raw!r}"


def _choices(tp: Any) -> tuple[str, ...]:
    """The values of the Literal inside a setting's type, if it is one."""
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tuple(str(a) for a in get_args(tp)) if get_origin(tp) is Literal else ()


def _setting(info: msgspec.structs.FieldInfo) -> Setting:
    extras = info.type.__metadata__ if get_origin(info.type) is Annotated else ()
    meta = next(m for m in reversed(extras) if isinstance(m, msgspec.Meta) and m.extra)
    extra = meta.extra or {}
    default = info.default_factory if info.default is msgspec.NODEFAULT else (lambda: info.default)
    return Setting(info.name.replace("_", ".", 1), info.name, info.type, default, extra["env"], extra["flag"],
                   meta.description or "",
                   tuple(m.step for m in extras if isinstance(m, Before)),
                   tuple(m.step for m in extras if isinstance(m, After)))


SETTINGS: tuple[Setting, ...] = tuple(
    _setting(f) for f in msgspec.structs.fields(Config) if f.name != "sources")
_BY_KEY = {s.key: s for s in SETTINGS}


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
