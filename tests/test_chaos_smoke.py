"""The fault suite's machinery (bench.chaos), exercised briefly: its counts see what they claim
to see on a real agent, and one short scenario runs, kills, settles and cleans up."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid

import pytest

from bench.chaos import kills
from bench.chaos.ledger import Ledger, Want
from bench.chaos.scenario import Settings, run
from bench.chaos.verify import Counts, observe, settle, workloads
from tests.stack import Agent, npb
from tests.support import wait_for

pytestmark = pytest.mark.integration


def _marker_process(run_tag: str, name: str) -> subprocess.Popen[bytes]:
    """A process that looks like pod NAME's workload to the suite, started outside the agent."""
    env = {**os.environ, "CHAOS_TAG": f"{run_tag}:{name}", "CHAOS_GEN": "0"}
    return subprocess.Popen(["sleep", "600"], env=env)


def test_counts_see_each_kind_of_damage(agent: Agent) -> None:
    tag = f"smoke-{uuid.uuid4().hex[:6]}"
    ledger = Ledger(tag, ["a", "b", "c", "d"])
    for name in ("a", "b", "c", "d"):
        assert ledger.apply(agent, name)
    assert ledger.delete(agent, "c")
    counts, _ = settle(agent, tag, ledger.expected(), 20)
    assert counts == Counts(), counts.detail
    assert ledger.expected()["c"].want is Want.DELETED

    # damage behind the ledger's back, one kind per pod
    extra_a, extra_c = _marker_process(tag, "a"), _marker_process(tag, "c")
    try:
        agent.stub.Delete(npb.DeleteRequest(name="b"), timeout=10)
        agent.stub.Stop(npb.StopRequest(name="d"), timeout=10)

        def damaged() -> Counts | None:
            got = observe(agent, tag, ledger.expected())
            return got if got.records_lost and got.lost else None
        seen = wait_for(damaged, 20, what="the deleted and stopped pods seen")
        assert seen is not None
        assert (seen.lost, seen.duplicated, seen.orphaned, seen.records_lost) == (1, 1, 1, 1), seen.detail
        assert seen.names == {"a", "b", "c", "d"}
        assert sorted(w.pid for w in workloads(tag)["c"]) == [extra_c.pid]
    finally:
        for proc in (extra_a, extra_c):
            proc.send_signal(signal.SIGKILL)
            proc.wait()


def test_a_short_kill_scenario_runs_and_cleans_up() -> None:
    settings = Settings(ops=24, pods=4, seed=3, settle=30, run=f"smoke-{uuid.uuid4().hex[:6]}")
    [scenario] = [s for s in kills.SCENARIOS if s.name == "kill-manager"]
    row = run(scenario, settings)
    assert row.failures == [], row.notes
    assert row.acked >= 12 and row.restarts == {"memory": 0, "manager": kills.KILLS, "monitor": 0,
                                                 "proxy": 0}
    # records lost are left out: the delete/re-apply race (issue 12, part 1) can show in any
    # churn until it is fixed; the race scenario is where the suite checks it.
    c = row.counts
    assert (c.lost, c.duplicated, c.orphaned, c.unverified) == (0, 0, 0, False), c.detail
    assert workloads(f"{settings.run}.{scenario.name}") == {}, "cleanup left workloads running"
