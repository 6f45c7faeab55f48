"""Changes reach the reconciler as events, end to end: a real agent whose safety-net resync is an
hour away still reports a workload's exit, a shim killed with SIGKILL and a delete at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator

import pytest

from tests.stack import BIN, Agent, npb
from tests.support import wait_for

pytestmark = pytest.mark.integration

PROMPT = 2.0  # seconds: anything seen within this came from an event, not from an hourly pass


@pytest.fixture
def agent() -> Iterator[Agent]:
    a = Agent("reconcile:\n  resync_interval: 1h\n").start()
    try:
        yield a
    finally:
        a.close()


def apply(agent: Agent, name: str, command: list[str], restart: str = "Always") -> None:
    doc = {"apiVersion": "v1", "kind": "Pod", "name": name,
           "spec": {"restartPolicy": restart, "containers": [{"name": "c", "command": command}]}}
    agent.stub.Apply(npb.ApplyRequest(manifest=json.dumps(doc), format="json"), timeout=30)


def phase_of(agent: Agent, name: str) -> npb.Pod | None:
    return agent.stub.Get(npb.GetRequest(name=name), timeout=5)


def show(agent: Agent, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([os.path.join(BIN, "riklet"), "config", "show", "-o", "json"],
                          env={**agent.env, **env}, capture_output=True, text=True, timeout=30)


def test_the_resync_interval_is_a_setting(agent: Agent) -> None:
    table = json.loads(show(agent).stdout)
    assert table["reconcile.resync_interval"]["value"] == 3600.0
    table = json.loads(show(agent, RIKLET_RESYNC_INTERVAL="90s").stdout)
    assert table["reconcile.resync_interval"] == {"value": 90.0,
                                                  "source": "environment RIKLET_RESYNC_INTERVAL"}
    bad = show(agent, RIKLET_RESYNC_INTERVAL="0")
    assert bad.returncode == 2 and "RIKLET_RESYNC_INTERVAL: must be a positive duration" in bad.stderr


def test_exits_kills_and_deletes_are_seen_without_polling(agent: Agent) -> None:
    apply(agent, "fails", ["sh", "-c", "sleep 0.3; exit 3"], restart="Never")
    apply(agent, "held", ["sleep", "100000"])
    agent.wait_phase("held", "Running")
    # a workload's exit: the shim's status write and its datagram
    failed = wait_for(lambda: (p := phase_of(agent, "fails")) is not None and p.phase == "Error" and p,
                      PROMPT + 1, what="fails in Error")
    assert failed.reason == "Error" and failed.containers[0].exit_code == 3
    # published from the exit's event: well under the old 0.5 s pass's worst case
    published = json.loads(failed.status_json)["transitionAt"]
    assert published - failed.containers[0].finished_at < 0.4

    # a shim killed with SIGKILL sends nothing: its pidfd tells, and the pod is started again
    status_path = os.path.join(agent.state_dir, "pods", "held", "status.json")
    with open(status_path, encoding="utf-8") as fh:
        shim_pid = int(json.load(fh)["shim_pid"])
    os.kill(shim_pid, signal.SIGKILL)

    def new_shim() -> bool:
        with open(status_path, encoding="utf-8") as fh:
            st = json.load(fh)
        return bool(st["shim_pid"] != shim_pid and phase_of(agent, "held").phase == "Running")
    wait_for(new_shim, PROMPT, what="held restarted under a new shim")

    # a delete: SIGTERM, then removed on the shim's exit
    agent.stub.Delete(npb.DeleteRequest(name="held"), timeout=5)
    wait_for(lambda: "held" not in [p.name for p in agent.stub.List(npb.ListRequest(), timeout=5).pods],
             PROMPT, what="held deleted")
