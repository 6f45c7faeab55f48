"""RIK-mode benchmark: metric cadence, CREATE -> RUNNING latency, reconnect after a scheduler
restart. One private agent driven by the test scheduler (written from the RIK contract).

    make bench-rik                     # 2 minutes of metrics at 500 ms, 100 instances
    .venv/bin/python -m bench.rik --metric-seconds 20 --instances 20
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

from tests.rik_scheduler import TestScheduler
from tests.stack import Agent
from tests.support import free_port

NODE = "bench-node"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cadence(scheduler: TestScheduler, seconds: float, resolution: float) -> None:
    first = len(scheduler.worker_metrics(NODE))
    time.sleep(seconds)  # the measurement window itself, not a synchronisation
    got = scheduler.worker_metrics(NODE)[first:]
    gaps = [(b.at - a.at) * 1000 for a, b in itertools.pairwise(got)]
    dev = [abs(g - resolution * 1000) for g in gaps]
    print(f"metric push at {resolution * 1000:.0f} ms over {seconds:.0f} s: {len(got)} pushes, "
          f"interval median {statistics.median(gaps):.1f} ms; "
          f"deviation median {statistics.median(dev):.1f} ms, max {max(dev):.1f} ms")


def create_latency(scheduler: TestScheduler, count: int) -> None:
    latencies = []
    for i in range(count):
        iid = f"bench-{i}"
        t0 = time.monotonic()
        scheduler.schedule(NODE, iid, {"apiVersion": "v1", "kind": "Pod", "name": "bench",
                                       "spec": {"containers": [{"name": "c", "command": ["sleep", "3600"]}]}})
        rec = scheduler.wait_instance(iid, "RUNNING", timeout=30)
        latencies.append((rec.at - t0) * 1000)
    print(f"CREATE sent -> RUNNING received ({count} instances): "
          f"median {statistics.median(latencies):.1f} ms, p99 {percentile(latencies, 0.99):.1f} ms")


def reconnect(scheduler: TestScheduler, count: int, down: float) -> TestScheduler:
    scheduler.stop()
    time.sleep(down)  # how long the scheduler stays away, part of the scenario
    fresh = TestScheduler(scheduler.port).start()
    t0 = time.monotonic()
    fresh.wait(lambda: fresh.registrations, 120, "re-registration")
    t_reg = fresh.registrations[0][0] - t0
    fresh.wait_ready(NODE, 120)
    t_ready = time.monotonic() - t0
    fresh.wait(lambda: all(fresh.instance_statuses(f"bench-{i}") for i in range(count)), 120,
               "every instance re-sent")
    t_all = time.monotonic() - t0
    print(f"scheduler restart after {down:.0f} s down: re-registered {t_reg * 1000:.0f} ms, Ready "
          f"{t_ready * 1000:.0f} ms, all {count} instances re-sent {t_all * 1000:.0f} ms")
    return fresh


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--metric-seconds", type=float, default=120)
    parser.add_argument("--resolution", type=float, default=0.5)
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--down", type=float, default=2.0)
    args = parser.parse_args()
    scheduler = TestScheduler(free_port()).start()
    agent = Agent(f"scheduler:\n  address: {scheduler.address}\nnode:\n  id: {NODE}\n"
                  f"monitoring:\n  metric_resolution: {args.resolution}s\n").start()
    try:
        scheduler.wait_ready(NODE, 30)
        cadence(scheduler, args.metric_seconds, args.resolution)
        create_latency(scheduler, args.instances)
        scheduler = reconnect(scheduler, args.instances, args.down)
    finally:
        agent.close()
        scheduler.stop()


if __name__ == "__main__":
    main()
