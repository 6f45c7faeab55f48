"""The Node API over a real memory process and a real gRPC server (no workloads run): Apply
reads memory's indexes, not every pod, with the same Conflicts as before; List pages; a node
holding thousands of pods still answers Apply quickly and ``rikletctl get pods`` in full.
Last, the same through a real agent."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from cli import rikletctl
from common.memclient import MemoryClient
from common.pb import node_pb2 as npb
from common.pb import node_pb2_grpc as npb_grpc
from services.manager.api.listing import add_to_server
from services.manager.api.node import NodeService
from tests.stack import Agent
from tests.support import free_port, free_ports, wait_for
from tests.test_memory_service import Memory


class CountingMemory(MemoryClient):
    """The service's memory client, counting the records its replies carry."""
    records = 0

    def _call(self, op: str, **args: Any) -> Any:
        result = super()._call(op, **args)
        self.records += len(result) if isinstance(result, list) else 1
        return result


class Node:
    def __init__(self, memory: CountingMemory, stub: npb_grpc.NodeStub, address: str) -> None:
        self.memory, self.stub, self.address = memory, stub, address

    def apply(self, doc: dict[str, Any]) -> npb.ApplyResponse:
        reply: npb.ApplyResponse = self.stub.Apply(npb.ApplyRequest(manifest=json.dumps(doc)), timeout=30)
        return reply

    def refused(self, doc: dict[str, Any]) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as exc:
            self.apply(doc)
        return exc.value

    def names(self) -> list[str]:
        return [p["name"] for p in self.memory.list()]


@pytest.fixture
def node() -> Iterator[Node]:
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="napi"))  # short: unix socket paths
    memory = Memory(base)
    client = CountingMemory(memory.config(), concurrency=8)   # as the manager's
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    try:
        memory.start()
        service = NodeService(client, mirror=None, monitor=None,  # type: ignore[arg-type]
                              log_path=lambda pod, container: "", grace_default=5.0, poke=lambda name: None)
        add_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        address = f"127.0.0.1:{port}"
        with grpc.insecure_channel(address) as channel:
            yield Node(client, npb_grpc.NodeStub(channel), address)
    finally:
        server.stop(0)
        client.close()
        memory.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def pod(name: str, port: int = 0, replicas: int = 1, env: dict[str, str] | None = None) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "c", "command": ["sleep", "3600"]}
    if port:
        container["ports"] = [{"port": port, "target_port": 80}]
    if env:
        container["env"] = env
    return {"apiVersion": "v1", "kind": "Pod", "name": name, "replicas": replicas,
            "spec": {"containers": [container]}}


def test_a_port_another_workload_holds_is_the_same_conflict_naming_its_first_pod(node: Node) -> None:
    for i in range(50):                     # pods that have nothing to do with it
        node.apply(pod(f"other-{i:02d}"))
    port = free_port()
    node.apply(pod("web", port, replicas=3))
    err = node.refused(pod("alpha", port))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details() == f"spec.containers.ports.port: port {port}/TCP is already taken by pod web-0"
    assert "alpha" not in node.names()
    node.apply(pod("web", port, replicas=2))   # its own workload keeps the port
    for name in ("web-0", "web-1"):
        node.memory.set_desired(name, "deleted")
    assert node.memory.get("web-2")["desired"] == "deleted"
    node.apply(pod("alpha", port))             # pods being deleted hold it no more
    assert node.memory.get("alpha")["desired"] == "running"


def test_a_name_the_scheduler_or_another_workload_holds_stays_theirs(node: Node) -> None:
    node.memory.apply("job", {"workload": "job", "instance_id": "i-1", "containers": [], "ports": []})
    node.apply(pod("x", replicas=2))
    err = node.refused(pod("job"))
    assert (err.code(), err.details()) == (grpc.StatusCode.FAILED_PRECONDITION,
                                           "name: pod job is instance i-1 of the RIK scheduler")
    err = node.refused(pod("x-1"))
    assert err.details() == "name: pod x-1 belongs to workload x"
    assert node.memory.get("x-1")["spec"]["workload"] == "x"


def test_fewer_replicas_delete_the_extra_pods_not_the_schedulers(node: Node) -> None:
    node.memory.apply("web-9", {"workload": "web", "instance_id": "i-9", "containers": [], "ports": []})
    node.apply(pod("web", replicas=4))
    node.apply(pod("web", replicas=2))
    desired = {p["name"]: p["desired"] for p in node.memory.list()}
    assert desired == {"web-0": "running", "web-1": "running", "web-2": "deleted", "web-3": "deleted",
                       "web-9": "running"}


