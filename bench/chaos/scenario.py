"""One scenario's frame: a fresh agent, the churn, the fault beside it, resolve, settle, check,
clean up. A fault is a function of the Context; it adds notes and failed checks to it."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.chaos.harness import SERVICES, ChaosAgent, RestartWatch, kill_pids, wait_dead
from bench.chaos.ledger import Churn, Ledger
from bench.chaos.verify import Counts, settle, workloads


@dataclass(frozen=True)
class Settings:
    ops: int = 150          # Node API calls of the churn per scenario (the race: rounds)
    pods: int = 10          # distinct pod names the churn works on
    seed: int = 1
    settle: float = 30.0    # seconds to wait for the agent to agree with the ledger
    run: str = "chaos"      # marker prefix unique to this run


@dataclass
class Context:
    agent: ChaosAgent
    ledger: Ledger
    churn: Churn | None
    settings: Settings
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, message: str) -> None:
        """A scenario check: MESSAGE goes to the notes, and to the failures when not OK."""
        self.notes.append(message)
        if not ok:
            self.failures.append(message)


@dataclass
class Row:
    name: str
    acked: int
    counts: Counts
    restarts: dict[str, int]
    notes: list[str]
    failures: list[str]
    seconds: float

    @property
    def failed(self) -> bool:
        return bool(self.failures) or not self.counts.clean()


Fault = Callable[[Context], None]


@dataclass(frozen=True)
class Scenario:
    name: str
    fault: Fault
    churn: bool = True      # False: the fault drives the ledger itself (the race)
    prefix: str = "c"       # pod names: PREFIX0, PREFIX1, ...


def run(scenario: Scenario, settings: Settings) -> Row:
    started = time.monotonic()
    marker = f"{settings.run}.{scenario.name}"
    agent = ChaosAgent()
    agent.start()
    ledger = Ledger(marker, [f"{scenario.prefix}{i}" for i in range(settings.pods)])
    churn = Churn(agent, ledger, settings.ops, settings.seed) if scenario.churn else None
    ctx = Context(agent, ledger, churn, settings)
    try:
        with RestartWatch(agent) as watch:
            _drive(scenario, ctx)
            counts, took = settle(agent, marker, ledger.expected(), settings.settle)
            restarts = watch.counts()
        counts.records_lost += len(ledger.records_lost)
        counts.detail += ledger.records_lost
        counts.detail += [f"{n} history: " + ", ".join(ledger.entries[n].history)
                          for n in sorted(counts.names) if n in ledger.entries]
        ctx.check(not counts.services_down, f"services not RUNNING after settling: {counts.services_down}"
                  if counts.services_down else "services RUNNING")
        ctx.notes.append(f"settled in {took:.1f}s" if counts.clean() and not counts.services_down
                         else f"not settled after {took:.0f}s")
    finally:
        _cleanup(agent, marker)
    return Row(scenario.name, ledger.acked, counts, restarts, ctx.notes, ctx.failures,
               time.monotonic() - started)


def _drive(scenario: Scenario, ctx: Context) -> None:
    if ctx.churn is not None:
        ctx.churn.start()
    try:
        scenario.fault(ctx)
    except Exception as exc:  # a fault step that breaks is a finding, not a crash of the suite
        ctx.failures.append(f"fault step failed: {exc!r}"[:300])
    if ctx.churn is not None:
        ctx.churn.done.wait(timeout=300)
        ctx.churn.stop()
    unresolved = ctx.ledger.resolve(ctx.agent)
    ctx.check(not unresolved, f"uncertain after 60s of retries: {', '.join(unresolved)}"
              if unresolved else f"calls failed under the fault: {ctx.ledger.errors or 0}")
    for name in unresolved:
        ctx.ledger.entries.pop(name)


def _cleanup(agent: ChaosAgent, marker: str) -> None:
    found = [w.pid for ws in workloads(marker).values() for w in ws]
    agent.teardown([*found, *(p for p in map(shim_of, found) if p)])
    wait_dead(found)
    left = [w.pid for ws in workloads(marker).values() for w in ws]
    if left:  # started after the scan above (a restart racing the stop): same treatment
        kill_pids(left)
        wait_dead(left)


def shim_of(pid: int) -> int | None:
    """The parent of a workload when it is a riklet shim (to kill it at cleanup)."""
    with contextlib.suppress(OSError, IndexError, ValueError):
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        with open(f"/proc/{ppid}/cmdline", "rb") as fh:
            if os.path.basename(fh.read().split(b"\0", 1)[0]) == b"riklet-shim":
                return ppid
    return None


__all__ = ["SERVICES", "Context", "Row", "Scenario", "Settings", "run"]
