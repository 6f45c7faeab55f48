"""The proxy's pod feed against a fake memory service that follows memory's contract, and the
proxy process end to end (feed, routes, listeners) against the same fake."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from common import config, ipc
from common.errors import BadFrame, NotFound
from common.memclient import MemoryClient
from common.podsync import Outcome, PodSequence
from common.zmqutil import make_run_dir, route_one
from services.proxy import feed
from services.proxy.feed import watch_pods
from tests.test_memory_service import Memory

Pod = dict[str, Any]


def pod(name: str, version: int = 1, host_port: int = 8080, port: int = 18080,
        desired: str = "running") -> Pod:
    return {"name": name, "uid": f"uid-{name}", "version": version, "desired": desired,
            "spec": {"workload": "web", "ports": [{"port": host_port, "target_port": 80, "protocol": "TCP"}]},
            "status": {"phase": "Running", "endpoints": [
                {"host_port": host_port, "protocol": "TCP", "address": "127.0.0.1", "port": port}]}}


class FakeMemory:
    """Memory's side of the contract: a ROUTER answering ``snapshot`` and a PUB sending
    ``pod.<name>.<kind>`` events and an ``hb`` heartbeat. It can also change state without
    telling anyone, to stand in for a lost event. The PUB is an XPUB so tests can wait until
    the feed's subscription is live (without that, a test event may race the subscription)."""

    def __init__(self, cfg: config.Config, pods: list[Pod], epoch: str = "e1", seq: int = 10,
                 heartbeat: float | None = 0.1) -> None:
        ctx: zmq.Context[Any] = zmq.Context.instance()
        self.pub = ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(cfg.memory_events_endpoint)
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(cfg.memory_endpoint)
        self.lock = threading.Lock()   # state, seq and the order of outgoing frames
        self.outbox: queue.Queue[list[bytes]] = queue.Queue()   # sockets stay on one thread
        self.pods = {p["name"]: p for p in pods}
        self.epoch, self.seq, self.snapshots, self.subscribers = epoch, seq, 0, 0
        self.heartbeat_every = heartbeat
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _handle(self, req: ipc.Request) -> Any:
        if req.op != "snapshot":
            raise NotFound(f"unknown op {req.op}", "op")
        with self.lock:
            self.snapshots += 1
            return {"seq": self.seq, "epoch": self.epoch, "pods": list(self.pods.values())}

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.pub, zmq.POLLIN)
        beat = time.monotonic()
        while not self._stop.is_set():
            ready = dict(poller.poll(5))
            if self.router in ready:
                route_one(self.router, self._handle)
            if self.pub in ready and self.pub.recv()[:1] == b"\x01":
                self.subscribers += 1
            while not self.outbox.empty():
                self.pub.send_multipart(self.outbox.get())
            if self.heartbeat_every is not None and time.monotonic() - beat >= self.heartbeat_every:
                beat = time.monotonic()
                self.heartbeat()

    def wait_subscribed(self) -> None:
        wait_until(lambda: self.subscribers > 0, "the feed to subscribe", timeout=5)

    def heartbeat(self) -> None:
        with self.lock:
            beat = {"seq": self.seq, "epoch": self.epoch}
            self.outbox.put(ipc.encode_event(ipc.Event("hb", self.seq, beat)))

    def _change(self, kind: str, p: Pod) -> dict[str, Any]:
        if kind == "removed":
            del self.pods[p["name"]]
            return {"kind": kind, "name": p["name"], "uid": p["uid"]}
        self.pods[p["name"]] = p
        return {"kind": kind, "pod": p}

    def publish(self, kind: str, p: Pod) -> None:
        with self.lock:
            self.seq += 1
            data = self._change(kind, p)
            self.outbox.put(ipc.encode_event(ipc.Event(f"pod.{p['name']}.{kind}", self.seq, data)))

    def change_silently(self, kind: str, p: Pod) -> None:
        with self.lock:
            self.seq += 1
            self._change(kind, p)

    def send_raw(self, frames: list[bytes]) -> None:
        self.outbox.put(frames)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.pub.close(linger=0)
        self.router.close(linger=0)


