"""What health probes cost (issue 15): N process pods probed every ``--period`` seconds.

Starts a private agent and one helper process holding N loopback listeners that answer HTTP
(``bench.health_cost``'s listeners, with "http")
(each pod's "server": N real servers would measure the servers, not the prober). Then:

1. creates N ``sleep`` pods without probes, and measures the agent's CPU (its services, as
   ``make bench-scale`` counts them) over an idle window of ``--seconds``;
2. deletes them, creates N pods that each have an ``httpGet`` readiness probe and a
   ``tcpSocket`` liveness probe on their own listener, waits until every pod is ready, and
   measures the same window again.

The difference is what the probes cost, printed as % of one core beside the goal (a few % of a
core for 1,000 pods at 10 s), with the probe attempts per second and the CPU per attempt.

    make bench-probes                                   # 1000 pods, 10 s periods, 60 s windows
    .venv/bin/python -m bench.probes --pods 200 --period 10 --seconds 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench import scale_pods as pods
from bench import scale_proc as proc
from bench.health_cost import LISTENERS
from bench.scale import idle_cpu
from tests.stack import Agent, npb

GOAL_PERCENT = 3.0    # "a few % of a core" for 1,000 pods probed every 10 s

def manifest(name: str, port: int | None, period: int) -> str:
    container: dict[str, Any] = {"name": "c", "command": ["sleep", "infinity"]}
    if port is not None:
        container["readinessProbe"] = {"httpGet": {"path": "/healthz", "port": port},
                                       "periodSeconds": period}
        container["livenessProbe"] = {"tcpSocket": {"port": port}, "periodSeconds": period}
    return json.dumps({"name": name, "spec": {"containers": [container]}})


def create(agent: Agent, watcher: pods.Watcher, docs: dict[str, str]) -> None:
    with ThreadPoolExecutor(pods.CALLERS) as pool:
        list(pool.map(lambda d: agent.stub.Apply(npb.ApplyRequest(manifest=d), timeout=pods.RPC_TIMEOUT),
                      docs.values()))
    watcher.wait(lambda: len(docs.keys() & watcher.running.keys()), len(docs),
                 f"waiting for {len(docs)} pods to be Running")


def wait_ready(agent: Agent, count: int, timeout: float) -> float:
    """Seconds until List shows ``count`` pods ready."""
    t0 = time.monotonic()
    while True:
        ready = sum(1 for p in pods.all_pods(agent) if p.ready)
        if ready >= count:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"only {ready} of {count} pods ready after {timeout:.0f} s")
        time.sleep(0.5)


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) of one process so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        return proc.parse_stat(pid, fh.read()).ticks / proc.CLK_TCK


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pods", type=int, default=1000)
    ap.add_argument("--period", type=int, default=10, help="probe period, seconds")
    ap.add_argument("--seconds", type=float, default=60.0, help="each idle window")
    args = ap.parse_args(argv)
    servers = subprocess.Popen([sys.executable, "-c", LISTENERS, str(args.pods), "http"],
                               stdout=subprocess.PIPE, text=True)
    assert servers.stdout is not None
    # every listener bound before the agent picks its own free ports
    ports = [int(p) for p in servers.stdout.readline().split()]
    try:
        agent = Agent().start()
    except BaseException:
        servers.kill()
        raise
    watcher = pods.Watcher(agent).start()
    pods_root = os.path.join(agent.state_dir, "pods")
    try:
        create(agent, watcher, {f"plain-{i:05d}": manifest(f"plain-{i:05d}", None, args.period)
                                for i in range(args.pods)})
        time.sleep(5)   # the last status writes settle
        base_svc, _ = idle_cpu(agent, pods_root, args.seconds)
        pods.delete_all_at_once(agent, watcher, lambda: True)
        create(agent, watcher, {f"probed-{i:05d}": manifest(f"probed-{i:05d}", ports[i], args.period)
                                for i in range(args.pods)})
        to_ready = wait_ready(agent, args.pods, timeout=args.period * 3 + 60)
        time.sleep(5)
        served0 = cpu_of(servers.pid)
        probed_svc, _ = idle_cpu(agent, pods_root, args.seconds)
        served = 100 * (cpu_of(servers.pid) - served0) / args.seconds
        added = probed_svc - base_svc
        attempts = 2 * args.pods / args.period
        rows = [
            ("pods, each with an httpGet readiness and a tcpSocket liveness probe", f"{args.pods}"),
            ("probe period", f"{args.period} s"),
            ("probe attempts per second", f"{attempts:.0f}"),
            ("all pods ready after creation", f"{to_ready:.1f} s"),
            (f"agent CPU, {args.pods} pods without probes ({args.seconds:g} s idle)", f"{base_svc:.2f} %"),
            (f"agent CPU, {args.pods} pods with probes", f"{probed_svc:.2f} %"),
            ("CPU the probes add (% of one core)",
             f"{added:.2f} %  (goal <= {GOAL_PERCENT:g} %) {'OK' if added <= GOAL_PERCENT else 'MISSED'}"),
            ("CPU per probe attempt", f"{added * 1e4 / attempts:.0f} us" if attempts else "-"),
            ("the listeners' own CPU (the workloads answering, not riklet)", f"{served:.2f} %"),
        ]
        width = max(len(r[0]) for r in rows)
        print(f"\nprobe cost, {time.strftime('%Y-%m-%d %H:%M')} ({os.cpu_count()} cores)")
        for label, value in rows:
            print(f"  {label.ljust(width)}  {value}")
        return 0 if added <= GOAL_PERCENT else 1
    finally:
        watcher.close()
        agent.close()
        servers.kill()
        servers.wait()


if __name__ == "__main__":
    sys.exit(main())
