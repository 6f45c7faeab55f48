"""The typed pod model (common/pod.py): the wire format round-trips, defaults are applied once,
and malformed records are refused naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from common.errors import BadFrame
from common.pod import (
    ContainerState,
    Desired,
    Phase,
    PodRecord,
    PodStatus,
    desired_of,
    phase_of,
    serving,
)


def record(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "web-0", "uid": "u1", "generation": 3, "desired": "running",
        "spec": {"workload": "web", "containers": []},
        "status": {"phase": "Running", "reason": None, "message": None, "exitCode": None,
                   "restartCount": 2, "containers": [
                       {"name": "app", "state": "running", "pid": 42, "restartCount": 2,
                        "exitCode": None, "signal": None, "reason": None, "message": None,
                        "startedAt": 10.0, "finishedAt": None, "nextRestartAt": None,
                        "ready": True, "started": True, "lastTerminationReason": None}],
                   "endpoints": [{"host_port": 8080, "protocol": "TCP", "address": "127.0.0.1",
                                  "port": 9000}],
                   "cgroup": "riklet/x/web-0", "pids": [42], "internalIp": "127.0.0.1",
                   "startedAt": 10.0, "transitionAt": 11.0, "ready": True,
                   "conditions": [{"type": "Ready", "status": "True"}]},
        "created_at": 1.0, "updated_at": 2.0,
    }
    base.update(changes)
    return base


def test_a_record_round_trips_through_the_typed_model() -> None:
    typed = PodRecord.from_json(record())
    assert typed.desired is Desired.RUNNING and typed.status.phase is Phase.RUNNING
    assert typed.status.containers[0].state is ContainerState.RUNNING
    assert typed.status.containers[0].restart_count == 2 and typed.workload == "web"
    assert typed.to_json() == record()


def test_defaults_are_spelled_once() -> None:
    bare = {"name": "p", "uid": "u", "generation": 1, "spec": {}}
    assert phase_of(bare) is Phase.PENDING and desired_of(bare) is Desired.RUNNING
    assert PodRecord.from_json(bare).status == PodStatus()
    assert phase_of({"status": {"phase": "Sideways"}}) is Phase.PENDING


@pytest.mark.parametrize(("desired", "phase", "expected"), [
    ("running", "Running", True), ("stopped", "Running", False), ("deleted", "Running", False),
    ("running", "Creating", False), ("running", "Error", False)])
def test_only_running_pods_wanted_running_serve(desired: str, phase: str, expected: bool) -> None:
    assert serving(record(desired=desired, status={"phase": phase})) is expected


def test_a_running_pod_that_is_not_ready_does_not_serve() -> None:
    assert not serving(record(status={"phase": "Running", "ready": False}))
    assert serving(record(status={"phase": "Running", "ready": True}))
    typed = PodRecord.from_json(record())
    assert typed.status.ready_containers == 1
    unready = record()
    unready["status"]["containers"][0]["ready"] = False
    assert PodRecord.from_json(unready).status.ready_containers == 0


@pytest.mark.parametrize(("changes", "field"), [
    ({"uid": 7}, "uid"), ({"generation": True}, "generation"), ({"spec": []}, "spec"),
    ({"status": {"containers": {}}}, "status.containers"),
    ({"status": {"containers": [{"state": "running"}]}}, "status.containers[0].name"),
    ({"status": {"containers": [{"name": "a", "state": "dancing"}]}}, "status.containers[0].state"),
])
def test_malformed_records_are_refused_naming_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(BadFrame) as err:
        PodRecord.from_json(record(**changes))
    assert err.value.field == field
