"""The memory service as other programs see it: a real process, real ZeroMQ, real SQLite."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest
import zmq

from common import ipc
from common.config import Config, load
from common.errors import Conflict, InvalidArgument, NotFound, RikletError, Unavailable
from common.memclient import MemoryClient, PodMirror
from common.zmqutil import RequestClient

ROOT = Path(__file__).resolve().parents[1]
SPEC: dict[str, Any] = {"containers": [{"name": "app", "image": "busybox"}]}


def wait_until(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def socket(kind: int) -> zmq.Socket[Any]:
    ctx: zmq.Context[Any] = zmq.Context.instance()
    return ctx.socket(kind)


class Memory:
    """Starts `python -m services.memory` processes on one base directory and cleans them up."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.procs: list[subprocess.Popen[bytes]] = []

    def config(self, run: str = "run", state: str = "state") -> Config:
        return load(environ={"RIKLET_RUN_DIR": str(self.base / run),
                             "RIKLET_STATE_DIR": str(self.base / state)})

    def spawn(self, run: str = "run", state: str = "state") -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if k != "RIKLET_CONFIG"}
        env.update(RIKLET_RUN_DIR=str(self.base / run), RIKLET_STATE_DIR=str(self.base / state))
        with open(self.base / "memory.log", "ab") as logfile:
            proc = subprocess.Popen([sys.executable, "-m", "services.memory"], cwd=ROOT, env=env,
                                    stdout=logfile, stderr=logfile)
        self.procs.append(proc)
        return proc

    def start(self, run: str = "run", state: str = "state") -> subprocess.Popen[bytes]:
        proc = self.spawn(run, state)
        probe = RequestClient(self.config(run, state).memory_endpoint, timeout=0.2, retries=0)

        def answers() -> bool:
            assert proc.poll() is None, f"memory exited with {proc.returncode}: {self.log()}"
            try:
                return bool(probe.call("ping")["pid"] == proc.pid)
            except RikletError:
                return False

        try:
            wait_until(answers, what="memory to answer ping")
        finally:
            probe.close()
        return proc

    def kill9(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def log(self) -> str:
        return (self.base / "memory.log").read_text(errors="replace")

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def memory() -> Iterator[Memory]:
    # Unix socket paths are limited to ~107 bytes: pytest's tmp_path is too deep.
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="mem"))
    mem = Memory(base)
    yield mem
    mem.cleanup()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def client(memory: Memory) -> Iterator[MemoryClient]:
    c = MemoryClient(memory.config())
    yield c
    c.close()


def test_apply_get_list_and_versions(memory: Memory, client: MemoryClient) -> None:
    memory.start()
    created = client.apply("web", SPEC)
    assert created["changed"] is True and created["pod"]["version"] == 1
    uid = created["pod"]["uid"]
    assert client.apply("web", SPEC) == {"pod": created["pod"], "changed": False}
    assert client.set_status("web", uid, {"phase": "Running"}, expect_version=1)["version"] == 2
    assert client.set_desired("web", "stopped")["version"] == 3
    assert client.apply("db", SPEC, uid="fixed")["pod"]["uid"] == "fixed"
    assert [p["name"] for p in client.list()] == ["db", "web"]
    assert client.get("web")["status"] == {"phase": "Running"}
    assert client.snapshot()["seq"] == 4
    gone = client.set_desired("db", "deleted")
    client.remove("db", "fixed", gone["generation"])
    assert [p["name"] for p in client.list()] == ["web"]


def test_conflicts_and_bad_requests_name_the_field(memory: Memory, client: MemoryClient) -> None:
    memory.start()
    uid = client.apply("web", SPEC)["pod"]["uid"]
    client.set_status("web", uid, {"phase": "Running"})
    cases: list[tuple[Callable[[], Any], type[RikletError], str]] = [
        (lambda: client.set_status("web", "other", {}), Conflict, "uid"),
        (lambda: client.set_status("web", uid, {}, expect_version=1), Conflict, "expect_version"),
        (lambda: client.remove("web", "other", 1), Conflict, "uid"),
        (lambda: client.remove("web", uid, 1), Conflict, "desired"),
        (lambda: client.get("nope"), NotFound, "name"),
        (lambda: client.apply("Bad_Name", SPEC), InvalidArgument, "args.name"),
        (lambda: client._call("pod.launch"), InvalidArgument, "body.op"),
        (lambda: client._call("pod.get", name="web", extra=1), InvalidArgument, "args.extra"),
        (lambda: client._call("pod.apply", name="web"), InvalidArgument, "args.spec"),
    ]
    for call, error, field in cases:
        with pytest.raises(error) as exc:
            call()
        assert exc.value.field == field
    assert client.get("web")["version"] == 2


