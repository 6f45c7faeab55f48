"""Seamless proxy restarts: the hand-off protocol on its own, two worker processes handing over
against a fake memory, the worker's timeouts, the keeper, and the real agent restarting or
losing its proxy while a client probes a host port every 5 ms."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvloop

from common import config
from common.zmqutil import RequestClient, make_run_dir
from services.proxy import handoff
from services.proxy.handoff import HandoffError
from services.proxy.keeper import Backoff
from services.proxy.routes import Endpoint
from services.proxy.server import ProxySettings
from services.proxy.stats import Stats
from services.proxy.worker import Lifetimes, Worker
from tests.stack import Agent, pid_alive
from tests.support import free_port, free_ports, wait_for
from tests.test_proxy_feed import FakeMemory, pod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def open_fds() -> set[int]:
    # The listing's own descriptor is in the listing, closed by the time it returns.
    return {int(fd) for fd in os.listdir("/proc/self/fd") if is_open(int(fd))}


def raw_frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


# --- frames ------------------------------------------------------------------------------------

def test_a_frame_carries_more_descriptors_than_one_message_can() -> None:
    a, b = socket.socketpair()
    listener = socket.create_server(("127.0.0.1", 0))
    fds = [os.dup(listener.fileno()) for _ in range(300)]   # over SCM_MAX_FD (253)
    try:
        sender = threading.Thread(target=handoff.send_frame, args=(a, {"op": "x", "n": 300}, fds))
        sender.start()
        b.settimeout(5)
        frame, got = handoff.recv_frame(b, max_fds=300)
        sender.join(5)
        assert frame == {"op": "x", "n": 300} and len(got) == 300
        assert all(os.fstat(fd).st_ino == os.fstat(listener.fileno()).st_ino for fd in got)
        handoff.close_fds(got)
    finally:
        handoff.close_fds(fds)
        for s in (a, b, listener):
            s.close()


@pytest.mark.parametrize("data, field", [
    (raw_frame(b"{not json"), "frame"),
    (raw_frame(b"\xff\xfe"), "frame"),
    (raw_frame(b"[1, 2]"), "frame"),
    (raw_frame(b"[" * 100000 + b"]" * 100000), "frame"),     # nested past the recursion limit
    (struct.pack(">I", handoff.MAX_FRAME + 1), "frame.length"),
    (raw_frame(b'{"op": "takeover"}')[:-3], "frame"),      # cut short: the peer closes
    (b"\x00\x00", "frame"),
])
def test_a_malformed_frame_raises_naming_the_field(data: bytes, field: str) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(data)
        a.shutdown(socket.SHUT_WR)
        b.settimeout(2)
        with pytest.raises(HandoffError) as err:
            handoff.recv_frame(b)
        assert err.value.field == field, err.value


def test_descriptors_nobody_asked_for_are_closed() -> None:
    a, b = socket.socketpair()
    extra = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with a, b, extra:
        before = open_fds()
        handoff.send_frame(a, {"op": "takeover"}, [extra.fileno()])
        b.settimeout(2)
        with pytest.raises(HandoffError) as err:
            handoff.recv_frame(b)     # the takeover request carries no descriptor
        assert err.value.field == "listeners"
        assert open_fds() == before


# --- the state frame ---------------------------------------------------------------------------

def state(*keys: tuple[str, int], stats: Stats | None = None) -> dict[str, Any]:
    routes = {key: (Endpoint("127.0.0.1", 9),) for key in keys}
    frame = handoff.encode_state(routes, {}, (stats or Stats()).as_dict(), list(keys))
    return json.loads(json.dumps(frame))


def listening(kind: int = socket.SOCK_STREAM) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind(("127.0.0.1", 0))
    if kind == socket.SOCK_STREAM:
        sock.listen()
    return sock


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(frame: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = frame
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        target[int(last) if last.isdigit() else last] = value
    return mutate


@pytest.mark.parametrize("mutate, field", [
    (_set("routes", {}), "routes"),
    (_set("routes.0", 3), "routes[0]"),
    (_set("routes.0.protocol", "QUIC"), "routes[0].protocol"),
    (_set("routes.0.port", "80"), "routes[0].port"),
    (_set("routes.0.port", True), "routes[0].port"),
    (_set("routes.0.endpoints", {}), "routes[0].endpoints"),
    (_set("routes.0.endpoints.0", "127.0.0.1:9"), "routes[0].endpoints[0]"),
    (_set("routes.0.endpoints.0.address", "example.com"), "routes[0].endpoints[0].address"),
    (_set("routes.0.endpoints.0.port", 70000), "routes[0].endpoints[0].port"),
    (_set("routes.0.balance", "random"), "routes[0].balance"),
    (lambda f: f["routes"].append(copy.deepcopy(f["routes"][0])), "routes[1]"),
    (_set("stats", []), "stats"),
    (_set("stats.connections_total", -1), "stats.connections_total"),
    (_set("stats.bytes_in", 1.5), "stats.bytes_in"),
    (_set("stats.udp_flows_total", "7"), "stats.udp_flows_total"),
    (_set("stats.connect_latency.buckets", {}), "stats.connect_latency.buckets"),
    (_set("stats.connect_latency.buckets.0", ["0.3", 1]), "stats.connect_latency.buckets[0]"),
    (_set("stats.connect_latency.buckets.1", [0.001, -1]), "stats.connect_latency.buckets[1]"),
    (_set("stats.connect_latency.count", "x"), "stats.connect_latency.count"),
    (_set("stats.connect_latency.sum", -2), "stats.connect_latency.sum"),
    (_set("listeners", "TCP"), "listeners"),
    (_set("listeners.0", ["TCP"]), "listeners[0]"),
    (_set("listeners.0", ["TCP", 0]), "listeners[0]"),
    (lambda f: f["listeners"].append(f["listeners"][0]), "listeners[1]"),
    (lambda f: f.pop("routes"), "routes"),
])
def test_a_malformed_state_raises_naming_the_field_and_closes_the_descriptors(
        mutate: Callable[[dict[str, Any]], None], field: str) -> None:
    sock = listening()
    with sock:
        frame = state(("TCP", sock.getsockname()[1]))
        mutate(frame)
        fd = os.dup(sock.fileno())
        with pytest.raises(HandoffError) as err:
            handoff.parse_state(frame, [fd])
        assert err.value.field == field, err.value
        assert field in str(err.value)
        assert not is_open(fd)


def test_a_listener_with_no_route_is_refused() -> None:
    sock = listening()
    with sock:
        frame = state(("TCP", sock.getsockname()[1]))
        frame["listeners"] = [["TCP", free_port()]]
        fd = os.dup(sock.fileno())
        with pytest.raises(HandoffError) as err:
            handoff.parse_state(frame, [fd])
        assert err.value.field == "listeners[0]" and "no route" in err.value.message
        assert not is_open(fd)


@pytest.mark.parametrize("attached", [0, 2])
def test_a_descriptor_count_that_does_not_match_the_listeners_is_refused(attached: int) -> None:
    sock = listening()
    with sock:
        fds = [os.dup(sock.fileno()) for _ in range(attached)]
        with pytest.raises(HandoffError) as err:
            handoff.parse_state(state(("TCP", sock.getsockname()[1])), fds)
        assert err.value.field == "listeners" and "descriptors" in err.value.message
        assert not any(is_open(fd) for fd in fds)


def _udp_for_tcp() -> tuple[tuple[str, int], int]:
    s = listening(socket.SOCK_DGRAM)
    fd = os.dup(s.fileno())
    key = ("TCP", s.getsockname()[1])
    s.close()
    return key, fd


def _not_listening() -> tuple[tuple[str, int], int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    fd = os.dup(s.fileno())
    key = ("TCP", s.getsockname()[1])
    s.close()
    return key, fd


def _other_port() -> tuple[tuple[str, int], int]:
    s = listening()
    fd = os.dup(s.fileno())
    s.close()
    return ("TCP", free_port()), fd


def _a_pipe() -> tuple[tuple[str, int], int]:
    r, w = os.pipe()
    os.close(w)
    return ("TCP", free_port()), r


def _a_unix_socket() -> tuple[tuple[str, int], int]:
    a, b = socket.socketpair()
    fd = os.dup(a.fileno())
    a.close()
    b.close()
    return ("UDP", free_port(socket.SOCK_DGRAM)), fd


@pytest.mark.parametrize("make", [_udp_for_tcp, _not_listening, _other_port, _a_pipe, _a_unix_socket])
def test_a_descriptor_that_is_not_the_listener_named_is_refused(
        make: Callable[[], tuple[tuple[str, int], int]]) -> None:
    key, fd = make()
    with pytest.raises(HandoffError) as err:
        handoff.parse_state(state(key), [fd])
    assert err.value.field == "listeners[0]", err.value
    assert not is_open(fd)


def test_a_good_state_gives_sockets_routes_and_counters_without_gauges() -> None:
    tcp, udp = listening(), listening(socket.SOCK_DGRAM)
    stats = Stats(connections_total=7, connections_active=3, udp_flows_active=2, bytes_out=99)
    stats.observe_connect(0.002)
    keys = [("TCP", tcp.getsockname()[1]), ("UDP", udp.getsockname()[1])]
    frame = state(*keys, stats=stats)
    got = handoff.parse_state(frame, [os.dup(tcp.fileno()), os.dup(udp.fileno())])
    try:
        assert sorted(got.sockets) == sorted(keys) and set(got.routes) == set(keys)
        fresh = Stats(connections_active=1)
        got.counters.add_to(fresh)
        assert fresh.connections_total == 7 and fresh.bytes_out == 99
        assert fresh.connections_active == 1 and fresh.udp_flows_active == 0   # gauges stay ours
        assert fresh.as_dict()["connect_latency"] == stats.as_dict()["connect_latency"]
    finally:
        got.close()
        tcp.close()
        udp.close()


def test_a_histogram_with_other_buckets_is_not_carried_but_the_rest_is() -> None:
    raw = Stats(connections_total=3).as_dict()
    raw["connect_latency"] = {"buckets": [[0.5, 1], [5.0, 2]], "sum": 1.0, "count": 2}
    counters = handoff.parse_counters(raw)
    assert counters.buckets is None and counters.values["connections_total"] == 3


# --- request_takeover against fake predecessors --------------------------------------------------

@pytest.fixture
def run_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="rkh", dir="/tmp")   # unix socket paths must stay short
    make_run_dir(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_no_file_or_a_stale_socket_file_means_no_predecessor(run_dir: str) -> None:
    path = handoff.socket_path(run_dir)
    assert handoff.request_takeover(path, timeout=1) is None
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)       # bound, never listening, then closed: what a killed worker leaves
    stale.close()
    started = time.monotonic()
    assert handoff.request_takeover(path, timeout=1) is None
    assert time.monotonic() - started < 0.5
    os.unlink(path)
    with open(path, "w", encoding="ascii") as fh:   # not even a socket
        fh.write("x")
    assert handoff.request_takeover(path, timeout=1) is None


class FakePredecessor:
    """Listens on the hand-off path, reads the takeover request and answers ``reply`` (with
    ``fds`` attached), then holds the connection until the other side closes it."""

    def __init__(self, path: str, reply: bytes, fds: list[int] | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen()
        self.reply, self.fds = reply, fds or []
        self.asked: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError, HandoffError):
            conn, _ = self.sock.accept()
            with conn:
                conn.settimeout(10)
                self.asked.append(handoff.recv_frame(conn)[0])
                socket.send_fds(conn, [self.reply], self.fds) if self.fds else conn.sendall(self.reply)
                conn.recv(1)

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


HOSTILE = [
    pytest.param(b"\xff" * 16, "frame.length", id="huge-length"),
    pytest.param(raw_frame(b"<html>"), "frame", id="not-json"),
    pytest.param(raw_frame(json.dumps({"routes": [], "stats": {}, "listeners": [["TCP", 1]]}).encode()),
                 "listeners[0]", id="listener-without-route"),
    pytest.param(raw_frame(json.dumps({"routes": [{"protocol": "TCP", "port": 1, "endpoints": [],
                                                   "balance": "round_robin"}],
                                       "stats": {"connections_total": "lots"}, "listeners": []}).encode()),
                 "stats.connections_total", id="bad-counter"),
]


@pytest.mark.parametrize("reply, field", HOSTILE)
def test_a_hostile_predecessor_is_abandoned_naming_the_field(
        run_dir: str, reply: bytes, field: str, caplog: pytest.LogCaptureFixture) -> None:
    path = handoff.socket_path(run_dir)
    extra = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fake = FakePredecessor(path, reply, [extra.fileno()])
    before = open_fds()
    try:
        assert handoff.request_takeover(path, timeout=1) is None
        assert fake.asked == [{"op": "takeover"}]
        [failure] = [r for r in caplog.records if r.getMessage() == "hand-off failed; binding anew"]
        assert getattr(failure, "field", None) == field
        fake.thread.join(5)    # its end of the connection closed too
        assert open_fds() <= before
    finally:
        fake.close()
        extra.close()


def test_handoff_server_and_takeover_end_to_end(run_dir: str) -> None:
    """Both sides in one process: state and sockets across, release, final counters."""
    path = handoff.socket_path(run_dir)
    tcp = listening()
    key = ("TCP", tcp.getsockname()[1])
    stats = Stats(connections_total=4)
    released = threading.Event()

    def on_release() -> dict[str, Any]:
        stats.connections_total += 2      # counted after the state was sent
        tcp.close()
        return stats.as_dict()

    server = handoff.HandoffServer(
        path, lambda: (handoff.encode_state({key: ()}, {}, stats.as_dict(), [key]), [os.dup(tcp.fileno())]),
        on_release, released.set)
    server.start()
    try:
        assert os.stat(path).st_mode & 0o777 == 0o600
        takeover = handoff.request_takeover(path)
        assert takeover is not None and list(takeover.state.sockets) == [key]
        assert takeover.state.counters.values["connections_total"] == 4
        since = takeover.release()
        assert since is not None and since.values["connections_total"] == 2
        assert released.wait(5)              # called once ``released`` has been sent
        assert not os.path.exists(path)      # gone before ``released``: the successor binds it
        adopted = takeover.state.sockets[key]
        with socket.create_connection(("127.0.0.1", key[1]), timeout=2):
            conn, _ = adopted.accept()      # the kernel socket outlived the old owner's close
            conn.close()
        takeover.state.close()
    finally:
        server.close()


# --- worker processes against a fake memory ------------------------------------------------------

def echo_server() -> socket.socket:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server


def echo(conn: socket.socket) -> None:
    with conn, contextlib.suppress(OSError):
        while data := conn.recv(65536):
            conn.sendall(data)


def echoes(port: int, payload: bytes = b"ping", timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            return echo_on(s, payload)
    except OSError:
        return False


def echo_on(sock: socket.socket, payload: bytes) -> bool:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(len(payload) - len(got))
        if not chunk:
            return False
        got += chunk
    return got == payload


class WorkerProc:
    """``python -m services.proxy --worker`` with its JSON log in a file of its own."""

    def __init__(self, cfg: config.Config, name: str) -> None:
        self.log_path = os.path.join(cfg.paths_state_dir, f"{name}.log")
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.proxy", "--worker", "--run-dir", cfg.paths_run_dir,
                 "--state-dir", cfg.paths_state_dir, "--bind-address", "127.0.0.1",
                 "--proxy-mode", cfg.proxy_mode, "--log-level", "DEBUG"], stderr=log_file, cwd=ROOT)

    def logged(self, msg: str) -> list[dict[str, Any]]:
        out = []
        with open(self.log_path, encoding="utf-8") as fh:
            for line in fh:
                with contextlib.suppress(ValueError):
                    rec = json.loads(line)
                    if rec.get("msg") == msg:
                        out.append(rec)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def cfg(run_dir: str) -> config.Config:
    # The user-space data path's hand-off (listening sockets); the kernel's: test_proxy_kernel*.
    return config.load(environ={"RIKLET_RUN_DIR": run_dir, "RIKLET_STATE_DIR": run_dir,
                                "RIKLET_PROXY_MODE": "userspace"})


@pytest.fixture
def workers(cfg: config.Config) -> Iterator[Callable[[str], WorkerProc]]:
    made: list[WorkerProc] = []

    def make(name: str) -> WorkerProc:
        made.append(WorkerProc(cfg, name))
        return made[-1]
    yield make
    for w in made:
        w.stop()


@pytest.fixture
def memory(cfg: config.Config) -> Iterator[tuple[FakeMemory, int]]:
    """A fake memory with one pod routing a free host port to an echo server."""
    backend = echo_server()
    host_port = free_port()
    mem = FakeMemory(cfg, [pod("web-0", host_port=host_port, port=backend.getsockname()[1])])
    yield mem, host_port
    mem.close()
    backend.close()


def proxy_stats(cfg: config.Config) -> dict[str, Any]:
    client = RequestClient(cfg.proxy_endpoint, timeout=1, retries=0)
    try:
        result: dict[str, Any] = client.call("stats")
        return result
    finally:
        client.close()


def test_a_successor_takes_over_counters_continue_and_the_old_one_drains(
        cfg: config.Config, memory: tuple[FakeMemory, int], workers: Callable[[str], WorkerProc]) -> None:
    _, port = memory
    old = workers("old")
    wait_for(lambda: echoes(port), 10, "the first worker serving")
    for _ in range(3):
        assert echoes(port)
    held = socket.create_connection(("127.0.0.1", port), timeout=5)
    assert echo_on(held, b"before")
    before = wait_for(lambda: (s := proxy_stats(cfg))["connections_active"] == 1 and s, 5, "stats")
    assert before["connections_total"] >= 5

    new = workers("new")
    wait_for(lambda: new.logged("proxy started"), 10, "the successor started")
    [started] = new.logged("proxy started")
    assert started["took_over"] is True
    assert new.logged("listening")[0]["adopted"] is True
    assert old.logged("handed over; draining")
    after = wait_for(lambda: proxy_stats(cfg), 5, "the successor's stats endpoint")
    assert after["connections_total"] >= 5          # counters continue...
    assert after["connections_active"] == 0         # ...gauges do not: that client is the old one's
    assert echoes(port)
    # The old worker drains: the held connection still works, and it exits once it closes.
    assert old.proc.poll() is None
    assert echo_on(held, b"after the hand-off")
    held.close()
    assert old.proc.wait(10) == 0
    assert old.logged("drained; proxy stopped")[0]["connections_cut"] == 0
    assert echoes(port)
    assert os.path.exists(handoff.socket_path(cfg.paths_run_dir))   # the successor's

    # No successor: SIGTERM stops the worker within the linger (3 s), and it leaves no file.
    new.proc.send_signal(signal.SIGTERM)
    assert echoes(port)                      # still serving while it waits
    assert new.proc.wait(10) == 0
    assert new.logged("no successor took over; stopping")
    assert not os.path.exists(handoff.socket_path(cfg.paths_run_dir))
    assert not echoes(port, timeout=0.5)


@pytest.mark.parametrize("reply, field", HOSTILE)
def test_after_a_failed_hand_off_the_worker_binds_as_usual(
        cfg: config.Config, memory: tuple[FakeMemory, int], workers: Callable[[str], WorkerProc],
        reply: bytes, field: str) -> None:
    _, port = memory
    path = handoff.socket_path(cfg.paths_run_dir)
    fake = FakePredecessor(path, reply)
    try:
        w = workers("new")
        wait_for(lambda: echoes(port), 10, "the worker serving its own listener")
        [failure] = w.logged("hand-off failed; binding anew")
        assert failure["field"] == field
        assert w.logged("listening")[0]["adopted"] is False
        # It took the hand-off path over for its own successors.
        wait_for(lambda: w.logged("hand-off socket listening"), 5, "its hand-off socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with probe:
            probe.connect(path)
    finally:
        fake.close()


def test_a_stale_handoff_file_is_ignored_by_a_starting_worker(
        cfg: config.Config, memory: tuple[FakeMemory, int], workers: Callable[[str], WorkerProc]) -> None:
    _, port = memory
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(handoff.socket_path(cfg.paths_run_dir))
    stale.close()
    w = workers("new")
    wait_for(lambda: echoes(port), 10, "the worker serving")
    assert w.logged("stale hand-off socket ignored: no predecessor listens")
    assert w.logged("proxy started")[0]["took_over"] is False


# --- the worker's clocks, in this process ---------------------------------------------------------

def test_an_orphaned_worker_with_no_successor_exits_after_the_orphan_timeout(cfg: config.Config) -> None:
    """No memory, no successor; the keeper pid is not our parent, so the first check finds the
    worker orphaned. It must close and exit 0 once ``orphan_timeout`` has passed, not before."""
    times = Lifetimes(orphan_timeout=0.6, orphan_check=0.05, linger=0.2)
    worker = Worker(cfg, ProxySettings(bind_host="127.0.0.1"), keeper_pid=os.getppid() + 100000,
                    times=times)
    started = time.monotonic()
    assert uvloop.run(worker.run()) == 0
    took = time.monotonic() - started
    assert 0.6 <= took < 5, took
    assert not os.path.exists(handoff.socket_path(cfg.paths_run_dir))


def test_a_worker_whose_keeper_lives_is_not_orphaned(cfg: config.Config) -> None:
    times = Lifetimes(orphan_timeout=0.1, orphan_check=0.05)
    worker = Worker(cfg, ProxySettings(bind_host="127.0.0.1"), keeper_pid=os.getppid(), times=times)

    async def run_a_while() -> bool:
        task = asyncio.get_running_loop().create_task(worker.run())
        await asyncio.sleep(0.6)
        alive = not task.done()
        worker._on_signal(signal.SIGTERM)   # as the keeper would
        worker._on_signal(signal.SIGTERM)   # a second signal: at once
        assert await task == 0
        return alive

    assert uvloop.run(run_a_while())


# --- the keeper -------------------------------------------------------------------------------------

def test_backoff_restarts_at_once_then_doubles_in_a_crash_loop_and_resets_after_a_healthy_run() -> None:
    b = Backoff(initial=0.1, maximum=5.0, healthy_after=10.0)
    assert [b.after(1.0) for _ in range(9)] == [0.0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    assert b.after(12.0) == 0.0
    assert b.after(0.5) == 0.1


KEEPER = """
import sys
from services.proxy.keeper import Keeper
sys.exit(Keeper([sys.executable, "-c", sys.argv[1], sys.argv[2]]).run())
"""
# The worker stand-in: records its pid and any SIGTERM in the file named by argv[1].
CHILD = """
import os, signal, sys, time
path = sys.argv[1]
def note(what):
    with open(path, "a") as fh:
        fh.write(f"{what} {os.getpid()}\\n")
