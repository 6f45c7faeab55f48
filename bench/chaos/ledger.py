"""What each pod must be after the last acknowledged call for it, and the churn that makes it.

Pods are process pods running ``sleep 3600`` with two environment variables: CHAOS_TAG
(``<run>:<pod>``, unique to this run, how /proc finds the workload) and CHAOS_GEN (the spec's
generation: an "update" bumps it, which changes the spec)."""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import grpc

from tests.stack import Agent, npb

CALL_TIMEOUT = 10.0
FAIL_PAUSE = 0.1  # after a failed call: the service is down, do not spin
HISTORY = 6


class Want(Enum):
    PRESENT = "present"
    DELETED = "deleted"


@dataclass
class Entry:
    want: Want = Want.DELETED
    gen: int = 0            # generation of the last acknowledged spec
    uncertain: Want | None = None  # the intent of a call that failed: its effect is unknown
    uncertain_gen: int = 0
    history: list[str] = field(default_factory=list)  # the last calls, to explain a count

    def note(self, started: float, what: str) -> None:
        self.history = [*self.history[-(HISTORY - 1):], f"{time.monotonic() - started:+.2f}s {what}"]


def manifest(run: str, name: str, gen: int) -> str:
    env = [{"name": "CHAOS_TAG", "value": f"{run}:{name}"}, {"name": "CHAOS_GEN", "value": str(gen)}]
    return json.dumps({"apiVersion": "v1", "kind": "Pod", "name": name,
                       "spec": {"terminationGracePeriodSeconds": 0, "restartPolicy": "Always",
                                "containers": [{"name": "c", "command": ["sleep", "3600"], "env": env}]}})


class Ledger:
    """Thread-safe: the churn, the race's workers and the resolver share it."""

    def __init__(self, run: str, names: list[str]) -> None:
        self.run = run
        self.entries = {name: Entry() for name in names}
        self.acked = 0
        self.attempted = 0
        self.records_lost: list[str] = []  # NotFound while the pod was expected, and after what
        self.errors: dict[str, int] = {}   # failed calls by status code (expected under faults)
        self._lock = threading.Lock()
        self.started = time.monotonic()

    def apply(self, agent: Agent, name: str, gen: int | None = None) -> bool:
        """Apply NAME at GEN (default: its current generation); True when acknowledged."""
        with self._lock:
            entry = self.entries[name]
            gen = entry.gen if gen is None else gen
            self.attempted += 1
        try:
            agent.stub.Apply(npb.ApplyRequest(manifest=manifest(self.run, name, gen)), timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            self._failed(name, Want.PRESENT, gen, exc)
            return False
        with self._lock:
            entry.want, entry.gen, entry.uncertain = Want.PRESENT, gen, None
            entry.note(self.started, f"apply gen {gen}: ok")
            self.acked += 1
        return True

    def delete(self, agent: Agent, name: str) -> bool:
        with self._lock:
            entry = self.entries[name]
            expected = entry.want is Want.PRESENT and entry.uncertain is None
            self.attempted += 1
        outcome = "ok"
        try:
            agent.stub.Delete(npb.DeleteRequest(name=name), timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                self._failed(name, Want.DELETED, entry.gen, exc)
                return False
            outcome = "NOT_FOUND"
        with self._lock:
            entry.note(self.started, f"delete: {outcome}")
            if outcome == "NOT_FOUND" and expected:
                self.records_lost.append(f"{name}: Delete found no record after "
                                         + ", ".join(entry.history))
            entry.want, entry.uncertain = Want.DELETED, None
            self.acked += 1
        return True

    def check(self, agent: Agent, name: str) -> None:
        """Get NAME: a NotFound while the ledger expects the pod is a lost record (what the
        next apply would otherwise recreate unnoticed)."""
        with self._lock:
            entry = self.entries[name]
            expected = entry.want is Want.PRESENT and entry.uncertain is None
        try:
            agent.stub.Get(npb.GetRequest(name=name), timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND and expected:
                with self._lock:
                    entry.note(self.started, "get: NOT_FOUND")
                    self.records_lost.append(f"{name}: Get found no record after " + ", ".join(entry.history))
                    entry.want = Want.DELETED

    def _failed(self, name: str, intent: Want, gen: int, exc: grpc.RpcError) -> None:
        code = exc.code().name if isinstance(exc, grpc.Call) else type(exc).__name__
        with self._lock:
            entry = self.entries[name]
            entry.uncertain, entry.uncertain_gen = intent, gen
            entry.note(self.started, f"{'apply' if intent is Want.PRESENT else 'delete'}: {code}")
            self.errors[code] = self.errors.get(code, 0) + 1
        time.sleep(FAIL_PAUSE)

    def resolve(self, agent: Agent, timeout: float = 60.0) -> list[str]:
        """Repeat each uncertain pod's intended call until acknowledged; the names still
        uncertain at the deadline (reported, and left out of the counts)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = [(n, e) for n, e in self.entries.items() if e.uncertain is not None]
            if not pending:
                return []
            for name, entry in pending:
                if entry.uncertain is Want.PRESENT:
                    self.apply(agent, name, entry.uncertain_gen)
                else:
                    self.delete(agent, name)
        return sorted(n for n, e in self.entries.items() if e.uncertain is not None)

    def expected(self) -> dict[str, Entry]:
        with self._lock:
            return {n: Entry(e.want, e.gen) for n, e in self.entries.items() if e.uncertain is None}

    def summary(self) -> dict[str, Any]:
        return {"acked": self.acked, "attempted": self.attempted, "errors": dict(self.errors)}


class Churn:
    """A thread of random Apply / Delete / re-Apply / update calls over the ledger's pods,
    paced by PACE seconds, until OPS calls were made or it is stopped."""

    def __init__(self, agent: Agent, ledger: Ledger, ops: int, seed: int, pace: float = 0.02) -> None:
        self.agent, self.ledger, self.ops, self.pace = agent, ledger, ops, pace
        self.rng = random.Random(seed)
        self.stopped = threading.Event()
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="churn", daemon=True)

    def start(self) -> Churn:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        self._thread.join()

    def wait_attempted(self, count: int, timeout: float = 120.0) -> None:
        """Until the churn has made COUNT calls (or ended): to place a fault mid-churn."""
        deadline = time.monotonic() + timeout
        while self.ledger.attempted < count and not self.done.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)

    def _run(self) -> None:
        try:
            while self.ledger.attempted < self.ops and not self.stopped.is_set():
                self._one()
                time.sleep(self.pace)
        finally:
            self.done.set()

    def _one(self) -> None:
        name = self.rng.choice(sorted(self.ledger.entries))
        entry = self.ledger.entries[name]
        if entry.want is Want.DELETED and entry.uncertain is None:
            self.ledger.apply(self.agent, name)
            return
        roll = self.rng.random()
        if roll < 0.45:
            self.ledger.delete(self.agent, name)
        elif roll < 0.65:
            self.ledger.apply(self.agent, name)  # the same spec again: a no-op that must stay one
        else:
            self.ledger.apply(self.agent, name, entry.gen + 1)  # an update: the workload restarts