def test_events_are_published_with_their_sequence_and_a_heartbeat(memory: Memory,
                                                                   client: MemoryClient) -> None:
    memory.start()
    cfg = memory.config()
    sub = socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(cfg.memory_events_endpoint)
    try:
        def next_event() -> ipc.Event:
            assert sub.poll(5000), "no event within 5 s"
            return ipc.decode_event(sub.recv_multipart())

        hb = next_event()  # a heartbeat proves the subscription has landed
        assert hb.topic == "hb" and hb.data == {"seq": 0, "epoch": client.snapshot()["epoch"]}
        pod = client.apply("web", SPEC)["pod"]
        ev = next_event()
        while ev.topic == "hb":
            ev = next_event()
        assert (ev.topic, ev.seq, ev.data) == ("pod.web.applied", 1, {"kind": "applied", "pod": pod})
        hb = next_event()
        assert (hb.topic, hb.seq, hb.data["seq"]) == ("hb", 1, 1)
    finally:
        sub.close(linger=0)


def test_a_reply_means_durable_even_under_kill_9(memory: Memory, client: MemoryClient) -> None:
    proc = memory.start()
    pod = client.apply("web", SPEC)["pod"]
    memory.kill9(proc)
    memory.start()
    assert client.get("web") == pod
    assert client.snapshot()["seq"] == 1


def test_concurrent_writes_each_succeed_or_fail_alone_with_events_in_order(memory: Memory,
                                                                         client: MemoryClient) -> None:
    # Eight writers at once: memory answers what is waiting with one commit (group commit);
    # a refused write among them changes nothing and takes no other write down with it.
    memory.start()
    sub = socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(memory.config().memory_events_endpoint)

    def work(k: int) -> None:
        c = MemoryClient(memory.config())
        try:
            for i in range(40):
                name = f"w{k}-{i}"
                uid = c.apply(name, SPEC)["pod"]["uid"]
                with pytest.raises(Conflict):
                    c.set_status(name, "not-" + uid, {"phase": "Failed"})
                c.set_status(name, uid, {"phase": "Running", "n": i}, generation=1)
        finally:
            c.close()

    try:
        assert sub.poll(5000), "no heartbeat within 5 s"  # the subscription has landed
        sub.recv_multipart()
        with futures.ThreadPoolExecutor(8) as pool:
            for done in [pool.submit(work, k) for k in range(8)]:
                done.result()
        pods = client.list()
        assert len(pods) == 320
        assert all(p["version"] == 2 and p["status"]["phase"] == "Running" for p in pods)
        assert client.snapshot()["seq"] == 640
        seqs: list[int] = []
        while len(seqs) < 640:
            assert sub.poll(5000), f"only {len(seqs)} events of 640"
            ev = ipc.decode_event(sub.recv_multipart())
            if ev.topic != "hb":
                seqs.append(ev.seq)
        assert seqs == list(range(1, 641))
    finally:
        sub.close(linger=0)


def test_every_acknowledged_write_survives_kill_9_amid_concurrent_writes(memory: Memory,
                                                                          client: MemoryClient) -> None:
    proc = memory.start()
    acked: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def work(k: int) -> None:
        c = MemoryClient(memory.config(), timeout=0.5, retries=0)
        try:
            for i in itertools.count():
                if stop.is_set():
                    return
                try:
                    c.apply(f"k{k}-{i}", SPEC)
                except Unavailable:
                    return
                with lock:
                    acked.append(f"k{k}-{i}")
        finally:
            c.close()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(acked) >= 300, what="300 acknowledged writes")
        memory.kill9(proc)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    memory.start()
    stored = {p["name"] for p in client.list()}
    assert set(acked) <= stored and len(acked) >= 300


def test_a_retried_request_is_answered_not_applied_twice(memory: Memory, client: MemoryClient) -> None:
    proc = memory.start()
    uid = client.apply("web", SPEC)["pod"]["uid"]
    frames = ipc.encode_request(ipc.Request("pod.set_status", {
        "name": "web", "uid": uid, "status": {"phase": "Running"}, "expect_version": 1}))
    first = send_raw(memory.config(), frames)
    memory.kill9(proc)  # as if the reply had been lost with the process
    memory.start()
    retry = send_raw(memory.config(), frames)
    assert first == retry and first.ok
    assert client.get("web")["version"] == 2


