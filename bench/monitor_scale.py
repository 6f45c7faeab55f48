"""The monitor's cost at scale: N real pod cgroups, each with a sleeping process in its
container's group, measured by a real ``python -m services.monitor`` fed by a stand-in memory.

Reports the monitor's CPU (utime + stime, % of one core) while idle (nobody asks) and while
scraped every 5 s, the latency of ``/metrics`` (and the monitor's CPU per scrape, which a busy
machine inflates less than the latency) and of the ``pods.realtime`` IPC query.
Needs root and writable cgroups (v1 cpu/cpuacct/memory, or v2). Usage::

    python -m bench.monitor_scale --pods 1000 --seconds 30
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common import cgroups
from common.zmqutil import RequestClient
from tests.memory_fake import FakeMemory
from tests.support import free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def pod_record(i: int, parent: str, pid: int) -> dict[str, Any]:
    name = f"p{i}"
    return {"name": name, "uid": uuid.uuid4().hex, "version": 2, "generation": 1, "desired": "running",
            "created_at": time.time(),
            "spec": {"workload": name, "containers": [{"name": "app", "image": None,
                                                       "command": ["sleep", "3600"], "resources": {}}]},
            "status": {"phase": "Running", "cgroup": f"{parent}/{name}", "pids": [pid],
                       "internalIp": "127.0.0.1", "restartCount": 0,
                       "containers": [{"name": "app", "state": "running", "pid": pid, "restartCount": 0,
                                       "cgroup": f"{parent}/{name}/app"}]}}


@contextmanager
def sleeping_pods(count: int) -> Iterator[tuple[str, list[int]]]:
    """``count`` pod groups ``<parent>/p<i>/app`` with a ``sleep`` in each; removed after."""
    layout = cgroups.detect()
    if not layout.available:
        raise SystemExit("no writable cgroup hierarchy")
    parent = f"riklet-bench-{uuid.uuid4().hex[:8]}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(count):
            group = cgroups.Cgroup(f"{parent}/p{i}/app", layout)
            group.create()
            procs.append(subprocess.Popen(["sleep", "3600"], preexec_fn=_joiner(group)))
        yield parent, [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        wait_for(lambda: not cgroups.prune(parent), 30, what="bench cgroups removed")


def _joiner(group: cgroups.Cgroup) -> Callable[[], None]:
    return lambda: group.add(os.getpid())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK   # utime, stime


def scrape(address: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as resp:
        body = resp.read().decode()
    return time.perf_counter() - t0, body


def cpu_percent(pid: int, seconds: float, during: Callable[[], None] | None = None) -> float:
    c0, t0 = cpu_seconds(pid), time.monotonic()
    while time.monotonic() - t0 < seconds:
        if during is not None:
            during()
        time.sleep(min(5.0, max(0.0, seconds - (time.monotonic() - t0))))
    return 100 * (cpu_seconds(pid) - c0) / (time.monotonic() - t0)


def run(pods: int, seconds: float, scrapes: int, resolution: str, checkout: Path = ROOT) -> dict[str, Any]:
    base = tempfile.mkdtemp(prefix="rkmb", dir="/tmp")
    run_dir, address = os.path.join(base, "run"), f"127.0.0.1:{free_port()}"
    os.makedirs(run_dir, mode=0o700)
    env = {k: v for k, v in os.environ.items() if k != "RIKLET_CONFIG"}
    env.update(RIKLET_RUN_DIR=run_dir, RIKLET_STATE_DIR=os.path.join(base, "state"),
               RIKLET_METRICS_ADDRESS=address, NODE_ID="bench", LOG_LEVEL="WARNING",
               RIKLET_METRIC_RESOLUTION=resolution)
    out: dict[str, Any] = {"pods": pods}
    with sleeping_pods(pods) as (parent, pids):
        memory = FakeMemory(f"ipc://{run_dir}/memory.sock", f"ipc://{run_dir}/memory-events.sock",
                            [pod_record(i, parent, pid) for i, pid in enumerate(pids)])
        log = open(os.path.join(base, "monitor.log"), "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen([sys.executable, "-m", "services.monitor"], cwd=checkout, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        client = RequestClient(f"ipc://{run_dir}/monitor.sock", timeout=30, retries=0)
        try:
            wait_for(lambda: scrape(address)[1].count("riklet_pod_memory_usage_bytes{") == pods, 120,
                     what=f"{pods} pods on /metrics", interval=1.0)
            time.sleep(float(resolution.rstrip("s")) * 2)   # let start-up work settle
            out["idle_cpu_percent"] = round(cpu_percent(proc.pid, seconds), 2)
            out["scraped_every_5s_cpu_percent"] = round(
                cpu_percent(proc.pid, seconds, lambda: scrape(address)), 2)
            c0, t0 = cpu_seconds(proc.pid), time.monotonic()
            lat = sorted(scrape(address)[0] for _ in range(scrapes))
            busy = cpu_seconds(proc.pid) - c0 - out["idle_cpu_percent"] / 100 * (time.monotonic() - t0)
            out["scrape_ms"] = {"median": round(1000 * statistics.median(lat), 1),
                                "max": round(1000 * lat[-1], 1),
                                "monitor_cpu_per_scrape": round(1000 * busy / scrapes, 1)}
            ipc_lat = []
            for _ in range(scrapes):
                t0 = time.perf_counter()
                assert len(client.call("pods.realtime")["pods"]) == pods
                ipc_lat.append(time.perf_counter() - t0)
            out["pods_realtime_ms"] = {"median": round(1000 * statistics.median(ipc_lat), 1),
                                       "max": round(1000 * max(ipc_lat), 1)}
            out["memory_requests"] = dict(memory.requests)
        finally:
            client.close()
            proc.terminate()
            proc.wait(timeout=30)
            log.close()
            memory.close()
            shutil.rmtree(base, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=30.0, help="each CPU measuring window")
    ap.add_argument("--scrapes", type=int, default=20)
    ap.add_argument("--resolution", default="5s", help="monitoring.metric_resolution")
    ap.add_argument("--checkout", type=Path, default=ROOT,
                    help="run the monitor of another source tree (e.g. a `git archive` of an older commit)")
    args = ap.parse_args()
    print(json.dumps(run(args.pods, args.seconds, args.scrapes, args.resolution, args.checkout), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
