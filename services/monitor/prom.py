"""Prometheus text exposition (format 0.0.4) of the monitor's figures, and the HTTP server
that serves it on ``GET /metrics`` (plus ``GET /healthz``).

:func:`render` is pure: it takes the same dicts the IPC ops return, so both views of a pod
always agree. The server is a thin stdlib ``ThreadingHTTPServer`` in a daemon thread.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from services.monitor.metrics import RealtimeNode, RealtimePod

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Phases of the pod lifecycle (seed 001), always exported so a dashboard sees 0, not a gap.
KNOWN_PHASES = ("CREATING", "RUNNING", "ERROR", "TERMINATING")

Labels = tuple[tuple[str, str], ...]


@dataclass
class Family:
    name: str
    kind: str            # gauge | counter | histogram
    help: str
    # (suffix, labels, value): the suffix is "" but for a histogram's _bucket, _sum and _count.
    samples: list[tuple[str, Labels, float]] = field(default_factory=list)
    # sample lines already in the exposition format (a pod's series, rendered once per value)
    lines: list[str] = field(default_factory=list)

    def add(self, value: float, **labels: str) -> None:
        self.samples.append(("", tuple(labels.items()), value))

    def add_suffixed(self, suffix: str, value: float, **labels: str) -> None:
        self.samples.append((suffix, tuple(labels.items()), value))


def escape_label(value: str) -> str:
    if "\\" not in value and '"' not in value and "\n" not in value:
        return value  # the usual case, and a scrape escapes thousands of labels
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if type(value) is int and abs(value) < 2**53:
        return str(value)  # most samples: byte counts, counters
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def exposition(families: Sequence[Family]) -> str:
    lines: list[str] = []
    for fam in families:
        lines.append(f"# HELP {fam.name} {escape_help(fam.help)}")
        lines.append(f"# TYPE {fam.name} {fam.kind}")
        for suffix, labels, value in fam.samples:
            text = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels)
            name = fam.name + suffix
            lines.append(f"{name}{{{text}}} {format_value(value)}" if text
                         else f"{name} {format_value(value)}")
        lines.extend(fam.lines)
    return "\n".join(lines) + "\n"


def sample_line(name: str, value: float, **labels: str) -> str:
    """One sample in the exposition format, as :func:`exposition` writes it."""
    text = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())
    return f"{name}{{{text}}} {format_value(value)}" if text else f"{name} {format_value(value)}"


POD_CPU = "riklet_pod_cpu_usage_percent"
POD_MEMORY = "riklet_pod_memory_bytes"
POD_RESTARTS = "riklet_pod_restarts_total"
CONTAINER_CPU = "riklet_container_cpu_seconds_total"
CONTAINER_MEMORY = "riklet_container_memory_working_set_bytes"
CONTAINER_LIMIT = "riklet_container_memory_limit_bytes"


class PodSeries(NamedTuple):
    """A pod's sample lines in each of the per-pod families, and its phase: what a scrape
    needs of a pod, rendered once for the values it shows (the monitor keeps it while they
    stay the same, which they do for every idle pod)."""

    state: str
    cpu: str
    memory: str
    restarts: str
    containers: tuple[tuple[str, str, str | None], ...]   # (cpu, memory, limit or None) lines


def pod_series(pod: RealtimePod, rows: Sequence[Any] = ()) -> PodSeries:
    """``pod``'s series, and those of its containers (``services.monitor.pods.ContainerUsage``)."""
    name = pod["appId"]
    return PodSeries(
        pod["state"], sample_line(POD_CPU, pod["cpu"]["currentUsage"], pod=name),
        sample_line(POD_MEMORY, pod["memory"]["totalMemory"] - pod["memory"]["freeMemory"], pod=name),
        sample_line(POD_RESTARTS, pod["restartCount"], pod=name), container_lines(rows))


def container_lines(rows: Sequence[Any]) -> tuple[tuple[str, str, str | None], ...]:
    """Each container's (cpu, memory, limit or None) sample lines."""
    return tuple((sample_line(CONTAINER_CPU, r.cpu_seconds, pod=r.pod, container=r.container),
                  sample_line(CONTAINER_MEMORY, r.memory_bytes, pod=r.pod, container=r.container),
                  None if r.memory_limit is None else
                  sample_line(CONTAINER_LIMIT, r.memory_limit, pod=r.pod, container=r.container))
                 for r in rows)


