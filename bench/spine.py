"""Spine benchmark: time from Apply to the pod observed Running, and the agent's memory.

Starts a private agent (supervisord and the four services), then creates N process pods one
after another through the Node API, timing each from the Apply call to the first Watch event
that shows it Running. Prints median and p99, and the total RSS (supervisord plus the four
services; shims and workloads are not the agent) with 0 pods and with N pods.

    make bench-spine            # N=100
    .venv/bin/python -m bench.spine --pods 20
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import threading
import time

import grpc
import psutil

from tests.stack import Agent, npb


def agent_rss(agent: Agent) -> int:
    """supervisord, the four services and the proxy's worker (the keeper's child)."""
    services = ("memory", "manager", "monitor", "proxy")
    pids = [agent.supervisord_pid(), *(agent.service_pid(s) for s in services), *agent.proxy_workers()]
    return sum(psutil.Process(p).memory_info().rss for p in pids)


def settle_rss(agent: Agent, seconds: float = 3.0) -> int:
    """RSS after the agent has been idle for a moment (caches warmed, no pod starting)."""
    deadline = time.monotonic() + seconds
    rss = agent_rss(agent)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        rss = agent_rss(agent)
    return rss


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pods", type=int, default=100)
    args = parser.parse_args()
    agent = Agent().start()
    try:
        rss0 = settle_rss(agent)
        running: queue.Queue[tuple[str, float]] = queue.Queue()
        seen: set[str] = set()
        creating: dict[str, float] = {}

        def watch() -> None:
            try:
                for ev in agent.stub.Watch(npb.WatchRequest()):
                    now = time.perf_counter()
                    if ev.pod.phase == "Creating":
                        creating.setdefault(ev.pod.name, now)
                    if ev.pod.phase == "Running" and ev.pod.name not in seen:
                        seen.add(ev.pod.name)
                        running.put((ev.pod.name, now))
            except grpc.RpcError:
                pass  # the agent is stopping

        threading.Thread(target=watch, daemon=True).start()
        time.sleep(0.5)  # let the Watch stream open before the first Apply
        latencies, replies, starts = [], [], []
        for i in range(args.pods):
            name = f"bench-{i}"
            manifest = {"apiVersion": "v1", "kind": "Pod", "name": name,
                        "spec": {"containers": [{"name": "c", "command": ["sleep", "3600"]}]}}
            t0 = time.perf_counter()
            agent.stub.Apply(npb.ApplyRequest(manifest=json.dumps(manifest)), timeout=30)
            replies.append(time.perf_counter() - t0)
            while True:
                got, t1 = running.get(timeout=30)
                if got == name:
                    latencies.append(t1 - t0)
                    starts.append(t1 - creating.get(name, t0))
                    break
        rss_n = settle_rss(agent)
        ms = [x * 1000 for x in latencies]
        print(f"pods: {args.pods}")
        for label, values in (("apply -> Running", ms), ("  Apply call", [x * 1000 for x in replies]),
                              ("  Creating -> Running", [x * 1000 for x in starts])):
            print(f"{label}: median {statistics.median(values):.1f} ms, "
                  f"p99 {percentile(values, 0.99):.1f} ms, max {max(values):.1f} ms")
        print(f"agent RSS (supervisord, 4 services, proxy worker): {rss0 / 2**20:.1f} MiB with 0 pods, "
              f"{rss_n / 2**20:.1f} MiB with {args.pods} pods")
    finally:
        agent.close()


if __name__ == "__main__":
    main()