signal.signal(signal.SIGTERM, lambda *_: (note("term"), sys.exit(0)))
note("start")
time.sleep(60)
"""


def test_the_keeper_replaces_a_killed_worker_at_once_and_passes_sigterm_on(run_dir: str) -> None:
    notes = os.path.join(run_dir, "notes")

    def lines() -> list[list[str]]:
        with contextlib.suppress(FileNotFoundError), open(notes, encoding="ascii") as fh:
            return [line.split() for line in fh]
        return []

    keeper = subprocess.Popen([sys.executable, "-c", KEEPER, CHILD, notes], cwd=ROOT)
    try:
        wait_for(lambda: len(lines()) == 1, 10, "the first worker")
        first = int(lines()[0][1])
        killed = time.monotonic()
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: len(lines()) == 2, 10, "a second worker")
        assert time.monotonic() - killed < 1.0
        second = int(lines()[1][1])
        keeper.send_signal(signal.SIGTERM)
        assert keeper.wait(5) == 0
        wait_for(lambda: ["term", str(second)] in lines(), 5, "SIGTERM passed to the worker")
    finally:
        if keeper.poll() is None:
            keeper.kill()
            keeper.wait()


# --- the real agent ----------------------------------------------------------------------------------

ECHO_POD = """
import socketserver, sys
class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)
class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
Server(("127.0.0.1", int(sys.argv[1])), Echo).serve_forever()
"""


class Prober:
    """Connects to ``port`` and checks an echo every 5 ms on a thread, noting failures."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.probes = 0
        self.failures: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            ok = echoes(self.port, timeout=1.0)
            self.probes += 1
            if not ok:
                self.failures.append(time.monotonic())
            time.sleep(0.005)