def families(node: RealtimeNode, pods: Sequence[RealtimePod], scrape_errors: int,
             series: Sequence[PodSeries] = ()) -> list[Family]:
    """The node's and the pods' families: ``pods`` as figures, or ``series`` already rendered."""
    node_cpu = Family("riklet_node_cpu_usage_percent", "gauge", "CPU used by the whole node, in percent.")
    node_cpu.add(node["cpu"]["currentUsage"])
    node_mem = Family("riklet_node_memory_bytes", "gauge",
                      "Node memory in bytes; free is what can still be allocated (MemAvailable).")
    total, free = node["memory"]["totalMemory"], node["memory"]["freeMemory"]
    node_mem.add(total, kind="total")
    node_mem.add(total - free, kind="used")
    node_mem.add(free, kind="free")
    disk = Family("riklet_node_disk_bytes", "gauge", "Size of each mounted block device, in bytes.")
    for d in node["disks"]:
        disk.add(d["total"], disk=d["diskName"], kind="total")
        disk.add(d["used"], disk=d["diskName"], kind="used")
        disk.add(d["available"], disk=d["diskName"], kind="available")
    pod_cpu = Family(POD_CPU, "gauge",
                     "CPU used by a pod, in percent of its limit (or of the node without one).")
    pod_mem = Family(POD_MEMORY, "gauge", "Memory used by a pod, in bytes.")
    restarts = Family(POD_RESTARTS, "counter", "Container restarts in a pod.")
    phases = Family("riklet_pods", "gauge", "Pods on this node by phase.")
    by_phase = dict.fromkeys(KNOWN_PHASES, 0)
    for one in [*(pod_series(p) for p in pods), *series]:
        pod_cpu.lines.append(one.cpu)
        pod_mem.lines.append(one.memory)
        restarts.lines.append(one.restarts)
        by_phase[one.state] = by_phase.get(one.state, 0) + 1
    for phase, count in by_phase.items():
        phases.add(count, phase=phase)
    errors = Family("riklet_monitor_scrape_errors_total", "counter",
                    "Scrapes (or parts of one) that failed, e.g. memory unreachable.")
    errors.add(scrape_errors)
    return [node_cpu, node_mem, disk, pod_cpu, pod_mem, restarts, phases, errors]


# The proxy's ``stats`` answer: key -> (family name, kind, help).
PROXY_SERIES: tuple[tuple[str, str, str, str], ...] = (
    ("connections_total", "riklet_proxy_connections_total", "counter", "TCP clients accepted by the proxy."),
    ("connections_active", "riklet_proxy_connections_active", "gauge", "TCP clients connected now."),
    ("bytes_in", "riklet_proxy_bytes_in_total", "counter", "Bytes from clients to pods (TCP and UDP)."),
    ("bytes_out", "riklet_proxy_bytes_out_total", "counter", "Bytes from pods to clients (TCP and UDP)."),
    ("connect_errors", "riklet_proxy_connect_errors_total", "counter",
     "Upstream connects that failed or timed out."),
    ("connections_refused", "riklet_proxy_connections_refused_total", "counter",
     "Clients reset because no endpoint answered."),
    ("connections_over_limit", "riklet_proxy_connections_over_limit_total", "counter",
     "Clients reset because their port was at max_connections."),
    ("idle_closed", "riklet_proxy_idle_closed_total", "counter", "Connections closed when idle too long."),
    ("ejections", "riklet_proxy_ejections_total", "counter", "Endpoints ejected after a failed connect."),
    ("udp_flows_total", "riklet_proxy_udp_flows_total", "counter", "UDP flows opened."),
    ("udp_flows_active", "riklet_proxy_udp_flows_active", "gauge", "UDP flows open now."),
    ("udp_flows_evicted", "riklet_proxy_udp_flows_evicted_total", "counter",
     "UDP flows closed early because the flow table was full."),
    ("datagrams_in", "riklet_proxy_datagrams_in_total", "counter", "UDP datagrams from clients."),
    ("datagrams_out", "riklet_proxy_datagrams_out_total", "counter", "UDP datagrams to clients."),
    ("datagrams_dropped", "riklet_proxy_datagrams_dropped_total", "counter",
     "UDP datagrams dropped (buffer full or upstream refused)."),
    # Kernel mode only (nftables counters and conntrack).
    ("packets_in", "riklet_proxy_packets_in_total", "counter", "Packets from clients to pods (kernel mode)."),
    ("packets_out", "riklet_proxy_packets_out_total", "counter",
     "Packets from pods to clients (kernel mode)."),
    ("conntrack_entries", "riklet_proxy_conntrack_entries", "gauge",
     "Conntrack entries of flows the proxy's table NATed (kernel mode)."),
    ("conntrack_deleted", "riklet_proxy_conntrack_deleted_total", "counter",
     "Conntrack entries deleted because their endpoint left (kernel mode)."),
    ("syncs", "riklet_proxy_kernel_syncs_total", "counter", "nftables transactions applied (kernel mode)."),
    ("sync_errors", "riklet_proxy_kernel_sync_errors_total", "counter",
     "nftables transactions that failed (kernel mode)."),
    ("last_sync_seconds", "riklet_proxy_kernel_last_sync_seconds", "gauge",
     "Duration of the last nftables transaction (kernel mode)."),
)
PROXY_MODES = ("kernel", "userspace")


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def add_histogram(fam: Family, hist: object, **labels: str) -> bool:
    """Add one histogram (common.histogram.snapshot's form) to ``fam``; False, adding nothing,
    when it is malformed."""
    if not isinstance(hist, Mapping) or not isinstance(hist.get("buckets"), list):
        return False
    total, count = _number(hist.get("sum")), _number(hist.get("count"))
    buckets = [(_number(b[0]), _number(b[1])) for b in hist["buckets"] if isinstance(b, list) and len(b) == 2]
    if total is None or count is None or any(le is None or n is None for le, n in buckets):
        return False
    for le, n in buckets:
        fam.add_suffixed("_bucket", n or 0, **labels, le=format_value(le or 0.0))
    fam.add_suffixed("_bucket", count, **labels, le="+Inf")
    fam.add_suffixed("_sum", total, **labels)
    fam.add_suffixed("_count", count, **labels)
    return True


