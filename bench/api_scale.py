"""Node API cost as the node fills up: Apply latency and List latency at 0, 500, 1000 pods.

Starts a private agent (supervisord and the four services, the reconciler running), then fills
it with realistic process pods (``sleep``) through the Node API, a few clients at a time. At
each checkpoint it times single Apply calls of new pods (one after another) and whole List calls
(every pod, the way ``rikletctl get pods`` fetches them) and prints the medians.

    .venv/bin/python -m bench.api_scale --checkpoints 0,500,1000
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Callable

from tests.stack import Agent, npb


def manifest(name: str) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "Pod", "name": name,
                       "spec": {"containers": [{"name": "c", "command": ["sleep", "3600"]}]}})


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def list_all(agent: Agent, page: int) -> list[npb.Pod]:
    """Every pod, fetched in pages of ``page`` when the API offers paging (0: one call)."""
    pods: list[npb.Pod] = []
    token = ""
    while True:
        request = npb.ListRequest()
        if page and "limit" in npb.ListRequest.DESCRIPTOR.fields_by_name:
            request = npb.ListRequest(limit=page, continue_token=token)
        reply = agent.stub.List(request, timeout=60)
        pods.extend(reply.pods)
        token = getattr(reply, "continue_token", "")
        if not token:
            return pods


def settle(agent: Agent, count: int, page: int, deadline: float = 600) -> float:
    """Wait until ``count`` pods run (the node at rest, as a user would measure it)."""
    start = time.monotonic()
    while sum(p.phase == "Running" for p in list_all(agent, page)) < count:
        if time.monotonic() - start > deadline:
            raise SystemExit(f"fewer than {count} pods running after {deadline} s")
        time.sleep(1)
    return time.monotonic() - start


def fill(agent: Agent, names: list[str], clients: int) -> float:
    """Apply ``names`` from ``clients`` threads; returns the applies per second."""
    todo = list(names)
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if not todo:
                    return
                name = todo.pop()
            agent.stub.Apply(npb.ApplyRequest(manifest=manifest(name)), timeout=120)

    start = time.perf_counter()
    threads = [threading.Thread(target=work) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(names) / max(time.perf_counter() - start, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoints", default="0,500,1000")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--page", type=int, default=500)
    args = parser.parse_args()
    checkpoints = [int(c) for c in args.checkpoints.split(",")]
    agent = Agent().start()
    made = 0
    try:
        for target in checkpoints:
            if target > made:
                rate = fill(agent, [f"fill-{i}" for i in range(made, target)], args.clients)
                print(f"filled {made}->{target} pods at {rate:.0f} applies/s", flush=True)
                made = target
            waited = settle(agent, made, args.page)
            applies = []
            for i in range(args.samples):
                name = f"probe-{target}-{i}"
                applies.append(timed(lambda n=name: agent.stub.Apply(  # type: ignore[misc]
                    npb.ApplyRequest(manifest=manifest(n)), timeout=30)))
            made += args.samples
            # The same manifest again: the whole apply path, but no pod to start meanwhile.
            reapplies = [timed(lambda n=f"probe-{target}-{i}": agent.stub.Apply(  # type: ignore[misc]
                npb.ApplyRequest(manifest=manifest(n)), timeout=30)) for i in range(args.samples)]
            lists = [timed(lambda: list_all(agent, args.page)) for _ in range(5)]
            probe = npb.GetRequest(name=f"probe-{target}-0")
            gets = [timed(lambda p=probe: agent.stub.Get(p, timeout=30))  # type: ignore[misc]
                    for _ in range(args.samples)]
            print(f"pods={made:5d} (settled in {waited:4.0f} s) "
                  f"apply median {statistics.median(applies):6.1f} ms "
                  f"max {max(applies):6.1f} | unchanged apply median {statistics.median(reapplies):5.1f} ms "
                  f"| list median {statistics.median(lists):6.1f} ms "
                  f"| get median {statistics.median(gets):5.1f} ms", flush=True)
    finally:
        agent.close()


if __name__ == "__main__":
    main()