@pytest.fixture
def uagent() -> Iterator[Agent]:
    """An agent whose proxy forwards in user space: what these restarts hand over."""
    a = Agent("proxy:\n  mode: userspace\n").start()
    try:
        yield a
    finally:
        a.close()


@pytest.fixture
def echo_agent(uagent: Agent) -> tuple[Agent, int]:
    agent = uagent
    target, host = free_ports(2)
    agent.ctl("run", "echo", "--port", f"{host}:{target}", "--", sys.executable, "-c", ECHO_POD, str(target))
    agent.wait_phase("echo", "Running")
    wait_for(lambda: echoes(host), 10, "an echo through the proxy")
    wait_for(lambda: len(agent.proxy_workers()) == 1, 10, "one proxy worker")
    return agent, host


def the_worker(agent: Agent) -> int:
    """The current keeper's worker."""
    keeper = agent.service_pid("proxy")
    mine = [pid for pid, parent in agent.proxy_workers().items() if parent == keeper]
    assert len(mine) == 1, mine
    return mine[0]


@pytest.mark.integration
def test_supervisorctl_restart_drops_no_probe_and_drains_an_open_connection(
        echo_agent: tuple[Agent, int]) -> None:
    agent, port = echo_agent
    old_keeper, old_worker = agent.service_pid("proxy"), the_worker(agent)
    held = socket.create_connection(("127.0.0.1", port), timeout=5)
    assert echo_on(held, b"before the restart")
    with Prober(port) as probe:
        agent.supervisorctl("restart", "riklet:proxy")
        wait_for(lambda: agent.statuses().get("proxy") == "RUNNING", 10, "proxy RUNNING")
        new_worker = wait_for(lambda: (w := the_worker(agent)) != old_worker and w, 10, "a new worker")
        wait_for(lambda: probe.probes > 20, 5, "probes after the restart")
    assert agent.service_pid("proxy") != old_keeper
    assert probe.failures == [], f"{len(probe.failures)} of {probe.probes} probes failed"
    # The old worker handed over and drains: the connection opened before goes on.
    assert pid_alive(old_worker)
    assert echo_on(held, b"after the restart")
    held.close()
    wait_for(lambda: not pid_alive(old_worker), 10, "the old worker gone once its client left")
    assert list(agent.proxy_workers()) == [new_worker]


