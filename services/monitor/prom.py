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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
    kind: str            # gauge | counter
    help: str
    samples: list[tuple[Labels, float]] = field(default_factory=list)

    def add(self, value: float, **labels: str) -> None:
        self.samples.append((tuple(labels.items()), value))


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
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
        for labels, value in fam.samples:
            text = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels)
            lines.append(f"{fam.name}{{{text}}} {format_value(value)}" if text
                         else f"{fam.name} {format_value(value)}")
    return "\n".join(lines) + "\n"


def families(node: RealtimeNode, pods: Sequence[RealtimePod], scrape_errors: int) -> list[Family]:
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
    pod_cpu = Family("riklet_pod_cpu_usage_percent", "gauge",
                     "CPU used by a pod, in percent of its limit (or of the node without one).")
    pod_mem = Family("riklet_pod_memory_bytes", "gauge", "Memory used by a pod, in bytes.")
    restarts = Family("riklet_pod_restarts_total", "counter", "Container restarts in a pod.")
    phases = Family("riklet_pods", "gauge", "Pods on this node by phase.")
    by_phase = dict.fromkeys(KNOWN_PHASES, 0)
    for p in pods:
        name = p["appId"]
        pod_cpu.add(p["cpu"]["currentUsage"], pod=name)
        pod_mem.add(p["memory"]["totalMemory"] - p["memory"]["freeMemory"], pod=name)
        restarts.add(p["restartCount"], pod=name)
        by_phase[p["state"]] = by_phase.get(p["state"], 0) + 1
    for phase, count in by_phase.items():
        phases.add(count, phase=phase)
    errors = Family("riklet_monitor_scrape_errors_total", "counter",
                    "Scrapes (or parts of one) that failed, e.g. memory unreachable.")
    errors.add(scrape_errors)
    return [node_cpu, node_mem, disk, pod_cpu, pod_mem, restarts, phases, errors]


def render(node: RealtimeNode, pods: Sequence[RealtimePod], scrape_errors: int) -> str:
    return exposition(families(node, pods, scrape_errors))


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
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
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