class Watcher:
    """``watch_pods`` on a thread, with every ``on_pods`` call queued for the test to read."""

    def __init__(self, cfg: config.Config) -> None:
        self.calls: queue.Queue[list[Pod]] = queue.Queue()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=watch_pods, args=(cfg, self.calls.put, self.stop),
                                       daemon=True)
        self.thread.start()

    def until(self, pred: Callable[[dict[str, Pod]], bool], timeout: float = 5.0) -> dict[str, Pod]:
        deadline = time.monotonic() + timeout
        seen: dict[str, Pod] = {}
        while not pred(seen):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"on_pods never matched; last saw {sorted(seen)}")
            try:
                seen = {p["name"]: p for p in self.calls.get(timeout=left)}
            except queue.Empty:
                continue
        return seen

    def names(self, *names: str, timeout: float = 5.0) -> dict[str, Pod]:
        return self.until(lambda seen: set(seen) == set(names), timeout)

    def quiet_for(self, seconds: float) -> bool:
        """True if on_pods was not called for ``seconds`` (for things that must not happen)."""
        try:
            self.calls.get(timeout=seconds)
        except queue.Empty:
            return True
        return False

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive()


@pytest.fixture
def cfg() -> Iterator[config.Config]:
    run_dir = tempfile.mkdtemp(prefix="rkp", dir="/tmp")   # ipc:// paths must stay short
    make_run_dir(run_dir)
    yield config.load(environ={"RIKLET_RUN_DIR": run_dir, "RIKLET_STATE_DIR": run_dir})
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
def fakes(cfg: config.Config) -> Iterator[Callable[..., FakeMemory]]:
    made: list[FakeMemory] = []

    def make(pods: list[Pod], **kw: Any) -> FakeMemory:
        made.append(FakeMemory(cfg, pods, **kw))
        return made[-1]
    yield make
    for f in made:
        f.close()


@pytest.fixture
def watcher(cfg: config.Config) -> Iterator[Watcher]:
    w = Watcher(cfg)
    yield w
    w.close()


# --- the feed against a fake memory --------------------------------------------------------

def test_snapshot_then_events_keep_the_pods_current(fakes: Any, watcher: Watcher) -> None:
    mem = fakes([pod("web-0")])
    watcher.names("web-0")
    mem.wait_subscribed()
    mem.publish("applied", pod("web-1"))
    watcher.names("web-0", "web-1")
    mem.publish("status", pod("web-1", version=2))
    watcher.until(lambda seen: seen.get("web-1", {}).get("version") == 2)
    mem.publish("removed", pod("web-0"))
    assert watcher.names("web-1")["web-1"]["version"] == 2


def test_pods_without_ports_or_endpoints_cost_no_recomputation(fakes: Any, watcher: Watcher) -> None:
    mem = fakes([pod("web-0")])
    watcher.names("web-0")
    mem.wait_subscribed()
    batch = {**pod("job-0"), "spec": {"workload": "job"}, "status": {"phase": "Running"}}
    mem.publish("applied", batch)
    mem.publish("status", {**batch, "version": 2})
    assert watcher.quiet_for(0.5)   # nothing that routes changed: routes are not recomputed
    mem.publish("applied", pod("web-1"))
    assert set(watcher.names("web-0", "web-1")) == {"web-0", "web-1"}
    # a pod that stops asking for ports leaves the set handed over
    mem.publish("applied", {**batch, "name": "web-1", "uid": "uid-web-1", "version": 2})
    watcher.names("web-0")


