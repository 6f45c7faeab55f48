"""``riklet_build_info`` and the ``process_*`` metrics of each of the agent's services.

The pids come from supervisord (``supervisor.getAllProcessInfo`` over its socket in the run
dir): it is the one that starts the four services, knows which pid each has now, and answers
the same way whatever state a service is in, so a service that is down or restarting shows as
``riklet_service_up 0`` rather than a silent gap. Without supervisord (the monitor run alone)
only the monitor itself is reported. Each process is read by psutil (a few /proc files).
``process_*`` carry a ``service`` label because one endpoint speaks for four processes.
"""

from __future__ import annotations

import functools
import http.client
import importlib.metadata
import logging
import os
import platform
import socket
import subprocess
import xmlrpc.client
from collections.abc import Callable, Mapping

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

SERVICES = ("memory", "manager", "monitor", "proxy")
RPC_TIMEOUT = 1.0


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def supervisor_pids(sock_path: str, timeout: float = RPC_TIMEOUT) -> dict[str, int | None] | None:
    """{program: pid, None when not running} of the riklet group; None when supervisord is not
    there or does not answer."""
    if not os.path.exists(sock_path):
        return None
    conn = _UnixConnection(sock_path, timeout)
    try:
        conn.request(
            "POST",
            "/RPC2",
            xmlrpc.client.dumps((), "supervisor.getAllProcessInfo"),
            {"Content-Type": "text/xml"},
        )
        reply = conn.getresponse().read()
        (infos,), _ = xmlrpc.client.loads(reply)
    except (OSError, http.client.HTTPException, xmlrpc.client.Error, ValueError) as exc:
        log.debug("supervisord did not answer", extra={"error": str(exc)})
        return None
    finally:
        conn.close()
    out: dict[str, int | None] = {}
    for info in infos if isinstance(infos, list) else []:
        if isinstance(info, Mapping) and info.get("name") in SERVICES:
            running = info.get("statename") == "RUNNING" and isinstance(info.get("pid"), int)
            out[str(info["name"])] = int(info["pid"]) if running else None
    return out


def process_families(pids: Mapping[str, int | None]) -> list[Metric]:
    """The standard process metrics, one series per service whose pid is known."""
    fams = {
        "cpu": CounterMetricFamily(
            "process_cpu_seconds", "Total user and system CPU time spent in seconds.", labels=["service"]
        ),
        "rss": GaugeMetricFamily(
            "process_resident_memory_bytes", "Resident memory size in bytes.", labels=["service"]
        ),
        "vms": GaugeMetricFamily(
            "process_virtual_memory_bytes", "Virtual memory size in bytes.", labels=["service"]
        ),
        "start": GaugeMetricFamily(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            labels=["service"],
        ),
        "fds": GaugeMetricFamily("process_open_fds", "Number of open file descriptors.", labels=["service"]),
        "max_fds": GaugeMetricFamily(
            "process_max_fds", "Maximum number of open file descriptors.", labels=["service"]
        ),
        "threads": GaugeMetricFamily(
            "process_threads", "Number of OS threads in the process.", labels=["service"]
        ),
    }
    for service, pid in sorted(pids.items()):
        if pid is None:
            continue
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                cpu, mem = proc.cpu_times(), proc.memory_info()
                values = {
                    "cpu": cpu.user + cpu.system,
                    "rss": mem.rss,
                    "vms": mem.vms,
                    "start": proc.create_time(),
                    "fds": proc.num_fds(),
                    "max_fds": proc.rlimit(psutil.RLIMIT_NOFILE)[0],
                    "threads": proc.num_threads(),
                }
        except psutil.Error:  # it exited between supervisord's answer and now
            continue
        for key, fam in fams.items():
            fam.add_metric([service], float(values[key]))  # type: ignore[attr-defined]
    return list(fams.values())


def up_family(pids: Mapping[str, int | None]) -> Metric:
    fam = GaugeMetricFamily(
        "riklet_service_up", "1 when supervisord reports the service running.", labels=["service"]
    )
    for service in SERVICES:
        fam.add_metric([service], 0 if pids.get(service) is None else 1)
    return fam


@functools.cache
def build() -> tuple[str, str, str]:
    """(version, revision, python version): the package's version, the git commit it was
    built from (RIKLET_REVISION, else the checkout's HEAD, else "unknown")."""
    try:
        version = importlib.metadata.version("riklet")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    revision = os.environ.get("RIKLET_REVISION", "")
    if not revision:
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        try:
            revision = subprocess.run(
                ["git", "-C", here, "rev-parse", "--short=12", "HEAD"],
                capture_output=True,
                text=True,
                timeout=2,
                check=False,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            revision = ""
    return version, revision or "unknown", platform.python_version()


def build_family() -> Metric:
    version, revision, python = build()
    fam = GaugeMetricFamily(
        "riklet_build_info",
        "Always 1; the agent's version, git revision and Python.",
        labels=["version", "revision", "python_version"],
    )
    fam.add_metric([version, revision, python], 1)
    return fam


def agent_families(read_pids: Callable[[], Mapping[str, int | None] | None]) -> list[Metric]:
    """Build info, and each service's process metrics (``riklet_service_up`` when supervisord
    answered; the monitor alone when it did not)."""
    pids = read_pids()
    if pids is None:
        return [build_family(), *process_families({"monitor": os.getpid()})]
    return [build_family(), up_family(pids), *process_families(pids)]
