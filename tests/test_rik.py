"""riklet driven by a RIK scheduler: the test scheduler (written from the worker contract) drives
real agents over real gRPC. Registration and Ready, CREATE and DESTROY with the status sequence
of each instance, duplicate CREATEs, malformed definitions, instances spread over three nodes,
and the link surviving a scheduler restart and a manager restart without touching workloads."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from common.errors import InvalidArgument
from common.rik import pod_name_for
from services.manager.rik.instances import MAX_DEFINITION_BYTES, instance_workload, load_definition
from tests.rik_scheduler import Received, TestScheduler
from tests.stack import Agent, pid_alive
from tests.support import free_port, wait_for

_ids = itertools.count()


def definition(name: str = "web", **extra: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "name": name, "replicas": 1,
            "spec": {"containers": [{"name": "c", "command": ["sleep", "300"]}]}, **extra}


def new_id(prefix: str = "inst") -> str:
    return f"{prefix}-{next(_ids)}-{int(time.time() * 1000) % 100000}"


def reports(scheduler: TestScheduler, instance_id: str) -> list[Received]:
    """What the manager reported for an instance, in order. (The monitor's pod metrics carry a
    status too, every tick, on a stream of their own; their metrics have no phase.)"""
    return [r for r in list(scheduler.received)
            if r.instance_id == instance_id and isinstance(r.metrics, dict) and "phase" in r.metrics]


def reported(scheduler: TestScheduler, instance_id: str, status: str, timeout: float = 20) -> Received:
    """Wait until the manager's latest report on an instance has this status; that report."""
    def latest() -> Received | None:
        found = reports(scheduler, instance_id)
        return found[-1] if found and found[-1].status == status else None
    result: Received = scheduler.wait(latest, timeout, f"instance {instance_id} reported {status}")
    return result


def transitions(scheduler: TestScheduler, instance_id: str) -> list[str]:
    """The states the manager reported for an instance, without repeats."""
    statuses = [r.status for r in reports(scheduler, instance_id)]
    return [s for i, s in enumerate(statuses) if i == 0 or statuses[i - 1] != s]


# -- definitions, without an agent ---------------------------------------------------------------


def test_a_definition_becomes_one_pod_per_instance_whatever_replicas_says() -> None:
    workload = instance_workload(load_definition(json.dumps(definition(replicas=100))), "Inst_7/X", 10.0)
    [(name, spec)] = workload.pods
    assert name == pod_name_for("Inst_7/X") and name.startswith("inst-7-x-")
    assert spec["instance_id"] == "Inst_7/X" and spec["workload"] == "web"
    assert [c["command"] for c in spec["containers"]] == [["sleep", "300"]]


def test_null_fields_read_as_absent_as_rik_writes_them() -> None:
    doc = definition()
    doc["spec"]["containers"][0].update(env=None, ports=None)
    container = load_definition(json.dumps(doc))["spec"]["containers"][0]
    assert container == {"name": "c", "command": ["sleep", "300"]}