def test_a_gap_in_event_numbers_brings_a_new_snapshot(fakes: Any, watcher: Watcher) -> None:
    mem = fakes([pod("web-0")], heartbeat=None)
    watcher.names("web-0")
    mem.wait_subscribed()
    mem.change_silently("applied", pod("lost"))       # an event that never arrived
    mem.publish("applied", pod("web-1"))
    watcher.names("web-0", "lost", "web-1")
    assert mem.snapshots == 2


def test_a_heartbeat_ahead_of_the_mirror_brings_a_new_snapshot(fakes: Any, watcher: Watcher) -> None:
    mem = fakes([pod("web-0")], heartbeat=None)
    watcher.names("web-0")
    mem.wait_subscribed()
    mem.change_silently("removed", pod("web-0"))
    mem.change_silently("applied", pod("web-1"))
    mem.heartbeat()
    watcher.names("web-1")


def test_a_restarted_memory_with_a_new_epoch_is_mirrored_afresh(
        cfg: config.Config, fakes: Any, watcher: Watcher) -> None:
    first = fakes([pod("web-0")], epoch="e1", seq=50)
    watcher.names("web-0")
    first.close()
    fakes([pod("db-0")], epoch="e2", seq=3)       # lower seq: only the epoch tells
    watcher.names("db-0")


def test_memory_down_keeps_the_pods_and_the_feed_catches_up_when_it_returns(
        cfg: config.Config, fakes: Any, watcher: Watcher) -> None:
    assert watcher.quiet_for(0.7)                   # nothing to report, and no empty table either
    mem = fakes([pod("web-0")])
    watcher.names("web-0")
    mem.close()
    assert watcher.quiet_for(1.5), "memory going away must not change the pods"
    fakes([pod("web-0"), pod("web-1")], epoch="e2")
    watcher.names("web-0", "web-1")


def test_garbage_on_the_event_socket_is_ignored(fakes: Any, watcher: Watcher) -> None:
    mem = fakes([pod("web-0")], heartbeat=None)
    watcher.names("web-0")
    mem.wait_subscribed()
    mem.send_raw([b"pod.x.applied", b"not json"])
    mem.send_raw([b"only one frame"])
    mem.publish("applied", pod("web-1"))
    watcher.names("web-0", "web-1")
    assert mem.snapshots == 1


# --- the ordering rules, without sockets ---------------------------------------------------

def ev(seq: int, data: dict[str, Any], topic: str = "pod.x.applied") -> ipc.Event:
    return ipc.Event(topic, seq, data)


def test_events_already_in_the_snapshot_are_skipped_and_the_next_one_applies() -> None:
    m = PodSequence()
    m.load({"seq": 5, "epoch": "e", "pods": [pod("a")]})
    assert m.apply(ev(5, {"kind": "applied", "pod": pod("b")})) is Outcome.IGNORED
    assert m.apply(ev(6, {"kind": "applied", "pod": pod("b")})) is Outcome.CHANGED
    assert m.apply(ev(7, {"kind": "status", "pod": pod("b")})) is Outcome.IGNORED   # same record
    assert m.apply(ev(8, {}, topic="node.ready")) is Outcome.IGNORED               # counts, no pods
    assert m.apply(ev(9, {"kind": "removed", "name": "a", "uid": "uid-a"})) is Outcome.CHANGED
    assert [p["name"] for p in m.records()] == ["b"] and m.seq == 9


def test_records_share_their_keys_and_short_strings_and_keep_their_values() -> None:
    m = PodSequence()
    first, second = json.loads(json.dumps(pod("a"))), json.loads(json.dumps(pod("b")))
    m.load({"seq": 0, "epoch": "e", "pods": [first]})
    assert m.apply(ev(1, {"kind": "applied", "pod": second})) is Outcome.CHANGED
    a, b = m.pods["a"], m.pods["b"]
    assert a == pod("a") and b == pod("b"), "the same record, only spelled with shared strings"
    assert all(ka is kb for ka, kb in zip(sorted(a, key=str), sorted(b, key=str), strict=True))
    assert a["status"]["phase"] is b["status"]["phase"]