def test_a_reused_request_id_with_other_arguments_is_a_new_write(memory: Memory,
                                                                 client: MemoryClient) -> None:
    memory.start()
    uid = client.apply("web", SPEC)["pod"]["uid"]
    for phase, version in (("Running", 2), ("Failed", 3)):
        frames = ipc.encode_request(ipc.Request("pod.set_status", {
            "name": "web", "uid": uid, "status": {"phase": phase}}, id="same"))
        assert send_raw(memory.config(), frames).result["version"] == version
    assert client.get("web")["status"] == {"phase": "Failed"}


def send_raw(cfg: Config, frames: list[bytes]) -> ipc.Reply:
    sock = socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cfg.memory_endpoint)
    try:
        sock.send_multipart(frames)
        assert sock.poll(5000), "no reply within 5 s"
        reply = sock.recv_multipart()
        # A message starting with an empty frame is taken for a REQ peer's and answered in kind.
        return ipc.decode_reply(reply[1:] if frames[:1] == [b""] else reply)
    finally:
        sock.close()


def _body(**fields: Any) -> bytes:
    return json.dumps({"v": 1, "id": "g1", "op": "pod.apply",
                       "args": {"name": "evil", "spec": {}}, **fields}).encode()


GARBAGE: list[tuple[str, list[bytes], str]] = [
    ("one frame", [b"hello"], "frames"),
    ("three frames", [ipc.MAGIC, _body(), b"extra"], "frames"),
    ("not JSON", [ipc.MAGIC, b"\xff{not json"], "body"),
    ("wrong version", [ipc.MAGIC, _body(v=99)], "body.v"),
    ("JSON array", [ipc.MAGIC, b'[{"v": 1}]'], "body"),
    ("10 MB frame", [ipc.MAGIC, _body(pad="x" * 10_000_000)], "body"),
    ("wrong magic", [b"riklet.ipc.v0", _body()], "frames[0]"),
    ("args not an object", [ipc.MAGIC, _body(args=[1])], "body.args"),
    ("empty frame only", [b""], "frames"),
]


@pytest.mark.parametrize(("frames", "field"), [(f, fld) for _, f, fld in GARBAGE],
                         ids=[name for name, _, _ in GARBAGE])
def test_garbage_frames_get_an_error_and_change_nothing(memory: Memory, client: MemoryClient,
                                                         frames: list[bytes], field: str) -> None:
    memory.start()
    client.apply("web", SPEC)
    before = client.snapshot()
    reply = send_raw(memory.config(), frames)
    assert not reply.ok and reply.error is not None
    assert reply.error["code"] == "bad_frame" and reply.error["field"] == field
    assert client.snapshot() == before


def test_a_frame_too_deeply_nested_to_decode_does_not_kill_the_service(memory: Memory,
                                                                       client: MemoryClient) -> None:
    proc = memory.start()
    before = client.snapshot()
    sock = socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(memory.config().memory_endpoint)
    sock.send_multipart([ipc.MAGIC, b"[" * 100_000])
    sock.close()
    assert client.snapshot() == before
    assert proc.poll() is None


def test_a_second_instance_refuses_to_start(memory: Memory, client: MemoryClient) -> None:
    first = memory.start()
    client.apply("web", SPEC)
    for state in ("state", "other-state"):  # same run dir, with the same or another database
        twin = memory.spawn(state=state)
        assert twin.wait(10) == 1
    assert "another memory service" in memory.log()
    assert first.poll() is None
    assert client.get("web")["version"] == 1


def test_restart_after_kill_9_replaces_the_stale_sockets(memory: Memory, client: MemoryClient) -> None:
    cfg = memory.config()
    memory.kill9(memory.start())
    sockets = [Path(cfg.paths_run_dir, name) for name in ("memory.sock", "memory-events.sock")]
    assert all(path.exists() for path in sockets)  # left behind by the crash
    memory.start()
    assert client.apply("web", SPEC)["changed"] is True
    assert stat.S_IMODE(os.stat(cfg.paths_run_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(cfg.paths_state_dir).st_mode) == 0o700
    for path in sockets:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_exits_cleanly(memory: Memory, sig: signal.Signals) -> None:
    proc = memory.start()
    proc.send_signal(sig)
    assert proc.wait(5) == 0


def test_the_client_rides_through_a_memory_restart(memory: Memory, client: MemoryClient) -> None:
    memory.kill9(memory.start())
    results: list[Any] = []
    call = threading.Thread(target=lambda: results.append(client.apply("web", SPEC)))
    call.start()  # memory is down while the request goes out
    memory.start()
    call.join(15)
    assert results and results[0]["changed"] is True
    assert [p["name"] for p in client.list()] == ["web"]


def test_the_client_gives_up_with_unavailable(memory: Memory) -> None:
    impatient = MemoryClient(memory.config(), timeout=0.2, retries=1)
    with pytest.raises(Unavailable):
        impatient.list()
    impatient.close()


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any] | None]] = []

    def __call__(self, name: str, record: dict[str, Any] | None) -> None:
        self.calls.append((name, record))


