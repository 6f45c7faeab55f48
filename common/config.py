"""riklet's configuration as the services hold it: :class:`Config`, one frozen record.

Every setting is a field of :class:`Config`: the field's type carries its constraints
(:mod:`common.configtypes`), its ``opt(...)`` its environment variable, flag and help; the YAML
key is the attribute with its first ``_`` made a ``.`` (``api_max_streams`` is
``api.max_streams``). The annotations stay text here (``from __future__ import annotations``):
only :mod:`common.configload`, which reads and checks the sources (defaults < CHaS file <
riklet's YAML file < environment < flags), evaluates them, with msgspec and PyYAML.

A service started by ``riklet run`` reads none of that: the launcher has checked the
configuration once and written it to the run directory (``config.json``, named by
``RIKLET_CHECKED_CONFIG``) with a fingerprint of what it read: the files' digests and the
variables' values. :func:`parse_args` takes that record while the fingerprint still holds, so
the services load neither the schema library nor the YAML parser (a few MiB each); once a file
or a variable has changed (an operator edits the YAML and restarts one service), the service
reads and checks the sources itself, exactly as before.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Annotated, Any

from common import paths
from common.jsonfile import read_json

if TYPE_CHECKING:
    from common.configload import opt
    from common.configtypes import (
        IP,
        Address,
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

# The variable naming the launcher's checked configuration (see the module's doc).
CHECKED_ENV = "RIKLET_CHECKED_CONFIG"
CHECKED_VERSION = 1


def _primary_ip() -> str:
    """The address other machines reach this node at: the source of the default route."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent, only a route is chosen
        return str(s.getsockname()[0])
    return "127.0.0.1"


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    paths_run_dir: Annotated[Path, opt(env="RIKLET_RUN_DIR", flag="--run-dir",
        help="IPC sockets (created 0700)")] = field(default_factory=paths.default_run_dir)
    paths_state_dir: Annotated[Path, opt(env="RIKLET_STATE_DIR", flag="--state-dir",
        help="database, logs, shim records")] = field(default_factory=paths.default_state_dir)
    node_id: Annotated[Text, opt(env="NODE_ID", flag="--node-id",
        help="this node's id")] = field(default_factory=socket.gethostname)
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
        help="hostname reported to CHaS")] = field(default_factory=socket.gethostname)
    node_ip_address: Annotated[IP, opt(env="NODE_IP",
        help="address reported to CHaS (default: the source address of the default "
        "route)")] = field(default_factory=_primary_ip)
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
    sources: Mapping[str, str] = field(default_factory=dict)   # key -> where its value came from

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


def load(flags: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read and check every source: :func:`common.configload.load`."""
    from common import configload

    return configload.load(flags, environ)


# -- the launcher's checked configuration ---------------------------------------------------

def digest(path: str) -> str | None:
    """A file's SHA-256, or None when it cannot be read (absent: the CHaS file's default)."""
    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except OSError:
        return None


def _tuples(value: Any) -> Any:
    """JSON's lists back into the tuples every sequence setting holds."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def read_checked(path: str, environ: Mapping[str, str] | None = None) -> Config | None:
    """The launcher's checked configuration, or None when it is missing, of another version, or
    stale: a variable it read differs now, or a file it read has changed (or appeared)."""
    env = os.environ if environ is None else environ
    record = read_json(path)
    if record is None or record.get("version") != CHECKED_VERSION:
        return None
    try:
        inputs = record["inputs"]
        if any((env.get(name) or None) != value for name, value in inputs["env"].items()):
            return None
        if any(digest(file) != value for file, value in inputs["files"].items()):
            return None
        values = {name: _tuples(value) for name, value in record["values"].items()}
        if set(values) != {f.name for f in fields(Config)} - {"sources"}:
            return None                 # written by another riklet's idea of the settings
        return Config(**values, sources=dict(record["sources"]))
    except (KeyError, TypeError, ValueError, AttributeError):   # a record of another shape
        return None


def parse_args(prog: str, argv: Sequence[str] | None = None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None,
               ) -> tuple[Config, argparse.Namespace]:
    """The command line every service shares; exits with a clear message on a bad setting.

    Started by ``riklet run`` with no setting on its command line (``extra``'s own flags
    aside), a service takes the launcher's checked configuration while it still holds; else it
    reads and checks the sources itself (:func:`common.configload.parse_args`)."""
    checked = os.environ.get(CHECKED_ENV)
    if checked:
        parser = argparse.ArgumentParser(prog=prog, add_help=False)
        if extra:
            extra(parser)
        ns, rest = parser.parse_known_args(argv)
        cfg = None if rest else read_checked(checked)
        if cfg is not None:
            return cfg, ns
    from common import configload

    return configload.parse_args(prog, argv, extra)