def test_a_mirror_keeping_stubs_ignores_what_its_stubs_do_not_hold() -> None:
    job = {**pod("job"), "spec": {"workload": "job"}, "status": {"phase": "Pending"}}
    m = PodSequence(keep=feed._kept)
    m.load({"seq": 0, "epoch": "e", "pods": [pod("web"), job]})
    assert m.pods["web"] == pod("web")   # a pod that routes is held whole
    assert m.pods["job"] == {"name": "job", "uid": "uid-job", "version": 1, "desired": "running"}
    running = {**job, "status": {"phase": "Running"}}
    assert m.apply(ev(1, {"kind": "status", "pod": running})) is Outcome.IGNORED
    assert m.apply(ev(2, {"kind": "status", "pod": {**running, "version": 2}})) is Outcome.CHANGED
    assert m.apply(ev(3, {"kind": "applied", "pod": {**pod("job"), "version": 3}})) is Outcome.CHANGED
    assert m.pods["job"]["status"]["endpoints"], "it asks for a port now: held whole"


def test_a_removal_of_an_older_uid_leaves_the_newer_pod() -> None:
    m = PodSequence()
    m.load({"seq": 0, "epoch": "e", "pods": [pod("a")]})
    assert m.apply(ev(1, {"kind": "removed", "name": "a", "uid": "old-uid"})) is Outcome.IGNORED
    assert [p["name"] for p in m.records()] == ["a"]


@pytest.mark.parametrize("event, why", [
    (ev(7, {"kind": "applied", "pod": pod("b")}), "gap"),
    (ev(0, {"seq": 6, "epoch": "e"}, topic="hb"), "heartbeat ahead"),
    (ev(0, {"seq": 5, "epoch": "other"}, topic="hb"), "new epoch"),
])
def test_doubt_about_what_was_missed_asks_for_a_snapshot(event: ipc.Event, why: str) -> None:
    m = PodSequence()
    m.load({"seq": 5, "epoch": "e", "pods": []})
    assert m.apply(event) is Outcome.RESYNC, why
    assert not m.synced


def test_a_heartbeat_behind_the_snapshot_is_fine() -> None:
    m = PodSequence()
    m.load({"seq": 5, "epoch": "e", "pods": []})
    assert m.apply(ev(0, {"seq": 4, "epoch": "e"}, topic="hb")) is Outcome.IGNORED
    assert m.synced


@pytest.mark.parametrize("snapshot, field", [
    ([], "result"), ({"seq": -1, "epoch": "e", "pods": []}, "result.seq"),
    ({"seq": 1, "epoch": 3, "pods": []}, "result.epoch"), ({"seq": 1, "epoch": "e"}, "result.pods"),
    ({"seq": 1, "epoch": "e", "pods": [{"uid": "x"}]}, "result.pods[0]"),
])
def test_a_malformed_snapshot_is_refused_naming_the_field(snapshot: Any, field: str) -> None:
    with pytest.raises(BadFrame) as err:
        PodSequence().load(snapshot)
    assert err.value.field == field


# --- the proxy process end to end ----------------------------------------------------------

def test_the_proxy_process_follows_memory_and_stops_on_sigterm(cfg: config.Config, fakes: Any) -> None:
    backend = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=say_hi, args=(backend,), daemon=True).start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        host_port = probe.getsockname()[1]
    mem = fakes([pod("web-0", host_port=host_port, port=backend.getsockname()[1])])
    log_path = os.path.join(cfg.paths_run_dir, "proxy.log")
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "services.proxy", "--run-dir", cfg.paths_run_dir,
                                 "--bind-address", "127.0.0.1", "--log-level", "DEBUG",
                                 # the user-space path: no kernel table and no NATed flows outlive the test
                                 "--proxy-mode", "userspace"],
                                stderr=log_file, cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        wait_until(lambda: read_from(host_port) == b"hi", "the route to open")
        mem.publish("desired", pod("web-0", host_port=host_port, desired="stopped"))
        wait_until(lambda: read_from(host_port) is None, "the route to close")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        backend.close()
        with open(log_path) as log_file:
            print(log_file.read())   # shown by pytest when the test fails