def proxy_families(stats: Mapping[str, Any] | None) -> list[Family]:
    """``riklet_proxy_up`` always; the proxy's series only when it answered (``stats``).
    Keys the proxy does not send (an older proxy) or sends malformed are left out."""
    up = Family("riklet_proxy_up", "gauge", "1 if the proxy answered this scrape's stats request.")
    up.add(0 if stats is None else 1)
    out = [up]
    if stats is None:
        return out
    for key, name, kind, help_text in PROXY_SERIES:
        value = _number(stats.get(key))
        if value is not None:
            fam = Family(name, kind, help_text)
            fam.add(value)
            out.append(fam)
    fam = Family("riklet_proxy_connect_duration_seconds", "histogram",
                 "Time to connect to the upstream endpoint (successful connects).")
    if add_histogram(fam, stats.get("connect_latency")):
        out.append(fam)
    if isinstance(stats.get("mode"), str):
        mode = Family("riklet_proxy_mode", "gauge", "The proxy's data path: 1 for the mode in use.")
        for name in PROXY_MODES:
            mode.add(1 if stats["mode"] == name else 0, mode=name)
        out.append(mode)
    return out + _port_families(stats.get("ports"))


def _port_families(ports: object) -> list[Family]:
    """Per host port series of the kernel mode (``stats.ports``); malformed rows are skipped."""
    if not isinstance(ports, list):
        return []
    packets = Family("riklet_proxy_port_packets_total", "counter",
                     "Packets through a host port, by direction.")
    octets = Family("riklet_proxy_port_bytes_total", "counter", "Bytes through a host port, by direction.")
    tracked = Family("riklet_proxy_port_conntrack_entries", "gauge", "Conntrack entries of a host port.")
    ready = Family("riklet_proxy_port_endpoints", "gauge", "Endpoints of a host port, by state.")
    flows = Family("riklet_proxy_port_flows_total", "counter",
                   "New flows (TCP connections, UDP flows) NATed on a host port.")
    for p in ports:
        if not isinstance(p, Mapping) or not all(_number(p.get(k)) is not None for k in _PORT_KEYS):
            continue
        labels = {"protocol": str(p.get("protocol")), "port": str(p.get("port"))}
        for direction in ("in", "out"):
            packets.add(float(p[f"packets_{direction}"]), **labels, direction=direction)
            octets.add(float(p[f"bytes_{direction}"]), **labels, direction=direction)
        tracked.add(float(p["conntrack"]), **labels)
        if _number(p.get("flows")) is not None:
            flows.add(float(p["flows"]), **labels)
        ready.add(float(p["ready"]), **labels, state="ready")
        ready.add(float(p["endpoints"]) - float(p["ready"]), **labels, state="unready")
    return [packets, octets, tracked, ready, flows]


_PORT_KEYS = ("port", "packets_in", "packets_out", "bytes_in", "bytes_out", "conntrack", "ready", "endpoints")


