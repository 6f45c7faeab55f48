"""Pod events without an agent: the events status transitions mean, memory's bounded history,
the recorder's batches and its followers' bound, and the checks on what memory is sent."""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from common.errors import InvalidArgument, Unavailable
from common.podevent import make
from services.manager.podevents import Recorder, StatusEvents, transitions
from services.memory.store import Store
from tests.support import wait_for

T0 = 1_700_000_000.0


def container(state: str, **fields: Any) -> dict[str, Any]:
    return {"name": "c", "state": state, "restartCount": 0, "exitCode": None, "reason": None,
            "signal": None, "message": None, "startedAt": None, "finishedAt": None,
            "nextRestartAt": None, **fields}


def status(phase: str, *containers: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"phase": phase, "reason": None, "message": None, "containers": list(containers), **fields}


def reasons(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    return [t.reason for t in transitions(old, new)]


# -- transitions ---------------------------------------------------------------------------------

def test_a_crash_loop_reads_started_failed_backoff_started() -> None:
    pending = {"phase": "Pending"}
    running = status("Running", container("running", pid=10, startedAt=T0))
    crashed = status("Error", container("waiting", exitCode=1, reason="Error", startedAt=T0,
                                        finishedAt=T0 + 1, nextRestartAt=T0 + 2),
                     reason="Error", message="container c will be restarted", exitCode=1)
    again = status("Running", container("running", pid=11, startedAt=T0 + 2, restartCount=1))
    assert reasons(pending, running) == ["Started"]
    steps = transitions(running, crashed)
    assert [(t.reason, t.type) for t in steps] == [("Failed", "Warning"), ("BackOff", "Warning")]
    assert "exited with code 1 (Error)" in steps[0].message and "back-off 1s" in steps[1].message
    started = transitions(crashed, again)
    assert [t.reason for t in started] == ["Started"] and "(restart 1)" in started[0].message
    assert reasons(running, running) == [] and reasons(again, again) == []
    # a whole run between two looks (the manager was restarting): still told, in order
    missed = status("Error", container("waiting", exitCode=1, reason="Error", startedAt=T0 + 2,
                                       restartCount=1, finishedAt=T0 + 3, nextRestartAt=T0 + 5),
                    reason="Error")
    assert reasons(crashed, missed) == ["Started", "Failed", "BackOff"]


def test_exits_name_oom_kills_completions_and_signals() -> None:
    running = status("Running", container("running", startedAt=T0))
    oom = status("Error", container("terminated", exitCode=137, reason="OOMKilled", finishedAt=T0 + 1),
                 reason="OOMKilled")
    done = status("Terminated", container("terminated", exitCode=0, reason="Completed", finishedAt=T0 + 1),
                  reason="Completed")
    killed = status("Error", container("terminated", exitCode=137, signal=9, reason="Signaled",
                                       finishedAt=T0 + 1), reason="Signaled")
    assert reasons(running, oom) == ["OOMKilled"]
    assert reasons(running, done) == ["Completed"]
    (t,) = transitions(running, killed)
    assert t.reason == "Failed" and "killed by signal 9" in t.message
    stopped = status("Terminated", container("terminated", exitCode=143, signal="SIGTERM", reason="Signaled",
                                              message="killed by SIGTERM", finishedAt=T0 + 1))
    (t,) = transitions(running, stopped)   # asked for: a stop, not a failure
    assert (t.reason, t.type, t.message) == ("Stopped", "Normal", "container c stopped (killed by SIGTERM)")


def test_pod_level_failures_and_port_conflicts() -> None:
    running = status("Running", container("running", startedAt=T0))
    blocked = {**running, "phase": "Error", "reason": "PortInUse",
               "message": "port 8080/TCP is held by pid 7"}
    lost = status("Error", reason="StartError", message="no such program")
    (conflict,) = transitions(running, blocked)
    assert (conflict.reason, conflict.type, conflict.message) == (
        "PortConflict", "Warning", "port 8080/TCP is held by pid 7")
    assert reasons(blocked, running) == ["PortFreed"]
    (failed,) = transitions({"phase": "Pending"}, lost)
    assert failed.reason == "Failed" and "StartError" in failed.message


def test_each_event_is_recorded_once_even_when_a_status_is_written_twice() -> None:
    said: list[str] = []

    class Sink:
        def record(self, pod: str, reason: str, message: str, **kw: Any) -> None:
            said.append(reason)

    events = StatusEvents(Sink())
    record = {"name": "web", "uid": "u1"}
    old = {"phase": "Pending"}
    new = status("Running", container("running", startedAt=T0))
    events.observed(record, old, new)
    events.observed(record, old, new)   # the mirror had not caught up: same old, same new
    assert said == ["Started"]
    events.observed({"name": "web", "uid": "u2"}, old, new)   # another pod of the same name
    assert said == ["Started", "Started"]


# -- memory's history ------------------------------------------------------------------------------

@pytest.fixture
def store() -> Iterator[Store]:
    s = Store.open(tempfile.mkdtemp(prefix="evst"))
    yield s
    s.close()


def add(store: Store, pod: str, n: int, reason: str = "Started") -> list[int]:
    now = time.time()
    seqs: list[int] = store.add_events([make(pod, reason, f"{reason} {i}", now + i).to_dict()
                                        for i in range(n)]).result["seqs"]
    return seqs


def test_memory_keeps_the_newest_events_of_each_pod(store: Store) -> None:
    store.events.per_pod = 5
    add(store, "web", 12)
    add(store, "db", 2)
    web = store.events.list(pod="web")["events"]
    assert [e["message"] for e in web] == [f"Started {i}" for i in range(7, 12)]
    assert len(store.events.list(pod="db")["events"]) == 2
    assert [e["message"] for e in store.events.list(pod="web", limit=2)["events"]] == ["Started 10",
                                                                                       "Started 11"]
    assert store.events.list()["last"] == 14


def test_a_deleted_pods_events_stay_until_the_node_cap(store: Store) -> None:
    store.events.node_cap = 10
    store.apply("gone", {"containers": []})
    store.set_desired("gone", "deleted")
    rec = store.get("gone")
    store.remove("gone", rec["uid"], rec["generation"])
    add(store, "gone", 1, "Deleted")
    assert [e["reason"] for e in store.events.list(pod="gone")["events"]] == ["Deleted"]
    add(store, "web", 9)
    assert [e["reason"] for e in store.events.list(pod="gone")["events"]] == ["Deleted"]
    add(store, "web", 1)   # the 11th event on the node: the oldest goes
    assert store.events.list(pod="gone")["events"] == []
    assert len(store.events.list()["events"]) == 10


def test_memory_refuses_bad_events_naming_the_field(store: Store) -> None:
    good = make("web", "Started", "ok", time.time()).to_dict()
    for bad, field in (({**good, "reason": "not camel"}, "args.events[1].reason"),
                       ({**good, "pod": "Web!"}, "args.events[1].pod"),
                       ({**good, "type": "Info"}, "args.events[1].type"),
                       ({**good, "time": True}, "args.events[1].time"),
                       ({**good, "extra": 1}, "args.events[1].extra"),
                       ({**good, "message": "x" * 5000}, "args.events[1].message")):
        with pytest.raises(InvalidArgument) as err:
            store.add_events([good, bad])
        assert err.value.field == field
    with pytest.raises(InvalidArgument) as err:
        store.add_events([])
    assert err.value.field == "args.events"
    assert store.events.list()["events"] == []   # nothing of a refused batch was kept
    with pytest.raises(InvalidArgument) as err:
        store.events.list(limit=5000)
    assert err.value.field == "args.limit"


# -- the recorder ----------------------------------------------------------------------------------

def test_the_recorder_batches_writes_and_retries_while_memory_is_down() -> None:
    calls: list[int] = []
    gate = threading.Event()
    down = [True]

    def write(batch: list[dict[str, Any]]) -> list[int]:
        gate.wait(5)
        if down[0]:
            down[0] = False
            raise Unavailable("memory restarting", "memory")
        calls.append(len(batch))
        return list(range(sum(calls) - len(batch) + 1, sum(calls) + 1))

    rec = Recorder(write)
    rec.start()
    follower = rec.follow("web")
    try:
        for i in range(300):
            rec.record("web" if i % 2 else "db", "Started", f"n{i}")
        gate.set()
        got = [follower.get(timeout=10) for _ in range(150)]
        assert all(e is not None and e.pod == "web" for e in got)
        assert [e.seq for e in got if e is not None] == sorted(e.seq for e in got if e is not None)
        assert sum(calls) == 300 and len(calls) <= 3     # batches, not one call per event
    finally:
        rec.stop()


def test_a_follower_that_falls_behind_is_dropped_not_grown() -> None:
    rec = Recorder(lambda batch: list(range(1, len(batch) + 1)), follower_queue=10)
    slow = rec.follow()
    rec.start()
    try:
        for i in range(50):
            rec.record("web", "Started", f"n{i}")
        wait_for(lambda: slow.overflowed, 10, what="the slow follower dropped")
        assert slow.get(timeout=1) is None      # its stream ends, saying why through overflowed
    finally:
        rec.stop()



# -- the Events call: replay, then live, nothing twice ------------------------------------------------

class FakeContext:
    """A client that goes away after 30 s: a stream that never delivers ends, and fails the test."""

    def __init__(self) -> None:
        self.callbacks: list[Any] = []
        self.until = time.monotonic() + 30

    def add_callback(self, fn: Any) -> None:
        self.callbacks.append(fn)

    def is_active(self) -> bool:
        return time.monotonic() < self.until

    def abort(self, code: Any, message: str) -> None:
        raise RuntimeError(f"{code}: {message}")


def test_events_replays_memory_then_follows_without_gap_or_repeat() -> None:
    from common.pb import node_pb2 as pb
    from services.manager.api.podevents import EventsApi

    now = time.time()
    stored = [{**make("web", "Started", f"n{i}", now).to_dict(), "seq": i} for i in (1, 2, 3)]
    seqs = iter(range(3, 10))   # the live writer's first event is one memory had already listed

    class Memory:
        def list_events(self, pod: Any, after: Any, limit: Any) -> dict[str, Any]:
            return {"events": stored, "last": 3}

    class Api(EventsApi):
        def _call(self, context: Any, fn: Any) -> Any:
            return fn()

    api = Api()
    api.memory, api.monitor = Memory(), None
    api.recorder = Recorder(lambda batch: [next(seqs) for _ in batch])
    api.recorder.start()
    try:
        stream = api.Events(pb.EventsRequest(pod="web", follow=True), FakeContext())
        got = [next(stream).seq for _ in range(3)]
        for i in range(3):
            api.recorder.record("web", "BackOff", f"live {i}")
        got += [next(stream).seq for _ in range(2)]
        assert got == [1, 2, 3, 4, 5]
        stream.close()
    finally:
        api.recorder.stop()