def say_hi(server: socket.socket) -> None:
    while True:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.sendall(b"hi")


def read_from(port: int) -> bytes | None:
    """What the proxy relays on ``port``; None if nothing listens there."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            return sock.recv(10)
    except ConnectionRefusedError:
        return None


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- the fake checked against the real contract ------------------------------------------------

def _shape(frames: list[bytes]) -> tuple[str, tuple[str, ...]]:
    """An event's kind of topic and the keys of its data: what a subscriber relies on."""
    ev = ipc.decode_event(frames)
    kind = "hb" if ev.topic == "hb" else "pod.*." + ev.topic.rsplit(".", 1)[-1]
    return kind, tuple(sorted(ev.data))


def _events(sub: zmq.Socket[Any], count: int) -> list[list[bytes]]:
    got: list[list[bytes]] = []
    deadline = time.monotonic() + 5
    while len(got) < count:
        assert sub.poll(max(1, int((deadline - time.monotonic()) * 1000))), f"only {len(got)} events"
        frames = sub.recv_multipart()
        if ipc.decode_event(frames).topic != "hb":
            got.append(frames)
    return got


def test_the_fake_memory_speaks_the_real_memorys_contract(cfg: config.Config, fakes: Any) -> None:
    """FakeMemory stands in for memory in the tests above: it must send what the real memory
    sends (snapshot keys, event topics and data keys, record fields), or those tests prove
    nothing. The real service is started and driven through MemoryClient."""
    base = tempfile.mkdtemp(prefix="rkc", dir="/tmp")
    real = Memory(Path(base))
    try:
        real.start()
        rcfg = real.config()
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(rcfg.memory_events_endpoint)
        client = MemoryClient(rcfg)
        wait_until(lambda: bool(sub.poll(100)), "the real memory's heartbeat", timeout=5)
        hb = ipc.decode_event(sub.recv_multipart())
        rec = client.apply("web-0", pod("web-0")["spec"])["pod"]
        client.set_status("web-0", rec["uid"], pod("web-0")["status"], generation=rec["generation"])
        reply = client.set_desired("web-0", "deleted")
        done = reply.get("pod", reply)
        client.remove("web-0", done["uid"], done["generation"])
        real_events = _events(sub, 4)
        client.apply("web-1", pod("web-1")["spec"])
        snapshot = client.snapshot()
        sub.close(linger=0)
        client.close()
    finally:
        real.cleanup()
        shutil.rmtree(base, ignore_errors=True)

    mem = fakes([pod("web-9")], heartbeat=None)
    fake_sub = zmq.Context.instance().socket(zmq.SUB)
    fake_sub.setsockopt(zmq.SUBSCRIBE, b"")
    fake_sub.connect(cfg.memory_events_endpoint)
    mem.wait_subscribed()
    for kind in ("applied", "status", "desired", "removed"):
        mem.publish(kind, pod("web-0"))
    fake_events = _events(fake_sub, 4)
    mem.heartbeat()
    assert fake_sub.poll(5000)
    fake_hb = ipc.decode_event(fake_sub.recv_multipart())
    fake_sub.close(linger=0)

    assert [_shape(f) for f in fake_events] == [_shape(f) for f in real_events]
    assert sorted(fake_hb.data) == sorted(hb.data)
    assert sorted(mem._handle(ipc.Request("snapshot", {}, "id"))) == sorted(snapshot)
    real_record = snapshot["pods"][0]
    assert set(pod("web-9")) <= set(real_record), "the fake's records carry fields memory has not"
    assert real_record["status"]["phase"] == "Pending" and real_record["desired"] == "running"