def container_families(rows: Sequence[Any], series: Sequence[PodSeries] = ()) -> list[Family]:
    """Per-container CPU and memory (``services.monitor.pods.ContainerUsage`` rows, or the
    containers of pods' ``series``)."""
    cpu = Family(CONTAINER_CPU, "counter", "CPU time used by a container (its cgroup).")
    mem = Family(CONTAINER_MEMORY, "gauge",
                 "Memory a container uses, page cache that can be dropped excluded.")
    limit = Family(CONTAINER_LIMIT, "gauge", "A container's memory limit.")
    for cpu_line, mem_line, limit_line in [*container_lines(rows),
                                           *(c for one in series for c in one.containers)]:
        cpu.lines.append(cpu_line)
        mem.lines.append(mem_line)
        if limit_line is not None:
            limit.lines.append(limit_line)
    return [cpu, mem, limit]


def chas_families(stats: Mapping[str, Any] | None) -> list[Family]:
    """The CHaS API's counters from the manager (services.manager.chas.stats): requests and
    their latency per endpoint, deployments, errors by type, health and registration."""
    if not isinstance(stats, Mapping):
        return []
    requests = Family("riklet_chas_requests_total", "counter", "CHaS API requests by endpoint and status.")
    for r in stats.get("requests") or []:
        if isinstance(r, Mapping) and _number(r.get("count")) is not None:
            requests.add(float(r["count"]), method=str(r.get("method")), endpoint=str(r.get("endpoint")),
                         status=str(r.get("status")))
    latency = Family("riklet_chas_request_duration_seconds", "histogram",
                     "CHaS API request latency by endpoint.")
    for endpoint, hist in sorted((stats.get("latency") or {}).items()):
        add_histogram(latency, hist, endpoint=str(endpoint))
    deploys = Family("riklet_chas_deployments_total", "counter", "Deploy requests by result.")
    for result, n in sorted((stats.get("deployments") or {}).items()):
        deploys.add(float(n), result=str(result))
    errors = Family("riklet_chas_errors_total", "counter", "CHaS API errors by type (error code).")
    for code, n in sorted((stats.get("errors") or {}).items()):
        errors.add(float(n), code=str(code))
    health = Family("riklet_chas_health_status", "gauge",
                    "1 when the node's last health check was healthy, 0 when unhealthy.")
    if stats.get("healthy") is not None:
        health.add(1 if stats.get("healthy") else 0)
    registered = Family("riklet_chas_registered", "gauge", "1 when the CHaS API server accepted this node.")
    registered.add(1 if stats.get("registered") else 0)
    reports = Family("riklet_chas_health_reports_total", "counter",
                     "Health reports sent to the CHaS API server, by result.")
    for result, n in sorted((stats.get("reports") or {}).items()):
        reports.add(float(n), result=str(result))
    return [requests, latency, deploys, errors, health, registered, reports]


def render(node: RealtimeNode, pods: Sequence[RealtimePod], scrape_errors: int,
           proxy: Mapping[str, Any] | None = None, with_proxy: bool = False,
           containers: Sequence[Any] = (), chas: Mapping[str, Any] | None = None,
           series: Sequence[PodSeries] = ()) -> str:
    """With ``with_proxy``, add the proxy's families (``proxy`` None: it did not answer).
    Pods come as figures (``pods``, ``containers``) or already rendered (``series``)."""
    fams = (families(node, pods, scrape_errors, series) + container_families(containers, series)
            + chas_families(chas))
    if with_proxy:
        fams += proxy_families(proxy)
    return exposition(fams)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    collect: Callable[[], str]


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # a client that opens a connection and says nothing does not keep a thread
    server_version = "riklet-monitor"

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, send_body: bool) -> None:
        path = urlsplit(self.path).path
        if path == "/metrics":
            try:
                body = self.server.collect().encode()
            except Exception:  # the HTTP boundary: a bug in collection is a 500, not a dead thread
                log.exception("metrics collection failed")
                self.send_error(500, "metrics collection failed")
                return
            self._send(200, CONTENT_TYPE, body, send_body)
        elif path == "/healthz":
            self._send(200, "text/plain; charset=utf-8", b"ok\n", send_body)
        else:
            self.send_error(404, "not found")

    def _send(self, code: int, ctype: str, body: bytes, send_body: bool) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("http " + format, *args)


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` into (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class MetricsServer:
    """Serves ``collect()`` on ``/metrics`` at ``address`` from a daemon thread."""

    def __init__(self, address: str, collect: Callable[[], str]) -> None:
        host, port = split_address(address)
        cls = _Server6 if ":" in host else _Server
        self._httpd = cls((host, port), _Handler)
        self._httpd.collect = collect
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="metrics-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for serve_forever, which may never have run
            self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
