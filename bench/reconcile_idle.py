"""The reconciler's cost at rest and its speed: N idle ``sleep`` process pods on a real agent.

Prints one JSON object: the CPU the manager (and the four services together) burned over a
window while nothing changed, Apply->Running of one more pod, and how long deleting every pod
took (first Delete sent to an empty List). Run from the repository root, as root:

    .venv/bin/python -m bench.reconcile_idle --pods 1000 --window 30
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

from bench import cpu
from tests.stack import Agent, npb
from tests.support import wait_for

SERVICES = ("memory", "manager", "monitor", "proxy")
BATCH = 64  # the most replicas one document may ask for


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def apply_sleepers(agent: Agent, count: int) -> list[str]:
    names: list[str] = []
    for batch, start in enumerate(range(0, count, BATCH)):
        n = min(BATCH, count - start)
        doc = {"apiVersion": "v1", "kind": "Pod", "name": f"s{batch}", "replicas": n,
               "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 5,
                        "containers": [{"name": "c", "command": ["sleep", "1000000"]}]}}
        reply = agent.stub.Apply(npb.ApplyRequest(manifest=json.dumps(doc), format="json"), timeout=120)
        names += [p.name for p in reply.pods]
    return names


def phases(agent: Agent) -> dict[str, str]:
    return {p.name: p.phase for p in agent.stub.List(npb.ListRequest(), timeout=60).pods}


def apply_to_running(agent: Agent) -> float:
    doc = {"apiVersion": "v1", "kind": "Pod", "name": "probe",
           "spec": {"containers": [{"name": "c", "command": ["sleep", "1000000"]}]}}
    t0 = time.monotonic()
    agent.stub.Apply(npb.ApplyRequest(manifest=json.dumps(doc), format="json"), timeout=30)
    wait_for(lambda: agent.stub.Get(npb.GetRequest(name="probe"), timeout=5).phase == "Running",
             10, what="probe Running", interval=0.001)
    return time.monotonic() - t0


def idle_cpu(agent: Agent, window: float) -> dict[str, float]:
    pids = {s: agent.service_pid(s) for s in SERVICES}
    before = {s: cpu_seconds(p) for s, p in pids.items()}
    time.sleep(window)  # the measurement window itself, not synchronisation
    used = {s: cpu_seconds(p) - before[s] for s, p in pids.items()}
    return {"manager_pct": 100 * used["manager"] / window,
            "agent_pct": 100 * sum(used.values()) / window}


def delete_all(agent: Agent) -> dict[str, float]:
    """The time to delete every pod, and where the CPU went meanwhile: the manager, memory,
    and the whole machine (the shims' exits, mostly)."""
    names = list(phases(agent))
    pids = {s: agent.service_pid(s) for s in ("manager", "memory")}
    own = {s: cpu_seconds(p) for s, p in pids.items()}
    with open("/proc/stat", encoding="ascii") as fh:
        busy = cpu.busy_ticks(fh.read())
    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: agent.stub.Delete(npb.DeleteRequest(name=n), timeout=60), names))
    sent = time.monotonic() - t0
    wait_for(lambda: not agent.stub.List(npb.ListRequest(), timeout=60).pods, 300,
             what="every pod deleted", interval=0.25)  # List costs the manager CPU too
    took = time.monotonic() - t0
    with open("/proc/stat", encoding="ascii") as fh:
        machine = (cpu.busy_ticks(fh.read()) - busy) / cpu.CLK_TCK
    return {"delete_all_s": round(took, 2), "deletes_sent_s": round(sent, 2),
            "delete_cpu_manager_s": round(cpu_seconds(pids["manager"]) - own["manager"], 2),
            "delete_cpu_memory_s": round(cpu_seconds(pids["memory"]) - own["memory"], 2),
            "delete_cpu_machine_s": round(machine, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=200)
    parser.add_argument("--window", type=float, default=30.0)
    parser.add_argument("--settle", type=float, default=10.0)
    args = parser.parse_args()
    agent = Agent()
    agent.env["LOG_LEVEL"] = "INFO"  # the tests' DEBUG logging would be measured too
    agent.start()
    try:
        t0 = time.monotonic()
        apply_sleepers(agent, args.pods)
        wait_for(lambda: list(phases(agent).values()).count("Running") == args.pods, 600,
                 what=f"{args.pods} pods Running", interval=0.5)
        created = time.monotonic() - t0
        time.sleep(args.settle)  # let the creation's tail (status echoes) die down before measuring
        result = {"pods": args.pods, "create_s": round(created, 1), **idle_cpu(agent, args.window)}
        result["apply_to_running_ms"] = round(1000 * apply_to_running(agent), 1)
        result.update(delete_all(agent))
        print(json.dumps(result), flush=True)
    finally:
        agent.close()


if __name__ == "__main__":
    main()