@pytest.mark.integration
def test_kill_9_of_the_keeper_hands_over_to_exactly_one_new_worker(echo_agent: tuple[Agent, int]) -> None:
    agent, port = echo_agent
    old_keeper, old_worker = agent.service_pid("proxy"), the_worker(agent)
    with Prober(port) as probe:
        os.kill(old_keeper, signal.SIGKILL)
        wait_for(lambda: agent.statuses().get("proxy") == "RUNNING"
                 and agent.service_pid("proxy") != old_keeper, 15, "a new keeper")
        new_worker = wait_for(lambda: (w := the_worker(agent)) != old_worker and w, 10, "a new worker")
        wait_for(lambda: not pid_alive(old_worker), 10, "the orphaned worker gone after the hand-off")
        wait_for(lambda: probe.probes > 20, 5, "probes after the hand-off")
    assert probe.failures == [], f"{len(probe.failures)} of {probe.probes} probes failed"
    assert agent.proxy_workers() == {new_worker: agent.service_pid("proxy")}
    assert echoes(port)


@pytest.mark.integration
def test_kill_9_of_the_worker_is_answered_again_within_a_second(echo_agent: tuple[Agent, int]) -> None:
    agent, port = echo_agent
    keeper, old_worker = agent.service_pid("proxy"), the_worker(agent)
    killed = time.monotonic()
    os.kill(old_worker, signal.SIGKILL)
    wait_for(lambda: echoes(port, timeout=0.5), 5, "the port answered again", interval=0.005)
    took = time.monotonic() - killed
    assert took < 1.0, f"answered again after {took:.3f} s"
    new_worker = the_worker(agent)
    assert new_worker != old_worker and agent.service_pid("proxy") == keeper
    assert list(agent.proxy_workers()) == [new_worker]


def test_the_worker_lifts_its_open_files_limit_to_the_hard_one() -> None:
    # Run in a child so this test process keeps its own limits.
    code = ("import resource\n"
            "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
            "from services.proxy.worker import raise_open_files_limit\n"
            "got = raise_open_files_limit()\n"
            "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
            "print(got, soft, hard)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.split()
    got, soft, hard = map(int, out)
    assert got == soft == hard > 256