def test_delete_takes_a_workload_or_all_in_one_call_and_refuses_an_ambiguous_request(
        node: Node, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    node.apply(pod("web", replicas=3))
    node.apply(pod("db", replicas=2))
    for bad in (npb.DeleteRequest(), npb.DeleteRequest(name="web-0", all=True),
                npb.DeleteRequest(workload="web", all=True)):
        with pytest.raises(grpc.RpcError) as exc:
            node.stub.Delete(bad, timeout=30)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "give one of a pod name, a workload or all" in str(exc.value.details())
    assert {p["desired"] for p in node.memory.list()} == {"running"}   # nothing changed
    reply = node.stub.Delete(npb.DeleteRequest(workload="web"), timeout=30)
    assert list(reply.deleted) == ["web-0", "web-1", "web-2"]
    assert {p["name"]: p["desired"] for p in node.memory.list()} == {
        "db-0": "running", "db-1": "running", "web-0": "deleted", "web-1": "deleted", "web-2": "deleted"}
    monkeypatch.setenv("RIKLET_TOKEN", "unused")
    capsys.readouterr()
    assert rikletctl.main(["--endpoint", node.address, "delete", "--all"]) == 0
    assert capsys.readouterr().out == "pod/db-0 deleted\npod/db-1 deleted\n"
    assert {p["desired"] for p in node.memory.list()} == {"deleted"}
    with pytest.raises(SystemExit):
        rikletctl.main(["--endpoint", node.address, "delete", "pod", "web-0", "--all"])


def list_pages(stub: npb_grpc.NodeStub, limit: int, **kw: Any) -> list[list[str]]:
    pages, token = [], ""
    while True:
        reply = stub.List(npb.ListRequest(limit=limit, continue_token=token, **kw), timeout=30)
        pages.append([p.name for p in reply.pods])
        token = reply.continue_token
        if not token:
            return pages


def test_list_pages_give_every_pod_once_while_others_come_and_go(node: Node) -> None:
    for i in range(40):
        node.apply(pod(f"p{i:02d}"))
    stop = threading.Event()

    def churn() -> None:  # pods created and deleted between and during the pages
        i = 0
        while not stop.is_set():
            name = f"p{i % 40:02d}x{i}"
            node.apply(pod(name))
            node.memory.set_desired(name, "deleted")
            i += 1

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        pages = [list_pages(node.stub, 7) for _ in range(3)]
    finally:
        stop.set()
        thread.join(30)
    for run in pages:
        assert all(0 < len(page) <= 7 for page in run)
        seen = [name for page in run for name in page]
        assert seen == sorted(set(seen))            # in order, none twice
        assert [n for n in seen if "x" not in n] == [f"p{i:02d}" for i in range(40)]


def test_list_pages_a_workload_and_refuses_a_bad_token(node: Node) -> None:
    node.apply(pod("a", replicas=5))
    node.apply(pod("b", replicas=3))
    assert list_pages(node.stub, 2, workload="a") == [["a-0", "a-1"], ["a-2", "a-3"], ["a-4"]]
    assert list_pages(node.stub, 3, workload="b") == [["b-0", "b-1", "b-2"]]
    unpaged = node.stub.List(npb.ListRequest(), timeout=30)
    assert [p.name for p in unpaged.pods] == [f"a-{i}" for i in range(5)] + ["b-0", "b-1", "b-2"]
    assert not unpaged.continue_token
    with pytest.raises(grpc.RpcError) as exc:
        node.stub.List(npb.ListRequest(limit=2, continue_token="../etc"), timeout=30)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details().startswith("continue_token: ")


def test_a_full_node_applies_fast_and_lists_in_full(node: Node, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # 3000 pods of ~2 KiB each: one reply holding them all passes gRPC's 4 MiB limit, and
    # reading them all per Apply costs far more than the apply itself.
    env = {"PAD": "x" * 2000}
    for i in range(3000):
        name = f"big-{i:04d}"
        node.memory.apply(name, {"workload": name, "containers": [{"name": "c", "env": env}], "ports": []})
    ports = free_ports(10)  # distinct: two free_port() calls may name the same port
    for i in range(10):  # what an apply reads: its own records, not the node's
        node.memory.records = 0
        node.apply(pod(f"new-{i}", ports[i]))
        assert node.memory.records <= 3, f"an apply read {node.memory.records} records"
    monkeypatch.setenv("RIKLET_TOKEN", "unused")
    capsys.readouterr()
    assert rikletctl.main(["--endpoint", node.address, "get", "pods", "-o", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert len(listed) == 3010 and listed[0]["name"] == "big-0000" and listed[-1]["name"] == "new-9"


def test_list_shows_every_change_of_a_pod_it_listed_before(node: Node) -> None:
    node.apply(pod("web"))
    node.apply(pod("db"))

    def listed() -> dict[str, tuple[str, str, str]]:
        reply = node.stub.List(npb.ListRequest(limit=10), timeout=30)
        return {p.name: (p.uid, p.phase, p.desired) for p in reply.pods}

    first = listed()
    assert first["web"][1:] == ("Pending", "running")
    uid = first["web"][0]
    node.memory.set_status("web", uid, {"phase": "Running"})
    assert listed()["web"] == (uid, "Running", "running")
    gone = node.memory.set_desired("web", "deleted")
    assert listed()["web"] == (uid, "Running", "deleted")
    node.memory.remove("web", uid, gone["generation"])
    assert list(listed()) == ["db"]
    node.apply(pod("web"))                      # the same name again: a new pod at version 1
    again = listed()["web"]
    assert again[0] != uid and again[1:] == ("Pending", "running")


def test_a_real_agent_pages_lists_and_refuses_a_taken_port_as_before(agent: Agent) -> None:
    port = free_port()
    for i in range(11):
        agent.stub.Apply(npb.ApplyRequest(manifest=json.dumps(pod(f"e2e-{i:02d}"))), timeout=30)
    agent.stub.Apply(npb.ApplyRequest(manifest=json.dumps(pod("holder", port, replicas=2))), timeout=30)
    wait_for(lambda: all(p["phase"] == "Running" for p in agent.pods()), timeout=60, what="13 pods running")
    pages = list_pages(agent.stub, 5)
    assert [len(p) for p in pages] == [5, 5, 3]
    assert [n for p in pages for n in p] == [f"e2e-{i:02d}" for i in range(11)] + ["holder-0", "holder-1"]
    assert len(agent.pods()) == 13      # rikletctl get pods: every page
    with pytest.raises(grpc.RpcError) as exc:
        agent.stub.Apply(npb.ApplyRequest(manifest=json.dumps(pod("taker", port))), timeout=30)
    assert (exc.value.code(), exc.value.details()) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        f"spec.containers.ports.port: port {port}/TCP is already taken by pod holder-0")
    assert "taker" not in {p["name"] for p in agent.pods()}