@pytest.mark.parametrize(("text", "field"), [
    ("{not json", "definition"),
    ("[1, 2]", "definition"),
    ("[" * 100_000 + "]" * 100_000, "definition"),  # within the size limit, too deep
    (json.dumps(definition(replicas="x")), "replicas"),
    (json.dumps(definition(kind="Job")), "kind"),
    (json.dumps({**definition(), "spec": {"containers": [{"name": "c", "command": "x" * (300 * 1024)}]}}),
     "definition"),
])
def test_malformed_definitions_are_refused_with_the_field(text: str, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        instance_workload(load_definition(text), "i-1", 10.0)
    assert info.value.field == field
    assert info.value.message


def test_the_size_limit_is_in_bytes() -> None:
    doc = definition()
    doc["spec"]["containers"][0]["env"] = {"PAD": "\u00e9" * (MAX_DEFINITION_BYTES - 200)}
    text = json.dumps(doc, ensure_ascii=False)
    assert len(text) <= MAX_DEFINITION_BYTES < len(text.encode())
    with pytest.raises(InvalidArgument, match="bytes"):
        load_definition(text)


# -- one agent -----------------------------------------------------------------------------------


class Rig:
    """One agent in RIK mode (scheduler address and node id from the environment) and the test
    scheduler it talks to; the scheduler can be replaced by a new one on the same port."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.scheduler = TestScheduler(free_port()).start()
        self.agent = Agent("monitoring:\n  metric_resolution: 250ms\n")
        self.agent.env.update(RIKLET_SCHEDULER=self.scheduler.address, NODE_ID=node_id)

    def create(self, instance_id: str, doc: str | dict[str, Any] | None = None) -> None:
        self.scheduler.schedule(self.node_id, instance_id, definition() if doc is None else doc)

    def running(self, instance_id: str) -> int:
        """Wait for the instance to be reported RUNNING; its workload's pid."""
        self.scheduler.wait_instance(instance_id, "RUNNING")
        pod = self.agent.wait_phase(pod_name_for(instance_id), "Running")
        return int(pod["containers"][0]["pid"])

    def close(self) -> None:
        self.agent.close()
        self.scheduler.stop()


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    r = Rig("rik-node-1")
    try:
        r.agent.start()
        r.scheduler.wait_ready(r.node_id)
    except BaseException:
        r.agent.dump_logs()
        r.close()
        raise
    try:
        yield r
    finally:
        r.close()


@pytest.fixture(autouse=True)
def _logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed and "rig" in request.fixturenames:
        request.getfixturevalue("rig").agent.dump_logs()


@pytest.mark.integration
def test_registers_with_its_node_id_and_is_ready_after_a_metric(rig: Rig) -> None:
    assert [h for _, h in rig.scheduler.registrations] == [rig.node_id]
    assert rig.scheduler.workers[rig.node_id].ready
    assert rig.scheduler.worker_metrics(rig.node_id)[0].status == "RUNNING"


@pytest.mark.integration
def test_create_then_destroy_reports_every_transition(rig: Rig) -> None:
    instance = new_id()
    rig.create(instance)
    pid = rig.running(instance)
    assert transitions(rig.scheduler, instance) in (["CREATING", "RUNNING"],
                                                    ["PENDING", "CREATING", "RUNNING"])
    running = reports(rig.scheduler, instance)[-1]
    assert running.metrics["phase"] == "Running" and running.metrics["restartCount"] == 0

    rig.scheduler.schedule(rig.node_id, instance, "", action="DESTROY")
    wait_for(lambda: not [p for p in rig.agent.pods() if p["name"] == pod_name_for(instance)],
             20, what="the pod removed")
    reported(rig.scheduler, instance, "TERMINATED")
    assert transitions(rig.scheduler, instance)[-3:] == ["RUNNING", "DESTROYING", "TERMINATED"]
    wait_for(lambda: not pid_alive(pid), 10, what="the workload process gone")


@pytest.mark.integration
def test_the_same_instance_twice_runs_one_copy(rig: Rig) -> None:
    instance = new_id("twice")
    rig.create(instance)
    pid = rig.running(instance)
    rig.create(instance)
    rig.scheduler.schedule(rig.node_id, new_id("marker"), "{not json")  # handled after the repeat
    rig.scheduler.wait(lambda: any(r.status == "FAILED" for r in rig.scheduler.received
                                   if r.instance_id.startswith("marker")), 10, "the marker refused")
    pods = [p for p in rig.agent.pods() if p["name"] == pod_name_for(instance)]
    assert len(pods) == 1 and pods[0]["containers"][0]["pid"] == pid and pods[0]["restartCount"] == 0
    rig.scheduler.schedule(rig.node_id, instance, "", action="DESTROY")
    reported(rig.scheduler, instance, "TERMINATED")


@pytest.mark.integration
def test_local_workloads_leave_instances_alone(rig: Rig) -> None:
    instance = new_id("mine")
    rig.create(instance, definition(name="shared"))
    pid = rig.running(instance)
    refused = rig.agent.ctl("run", pod_name_for(instance), "--", "sleep", "300", check=False)
    assert refused.returncode == 1 and "RIK scheduler" in refused.stderr
    rig.agent.ctl("run", "shared", "--", "sleep", "300")  # a local workload of the same name
    rig.agent.wait_phase("shared", "Running")
    pod = rig.agent.pod(pod_name_for(instance))
    assert pod["desired"] == "running" and pod["containers"][0]["pid"] == pid
    rig.agent.ctl("delete", "pod", "shared")
    rig.scheduler.schedule(rig.node_id, instance, "", action="DESTROY")
    reported(rig.scheduler, instance, "TERMINATED")


@pytest.mark.integration
def test_destroy_of_an_unknown_instance_is_terminated(rig: Rig) -> None:
    rig.scheduler.schedule(rig.node_id, "never-created", "", action="DESTROY")
    assert reported(rig.scheduler, "never-created", "TERMINATED").metrics["reason"] == "NotFound"


@pytest.mark.integration
def test_malformed_definitions_fail_their_instance_and_the_stream_goes_on(rig: Rig) -> None:
    image = definition()
    image["spec"]["containers"][0] = {"name": "c", "image": "nginx:1.25"}
    cases = {
        "bad-json": ("{not json", "InvalidDefinition", "definition"),
        "bad-replicas": (definition(replicas="x"), "InvalidDefinition", "replicas"),
        "function": ({"apiVersion": "v1", "kind": "Function", "name": "fn", "spec": {"function": {
            "execution": {"rootfs": "https://example.com/fn.ext4"}}}}, "RuntimeUnavailable", "kind"),
        "unknown-kind": (definition(kind="Job"), "InvalidDefinition", "kind"),
        "huge": (json.dumps(definition(name="big")) + " " * (300 * 1024), "InvalidDefinition", "definition"),
    }
    registrations = len(rig.scheduler.registrations)
    ids = {case: new_id(case) for case in cases}
    for case, (doc, _, _) in cases.items():
        rig.create(ids[case], doc)
    for case, (_, reason, field) in cases.items():
        failed = reported(rig.scheduler, ids[case], "FAILED")
        assert (failed.metrics["reason"], failed.metrics["field"]) == (reason, field), case
        assert failed.metrics["message"]
    assert "micro-VM" in reported(rig.scheduler, ids["function"], "FAILED").metrics["message"]
    names = {p["name"] for p in rig.agent.pods()}
    assert not names & {pod_name_for(i) for i in ids.values()}, "a refused definition makes no pod"

    # An image with no containerd runtime: a valid pod, whose start fails.
    no_runtime = new_id("image")
    rig.create(no_runtime, image)
    assert reported(rig.scheduler, no_runtime, "FAILED").metrics["reason"] == "RuntimeUnavailable"
    rig.scheduler.schedule(rig.node_id, no_runtime, "", action="DESTROY")
    reported(rig.scheduler, no_runtime, "TERMINATED")

    fine = new_id("after")
    rig.create(fine)
    rig.running(fine)
    assert len(rig.scheduler.registrations) == registrations, "the stream was never broken"
    rig.scheduler.schedule(rig.node_id, fine, "", action="DESTROY")
    reported(rig.scheduler, fine, "TERMINATED")


@pytest.mark.integration
def test_scheduler_restart_reregisters_and_resends_without_touching_workloads(rig: Rig) -> None:
    instances = [new_id("keep"), new_id("keep")]
    for i in instances:
        rig.create(i)
    pids = {i: rig.running(i) for i in instances}

    rig.scheduler.stop()
    stopped = time.monotonic()
    rig.scheduler = TestScheduler(rig.scheduler.port).start()
    rig.scheduler.wait(lambda: rig.scheduler.registrations, 30, "the agent registered again")
    print(f"re-registered {rig.scheduler.registrations[0][0] - stopped:.2f} s after the scheduler stopped")
    for i in instances:
        reported(rig.scheduler, i, "RUNNING")  # re-sent by the manager: the new scheduler never asked
    rig.scheduler.wait_ready(rig.node_id)
    for i in instances:
        assert rig.agent.pod(pod_name_for(i))["containers"][0]["pid"] == pids[i]
        rig.scheduler.schedule(rig.node_id, i, "", action="DESTROY")
        reported(rig.scheduler, i, "TERMINATED")


@pytest.mark.integration
def test_manager_restart_reconnects_with_no_duplicate(rig: Rig) -> None:
    instance = new_id("stay")
    rig.create(instance)
    pid = rig.running(instance)
    manager = rig.agent.service_pid("manager")
    seen = len(rig.scheduler.registrations)

    rig.agent.supervisorctl("restart", "riklet:manager")
    assert rig.agent.service_pid("manager") != manager
    rig.scheduler.wait(lambda: len(rig.scheduler.registrations) > seen and
                       rig.scheduler.workers.get(rig.node_id), 30, "the new manager registered")
    back = rig.scheduler.registrations[-1][0]
    rig.scheduler.wait(lambda: any(r.at > back and r.status == "RUNNING" and r.metrics.get("phase")
                                   for r in rig.scheduler.received if r.instance_id == instance),
                       20, "the instance's state re-sent by the new manager")

    rig.create(instance)  # the scheduler repeats itself: still one copy
    fresh = new_id("fresh")
    rig.create(fresh)
    rig.running(fresh)
    pods = [p for p in rig.agent.pods() if p["name"] == pod_name_for(instance)]
    assert len(pods) == 1 and pods[0]["containers"][0]["pid"] == pid
    assert pid_alive(pid)
    for i in (instance, fresh):
        rig.scheduler.schedule(rig.node_id, i, "", action="DESTROY")
        reported(rig.scheduler, i, "TERMINATED")


# -- three agents --------------------------------------------------------------------------------


@pytest.mark.integration
def test_instances_spread_over_three_nodes() -> None:
    scheduler = TestScheduler(free_port()).start()
    nodes = [f"spread-{n}" for n in range(3)]
    agents: list[Agent] = []
    try:
        for node in nodes:
            agent = Agent(f"scheduler:\n  address: {scheduler.address}\nnode:\n  id: {node}\n"
                          "monitoring:\n  metric_resolution: 250ms\n")
            agents.append(agent)
            agent.start()
        for node in nodes:
            scheduler.wait_ready(node)
        instances = [new_id("spread") for _ in range(6)]
        placed = {i: nodes[k % 3] for k, i in enumerate(instances)}  # round robin
        for i, node in placed.items():
            scheduler.schedule(node, i, definition(name="spread"))
        for i in instances:
            scheduler.wait_instance(i, "RUNNING")
        for node, agent in zip(nodes, agents, strict=True):
            mine = sorted(pod_name_for(i) for i, n in placed.items() if n == node)
            assert sorted(p["name"] for p in agent.pods()) == mine
        assert {r.identifier for r in scheduler.received if r.instance_id in placed} == set(nodes)
        for i, node in placed.items():
            scheduler.schedule(node, i, "", action="DESTROY")
        for i in instances:
            reported(scheduler, i, "TERMINATED")
    finally:
        for agent in agents:
            agent.close()
        scheduler.stop()
