"""After the churn: what the agent shows against the ledger (definitions in bench.chaos)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import grpc

from bench.chaos.ledger import Entry, Want
from tests.stack import Agent, npb, pid_alive

POLL = 0.25


@dataclass(frozen=True)
class Workload:
    pid: int
    gen: int


@dataclass
class Counts:
    lost: int = 0
    duplicated: int = 0
    orphaned: int = 0
    records_lost: int = 0
    unverified: bool = False  # the API did not answer: nothing could be checked
    services_down: str = ""   # services not RUNNING at the last poll ("memory BACKOFF, ...")
    detail: list[str] = field(default_factory=list)
    names: set[str] = field(default_factory=set)  # the pods counted in any column

    def clean(self) -> bool:
        return not (self.lost or self.duplicated or self.orphaned or self.records_lost or self.unverified)


def workloads(run: str) -> dict[str, list[Workload]]:
    """Live processes carrying this run's marker, by pod name (from /proc/PID/environ)."""
    prefix = f"CHAOS_TAG={run}:".encode()
    found: dict[str, list[Workload]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        tag = next((v for v in env if v.startswith(prefix)), None)
        if tag is None or not pid_alive(int(entry)):
            continue
        gen = next((v.split(b"=", 1)[1] for v in env if v.startswith(b"CHAOS_GEN=")), b"-1")
        name = tag[len(prefix):].decode()
        found.setdefault(name, []).append(Workload(int(entry), int(gen) if gen.isdigit() else -1))
    return found


def _pod_gen(pod: npb.Pod) -> int:
    try:
        env = json.loads(pod.spec_json)["containers"][0]["env"]
        return int(env.get("CHAOS_GEN", -1))
    except (ValueError, KeyError, IndexError, TypeError):
        return -1


def _running_pids(pod: npb.Pod) -> set[int]:
    return {c.pid for c in pod.containers if c.state == "running" and c.pid > 0}


def count(pods: dict[str, npb.Pod], procs: dict[str, list[Workload]], expected: dict[str, Entry]) -> Counts:
    """Pure: the four counts of one observation."""
    out = Counts()
    for name, entry in sorted(expected.items()):
        live = procs.get(name, [])
        if entry.want is Want.DELETED:
            out.orphaned += len(live)
            if live:
                out.names.add(name)
                out.detail.append(f"{name}: deleted but {len(live)} workload(s) alive")
            continue
        pod = pods.get(name)
        if pod is None:
            out.records_lost += 1
            out.names.add(name)
            out.detail.append(f"{name}: record gone")
        else:
            pids = _running_pids(pod)
            current = [w for w in live if w.pid in pids]
            if pod.phase != "Running" or not current or _pod_gen(pod) != entry.gen \
                    or any(w.gen != entry.gen for w in current):
                out.lost += 1
                out.names.add(name)
                out.detail.append(f"{name}: {pod.phase} pids {sorted(pids)} gen {_pod_gen(pod)}/{entry.gen}")
        out.duplicated += max(0, len(live) - 1)
        if live and (pod is None or not any(w.pid in _running_pids(pod) for w in live)):
            out.orphaned += 1
        if len(live) > 1 or (live and pod is None):
            out.names.add(name)
            out.detail.append(f"{name}: workloads {sorted(w.pid for w in live)}")
    return out


def observe(agent: Agent, run: str, expected: dict[str, Entry]) -> Counts:
    pods = {p.name: p for p in agent.stub.List(npb.ListRequest(), timeout=5).pods}
    return count(pods, workloads(run), expected)


def settle(agent: Agent, run: str, expected: dict[str, Entry], timeout: float) -> tuple[Counts, float]:
    """Poll until the services run and every count is 0, or the deadline: (last counts, seconds).
    Counts from a poll where the API did not answer are marked unverified."""
    started = time.monotonic()
    last = Counts(unverified=True, detail=["the API never answered while settling"])
    while True:
        try:
            statuses = agent.statuses()
            last = observe(agent, run, expected)
            down = {k: v for k, v in statuses.items() if v != "RUNNING"}
            last.services_down = ", ".join(f"{k} {v}" for k, v in sorted(down.items()))
            if not down and last.clean():
                return last, time.monotonic() - started
        except grpc.RpcError as exc:
            last = Counts(unverified=True, detail=[f"List failed: {exc.code().name}"])
        if time.monotonic() - started > timeout:
            return last, time.monotonic() - started
        time.sleep(POLL)
