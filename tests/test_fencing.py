"""Acknowledged means durable: a pod applied again while its delete is still being finished
is never removed by that late delete (issue 12, defect 1)."""

from __future__ import annotations

import json
import sys
import time

import pytest

from tests.stack import Agent, npb, pid_alive
from tests.support import wait_for

pytestmark = pytest.mark.integration


def manifest(name: str) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "Pod", "name": name, "spec": {
        "terminationGracePeriodSeconds": 0,
        "containers": [{"name": name, "command": [sys.executable, "-c",
                                                    "import time; time.sleep(3600)"]}]}})


def test_delete_then_apply_again_keeps_the_pod(agent: Agent) -> None:
    names = [f"race-{i}" for i in range(4)]
    for name in names:
        agent.stub.Apply(npb.ApplyRequest(manifest=manifest(name), format="json"), timeout=10)
    for name in names:
        agent.wait_phase(name, "Running")
    # Sweep the delay between the delete and the new apply across the reconciler's window
    # (stop, observe the exit, clean up, remove): one of them lands inside it.
    for round_ in range(6):
        for i, name in enumerate(names):
            agent.stub.Delete(npb.DeleteRequest(name=name), timeout=10)
            time.sleep(0.05 * (round_ * len(names) + i) % 0.8)  # pacing, not synchronisation
            reply = agent.stub.Apply(npb.ApplyRequest(manifest=manifest(name), format="json"), timeout=10)
            assert reply.pods[0].desired == "running"
    # Every pod was acknowledged last by an Apply: each must exist and run, and stay so.
    for name in names:
        pod = agent.wait_phase(name, "Running", timeout=30)
        assert pid_alive(pod["containers"][0]["pid"])
    settle = time.monotonic() + 3
    while time.monotonic() < settle:
        assert sorted(p["name"] for p in agent.pods()) == names
    for name in names:
        pod = agent.pod(name)
        assert pod["phase"] == "Running" and pod["desired"] == "running"
        assert pid_alive(pod["containers"][0]["pid"])


def test_generation_is_shown_and_advances_with_what_is_wanted(agent: Agent) -> None:
    agent.stub.Apply(npb.ApplyRequest(manifest=manifest("gen"), format="json"), timeout=10)
    first = agent.wait_phase("gen", "Running")
    assert first["generation"] == 1 and first["version"] > 1  # status writes bump only the version
    agent.ctl("stop", "gen")
    wait_for(lambda: agent.pod("gen")["phase"] == "Terminated", 20, what="gen stopped")
    assert agent.pod("gen")["generation"] == 2
