"""Requests/s and latency of the CHaS API's ``GET /containers`` with N pods, in-process over
loopback (the core's memory is a stub answering N records at once): the HTTP edge's own cost.
Also the process's PSS once the server has served. Run from a checkout's root:

    python -m bench.chas_http [pods] [seconds]
"""

from __future__ import annotations

import http.client
import multiprocessing
import statistics
import sys
import time
from typing import Any

TOKEN = "t" * 32


class _Memory:
    endpoint = "ipc:///nonexistent/memory.sock"

    def __init__(self, n: int) -> None:
        self.records = [{"uid": f"{i:032x}", "name": f"pod-{i:04d}", "desired": "running",
                         "spec": {"containers": [{"name": "c", "image": "nginx:latest"}],
                                  "ports": [{"port": 30000 + i, "target_port": 80, "protocol": "TCP"}]},
                         "status": {"phase": "Running", "containers": [{"name": "c", "ready": True}]}}
                        for i in range(n)]

    def list(self) -> list[dict[str, Any]]:
        return list(self.records)


class _Service:
    def __init__(self, n: int) -> None:
        self.memory = _Memory(n)
        self.mirror = None


def _client(port: int, seconds: float, out: Any) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    times = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        conn.request("GET", "/containers", headers={"Authorization": f"Bearer {TOKEN}"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
        times.append(time.perf_counter() - t0)
    out.put(times)


def pss_kib() -> int:
    with open("/proc/self/smaps_rollup", encoding="ascii") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("Pss:"))


def main() -> None:
    from services.manager.chas.api import ChasApi
    from services.manager.chas.stats import ChasStats

    pods = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 5.0
    api = ChasApi(_Service(pods), ChasStats(), host="127.0.0.1", port=0,  # type: ignore[arg-type]
                  token=lambda: TOKEN, host_ports=(30000, 32767), ssl_context=None,
                  started_at=time.time(), disk_path="/tmp")
    api.start()
    try:
        for clients in (1, 4):
            out: Any = multiprocessing.Queue()
            procs = [multiprocessing.Process(target=_client, args=(api.port, seconds, out))
                     for _ in range(clients)]
            for p in procs:
                p.start()
            times = [t for _ in procs for t in out.get()]
            for p in procs:
                p.join()
            print(f"{pods} pods, {clients} keep-alive client(s): {len(times) / seconds:.0f} req/s, "
                  f"p50 {statistics.median(times) * 1000:.2f} ms, "
                  f"p99 {statistics.quantiles(times, n=100)[98] * 1000:.2f} ms")
        print(f"PSS of this process: {pss_kib() / 1024:.1f} MiB")
    finally:
        api.stop()


if __name__ == "__main__":
    main()
