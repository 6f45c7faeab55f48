"""What the kernel data path's endpoint health checks cost: N listeners on loopback (in a
helper process that accepts and closes), probed every ``--interval`` by the proxy's
``HealthChecker`` on uvloop, as in production, in a process of their own; the prober's CPU
(user + system of that process) over a steady window.

    python -m bench.health_cost --endpoints 1000 --interval 2 --seconds 20

Prints one JSON line (``--json``) or a short table beside the goal (a few % of a core).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import time

import uvloop

from services.proxy.kernel.health import HealthChecker
from services.proxy.routes import Endpoint

GOAL_PERCENT = 3.0

# Run in a helper process: many listeners on loopback that serve as a workload does: accept, read
# (a request that never comes), close on EOF. Prints their ports. With "http" after the count,
# each request gets an empty 200 and the connection is closed (bench.probes' servers).
LISTENERS = """
import selectors, socket, sys
HTTP = b"HTTP/1.1 200 OK\\r\\nContent-Length: 0\\r\\nConnection: close\\r\\n\\r\\n"
ANSWER = HTTP if sys.argv[2:] == ["http"] else b""
sel = selectors.DefaultSelector()
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(128)
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ, True)
print(" ".join(str(k.fileobj.getsockname()[1]) for k in sel.get_map().values()), flush=True)
while True:
    for key, _ in sel.select():
        try:
            if key.data:
                conn = key.fileobj.accept()[0]
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ, False)
            else:
                data = key.fileobj.recv(4096)
                if data and ANSWER:
                    key.fileobj.send(ANSWER)
                if not data or ANSWER:
                    sel.unregister(key.fileobj)
                    key.fileobj.close()
        except OSError:
            sel.unregister(key.fileobj)
            key.fileobj.close()
"""


class Changes:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def probing_cost(endpoints: int, interval: float, seconds: float) -> dict[str, float]:
    """Probe ``endpoints`` listeners every ``interval``; measured in this process, so call it in
    a process that runs nothing else (``main`` does)."""
    helper = subprocess.Popen([sys.executable, "-c", LISTENERS, str(endpoints)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert helper.stdout is not None
        eps = [Endpoint("127.0.0.1", int(p)) for p in helper.stdout.readline().split()]
        if len(eps) != endpoints:
            raise RuntimeError(f"the helper opened {len(eps)} listeners of {endpoints}")
        result: dict[str, float] = {}

        async def run() -> None:
            changes = Changes()
            checker = HealthChecker(changes, interval=interval, timeout=1.0)
            checker.watch(eps)
            checker.start()
            await asyncio.sleep(interval)          # every endpoint has had its first probe
            cpu, wall, probes = _cpu_seconds(), time.monotonic(), checker.probes
            await asyncio.sleep(seconds)           # the measured window: nothing to wait for
            cpu, wall = _cpu_seconds() - cpu, time.monotonic() - wall
            done = checker.probes - probes
            result.update(endpoints=endpoints, interval=interval, seconds=round(wall, 2),
                          cpu_percent=round(100 * cpu / wall, 2), probes_per_s=round(done / wall, 1),
                          us_per_probe=round(1e6 * cpu / max(1, done), 1),
                          unhealthy=sum(not checker.healthy(ep) for ep in eps),
                          on_change=changes.calls, in_flight_at_end=checker.in_flight)
            await checker.close()

        uvloop.run(run())
        return result
    finally:
        helper.terminate()
        helper.wait(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoints", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--json", action="store_true", help="one JSON line, for tests")
    args = parser.parse_args(argv)
    cost = probing_cost(args.endpoints, args.interval, args.seconds)
    if args.json:
        print(json.dumps(cost), flush=True)
        return 0
    mark = "✓" if cost["cpu_percent"] <= GOAL_PERCENT else "✗"
    print(f"health checks: {args.endpoints} endpoints every {args.interval:g} s, "
          f"{cost['seconds']:g} s window")
    print(f"  prober CPU        {cost['cpu_percent']:6.2f} % of a core   (goal ≤ {GOAL_PERCENT:g} %) {mark}")
    print(f"  probes per second {cost['probes_per_s']:8.1f}")
    print(f"  CPU per probe     {cost['us_per_probe']:8.1f} µs")
    print(f"  unhealthy         {cost['unhealthy']:6d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
