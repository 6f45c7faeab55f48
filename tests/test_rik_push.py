"""The monitor's metric push to a RIK scheduler: shape the scheduler reads, and cadence."""

from __future__ import annotations

import itertools
import os
import statistics
from collections.abc import Iterator

import pytest

from services.monitor.push import next_slot
from tests.rik_scheduler import TestScheduler
from tests.stack import Agent
from tests.support import free_port

pytestmark = pytest.mark.integration


def test_next_slot_stays_on_the_grid() -> None:
    assert next_slot(10.0, 0.5, 10.0) == 10.5
    assert next_slot(10.0, 0.5, 10.49) == 10.5
    assert next_slot(10.0, 0.5, 11.7) == 12.0  # an overrun skips to the next slot, no burst


@pytest.fixture
def scheduler() -> Iterator[TestScheduler]:
    s = TestScheduler(free_port()).start()
    try:
        yield s
    finally:
        s.stop()


def test_worker_metrics_have_the_schedulers_shape_at_the_resolution(scheduler: TestScheduler) -> None:
    agent = Agent(f"scheduler:\n  address: {scheduler.address}\nmonitoring:\n  metric_resolution: 250ms\n"
                  "node:\n  id: push-node\n")
    agent.start()
    try:
        scheduler.wait(lambda: len(scheduler.worker_metrics("push-node")) >= 12, 20, "12 worker metrics")
        got = scheduler.worker_metrics("push-node")
        m = got[-1].metrics
        assert got[-1].status == "RUNNING"
        assert isinstance(m["cpu"]["total"], int) and m["cpu"]["total"] == os.cpu_count()
        assert isinstance(m["cpu"]["free"], float) and 0 <= m["cpu"]["free"] <= m["cpu"]["total"]
        assert m["memory"]["total"] > m["memory"]["free"] > 0
        assert all({"disk_name", "total", "free"} <= set(d) for d in m["disks"]) and m["disks"]
        assert {"totalCpu", "currentUsage"} <= set(m["cpu"])          # seed 001's fields too
        assert {"totalMemory", "freeMemory", "freeMemoryAmount"} <= set(m["memory"])
        gaps = [b.at - a.at for a, b in itertools.pairwise(got[1:])]
        assert abs(statistics.median(gaps) - 0.25) <= 0.025, gaps
    finally:
        agent.close()