@pytest.fixture
def mirror(memory: Memory) -> Iterator[tuple[PodMirror, Recorder]]:
    rec = Recorder()
    m = PodMirror(memory.config(), on_change=rec)
    yield m, rec
    m.stop()


def test_the_mirror_follows_changes_and_converges_after_a_restart(
        memory: Memory, client: MemoryClient, mirror: tuple[PodMirror, Recorder]) -> None:
    m, rec = mirror
    m.start()  # before memory: it waits
    proc = memory.start()
    uid = client.apply("web", SPEC)["pod"]["uid"]
    assert m.wait_synced(10)
    wait_until(lambda: "web" in m.pods(), what="web in the mirror")
    memory.kill9(proc)
    assert "web" in m.pods()  # memory down: the last known state stays
    memory.start()
    client.set_status("web", uid, {"phase": "Running"})
    client.apply("db", SPEC)
    wait_until(lambda: m.pods() == {p["name"]: p for p in client.list()}, what="the mirror to converge")
    assert m.seq == client.snapshot()["seq"]
    assert dict(rec.calls) == m.pods()  # replaying on_change in order gives the same state


def test_the_mirror_tells_what_each_change_replaced_and_can_share_its_records(
        memory: Memory, client: MemoryClient) -> None:
    seen: list[tuple[str, dict[str, Any] | None, dict[str, Any] | None]] = []
    shared = Recorder()
    m = PodMirror(memory.config(), on_change=shared, shared=True,
                  on_transition=lambda name, record, before: seen.append((name, record, before)))
    memory.start()
    m.start()
    try:
        assert m.wait_synced(10)
        web = client.apply("web", SPEC)["pod"]
        running = client.set_status("web", web["uid"], {"phase": "Running"})
        running = running.get("pod", running)
        client.set_desired("web", "deleted")
        client.remove("web", web["uid"], web["generation"] + 1)
        wait_until(lambda: len(seen) == 4, what="four changes")
        assert [(n, r and r["version"], b and b["version"]) for n, r, b in seen] == [
            ("web", 1, None), ("web", 2, 1), ("web", 3, 2), ("web", None, 3)]
        assert seen[1][1] == running and seen[3][2] == seen[2][1]
        # shared: the subscriber holds the mirror's own record, not a copy of it
        client.apply("db", SPEC)
        wait_until(lambda: "db" in m.pods(), what="db in the mirror")
        assert shared.calls[-1][1] is m._state.pods["db"]
    finally:
        m.stop()


def test_the_mirror_catches_up_across_a_gap(memory: Memory, client: MemoryClient,
                                            mirror: tuple[PodMirror, Recorder]) -> None:
    m, rec = mirror
    proc = memory.start()
    web = client.apply("web", SPEC)["pod"]
    m.start()
    assert m.wait_synced(10)
    wait_until(lambda: "web" in m.pods(), what="web in the mirror")
    memory.kill9(proc)
    # Another instance changes the database where the mirror cannot hear its events.
    elsewhere = memory.start(run="run2")
    other = MemoryClient(memory.config(run="run2"))
    db = other.apply("db", SPEC)["pod"]
    other.set_desired("web", "deleted")
    other.remove("web", web["uid"], 2)
    other.close()
    elsewhere.terminate()
    assert elsewhere.wait(10) == 0
    rec.calls.clear()
    memory.start()  # back where the mirror listens: its heartbeat reveals the gap
    wait_until(lambda: m.pods() == {"db": db}, what="the mirror to resync")
    assert sorted(rec.calls, key=lambda c: c[0]) == [("db", db), ("web", None)]
    assert m.seq == 4  # web, db, web deleted, web removed


def test_the_mirror_resyncs_when_the_database_is_replaced(memory: Memory, client: MemoryClient,
                                                          mirror: tuple[PodMirror, Recorder]) -> None:
    m, rec = mirror
    proc = memory.start()
    client.apply("web", SPEC)
    m.start()
    wait_until(lambda: "web" in m.pods(), what="web in the mirror")
    old_epoch = m.epoch
    memory.kill9(proc)
    shutil.rmtree(memory.base / "state")
    memory.start()
    wait_until(lambda: m.pods() == {}, what="the mirror to drop what the new database lacks")
    assert m.epoch != old_epoch and rec.calls[-1] == ("web", None)

