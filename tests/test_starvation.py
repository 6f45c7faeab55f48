"""One client cannot starve the others: open gRPC streams leave unary calls their workers and
are capped per client; slow or silent CHaS connections are closed at a deadline and make room
for new ones; a keep-alive CHaS request is answered without Nagle's delay."""

from __future__ import annotations

import contextlib
import http.client
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from common import auth
from common.pb import node_pb2 as npb
from common.pb import node_pb2_grpc as npb_grpc
from services.manager.api.streams import StreamLimits, client_of
from services.manager.chas.conn import Connections, body_deadline
from tests.stack import Agent, chas_agent
from tests.support import wait_for

HEADER_TIMEOUT = 4.0
CONFIG = f"chas:\n  header_timeout: {HEADER_TIMEOUT:g}s\n"
PER_CLIENT = 32          # api.max_streams_per_client's default
REFUSAL = f"too many open streams from this client: limit {PER_CLIENT}"
TICKER = ["sh", "-c", "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.1; done"]


@pytest.fixture(scope="module")
def agent() -> Iterator[Agent]:
    with chas_agent(CONFIG) as a:
        yield a


# -- the stream budget alone -------------------------------------------------------------------

def test_stream_limits_count_per_client_and_in_total() -> None:
    limits = StreamLimits(max_streams=3, max_per_client=2)
    assert limits.workers == 32 + 3
    assert limits.acquire("a") is None and limits.acquire("a") is None
    assert limits.acquire("a") == ("too many open streams from this client: limit 2 "
                                    "(api.max_streams_per_client); close some (rikletctl watch, logs -f)")
    assert limits.acquire("b") is None
    assert limits.acquire("c") == "too many open streams on this node: limit 3 (api.max_streams)"
    limits.release("a")
    assert limits.acquire("c") is None
    assert limits.open_streams() == 3


def test_a_client_is_its_host() -> None:
    assert client_of("ipv4:127.0.0.1:40123") == "ipv4:127.0.0.1"
    assert client_of("ipv6:[::1]:40123") == "ipv6:[::1]"
    assert client_of("unix:/run/x.sock") == "unix:/run/x.sock"


# -- gRPC: streams do not take the unary workers -----------------------------------------------

def _stub(agent: Agent) -> tuple[grpc.Channel, npb_grpc.NodeStub]:
    channel = grpc.intercept_channel(grpc.insecure_channel(agent.api), *auth.grpc_client_interceptors(
        lambda: auth.read_token(agent.token_path)))
    return channel, npb_grpc.NodeStub(channel)


def _open_watch(stub: npb_grpc.NodeStub) -> tuple[Any, grpc.RpcError | None]:
    """A Watch call and, when it was refused, its error (an accepted one sends its snapshot)."""
    call = stub.Watch(npb.WatchRequest(), timeout=60)
    try:
        event = next(call)
    except grpc.RpcError as exc:
        return call, exc
    assert event.kind == "snapshot"
    return call, None


def test_open_streams_leave_unary_calls_their_workers(agent: Agent) -> None:
    agent.ctl("run", "w0", "--", "sleep", "3600")   # every Watch starts with its snapshot
    channels = []
    accepted: list[Any] = []
    refused: list[grpc.RpcError] = []
    try:
        for _ in range(40):                           # 40 shells running rikletctl watch
            channel, stub = _stub(agent)
            channels.append(channel)
            call, error = _open_watch(stub)
            (accepted.append(call) if error is None else refused.append(error))
        assert len(accepted) == PER_CLIENT and len(refused) == 40 - PER_CLIENT
        for exc in refused:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert REFUSAL in (exc.details() or "")

        # Another client's unary call answers at once.
        channel, stub = _stub(agent)
        channels.append(channel)
        assert [p.name for p in stub.List(npb.ListRequest(), timeout=5).pods] == ["w0"]
        assert agent.ctl("get", "pods", timeout=20).returncode == 0
        # Logs -f is a stream as well, and rikletctl says why it was refused.
        with pytest.raises(grpc.RpcError) as logs:
            next(stub.Logs(npb.LogsRequest(name="w0", follow=True), timeout=10))
        assert logs.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        res = agent.ctl("watch", check=False, timeout=20)
        assert res.returncode != 0 and "resource_exhausted" in res.stderr and REFUSAL in res.stderr

        # Closed streams give their place back.
        for call in accepted[:4]:
            call.cancel()
        def reopen() -> Any:
            call, error = _open_watch(stub)
            return call if error is None else None
        accepted.append(wait_for(reopen, 10, what="a stream once others closed"))
    finally:
        for call in accepted:
            call.cancel()
        for channel in channels:
            channel.close()
    agent.ctl("delete", "pod", "w0")


def test_silent_calls_without_the_token_hold_no_worker(agent: Agent) -> None:
    """A client without the token opens unary calls and never sends their request message."""
    never = threading.Event()

    def silence() -> Iterator[npb.ListRequest]:
        never.wait(60)
        return
        yield  # a generator that sends nothing

    channel = grpc.insecure_channel(agent.api)  # no token
    list_silently = channel.stream_unary("/riklet.v1.Node/List",
                                         request_serializer=npb.ListRequest.SerializeToString,
                                         response_deserializer=npb.ListResponse.FromString)
    good, stub = _stub(agent)
    calls = [list_silently.future(silence(), timeout=60) for _ in range(120)]
    try:
        for call in calls:   # each is refused as soon as its headers arrive
            with pytest.raises(grpc.RpcError) as exc:
                call.result(timeout=20)
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.List(npb.ListRequest(), timeout=5) is not None
    finally:
        never.set()
        for call in calls:
            call.cancel()
        channel.close()
        good.close()


# -- CHaS: slow clients are closed at a deadline and make room for others ------------------------

def test_the_oldest_idle_connection_makes_room_and_busy_ones_never_do() -> None:
    pairs = [socket.socketpair() for _ in range(4)]
    try:
        conns = Connections(cap=3)
        a, b, c = (conns.admit(pairs[i][0]) for i in range(3))
        assert a is not None and b is not None and c is not None
        a.busy = True                       # a request in progress, the oldest connection
        assert conns.admit(pairs[3][0]) is not None
        assert pairs[1][1].recv(1) == b""   # b, the oldest idle one, was closed
        assert len(conns) == 3 and conns.shed == 1
        c.busy = True
        conns.get(pairs[3][0]).busy = True
        with socket.socket() as extra:
            assert conns.admit(extra) is None   # every one is busy: refuse the new one
        conns.leave(pairs[0][0])
        assert len(conns) == 2
    finally:
        for x, y in pairs:
            x.close()
            y.close()


def test_a_body_gets_the_head_grace_and_then_a_minimum_rate() -> None:
    assert body_deadline(0, 10.0) == 10.0
    assert body_deadline(1 << 20, 10.0) == 10.0 + 64.0



def _address(agent: Agent) -> tuple[str, int]:
    host, port = agent.chas.rsplit(":", 1)
    return host, int(port)


def _bearer(agent: Agent) -> str:
    return f"Bearer {auth.read_token(agent.token_path)}"


def _follow(agent: Agent, name: str) -> socket.socket:
    """A raw connection following a container's log, once its first line arrived."""
    sock = socket.create_connection(_address(agent), timeout=10)
    sock.sendall(f"GET /containers/{name}/logs?follow=true HTTP/1.1\r\nHost: x\r\n"
                 f"Authorization: {_bearer(agent)}\r\n\r\n".encode())
    seen = b""
    while b"tick" not in seen:
        chunk = sock.recv(65536)
        assert chunk, f"the follow stream ended: {seen!r}"
        seen += chunk
    assert seen.startswith(b"HTTP/1.1 200 ")
    return sock


def _trickle(socks: list[socket.socket], stop: threading.Event) -> None:
    """A header byte to each socket every 0.3 s: never silent long enough for a per-read timeout."""
    while not stop.wait(0.3):
        for s in socks:
            with contextlib.suppress(OSError):
                s.send(b"X")


def _read_until_closed(socks: list[socket.socket], deadline: float) -> dict[socket.socket, bytes]:
    """What each socket received until the server closed it; fails if any is open at the deadline."""
    import selectors
    got = {s: b"" for s in socks}
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    open_ = set(socks)
    while open_ and time.monotonic() < deadline:
        for key, _ in sel.select(0.2):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                data = b""
            if data:
                got[s] += data
            else:
                sel.unregister(s)
                open_.discard(s)
    sel.close()
    assert not open_, f"{len(open_)} of {len(socks)} slow connections still open after the header deadline"
    return got


def test_slow_connections_are_closed_and_health_keeps_answering(agent: Agent) -> None:
    status, _, body = agent.chas_request("POST", "/containers/deploy", {"name": "tick", "command": TICKER})
    assert status == 201, body
    # The oldest connection is an authenticated request in progress: never closed for another.
    follow = _follow(agent, "tick")
    stop = threading.Event()
    silent: list[socket.socket] = []
    trickling: list[socket.socket] = []
    try:
        first = time.monotonic()
        silent = [socket.create_connection(_address(agent), timeout=10) for _ in range(110)]
        trickling = [socket.create_connection(_address(agent), timeout=10) for _ in range(20)]
        for s in trickling:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        threading.Thread(target=_trickle, args=(trickling, stop), daemon=True).start()

        status, _, body = agent.chas_request("GET", "/health", timeout=HEADER_TIMEOUT)
        assert status == 200, body
        # Room was made by closing the oldest idle connections, not by waiting for deadlines.
        assert time.monotonic() - first < HEADER_TIMEOUT

        got = _read_until_closed(silent + trickling, first + HEADER_TIMEOUT + 8)
        for s in trickling:   # began a request: told why it was closed
            assert got[s].startswith(b"HTTP/1.1 408 "), got[s][:200]
            assert b"chas.header_timeout" in got[s]
        assert all(got[s] == b"" for s in silent)  # sent nothing: closed without a word

        # The follow stream went on through all this.
        follow.settimeout(5)
        assert follow.recv(65536)
        assert agent.chas_request("GET", "/health", timeout=5)[0] == 200
    finally:
        stop.set()
        for s in [follow, *silent, *trickling]:
            s.close()
        agent.chas_request("DELETE", "/containers/tick")


def test_a_body_that_does_not_arrive_is_answered_408(agent: Agent) -> None:
    with socket.create_connection(_address(agent), timeout=HEADER_TIMEOUT + 10) as s:
        start = time.monotonic()
        s.sendall(f"POST /containers/deploy HTTP/1.1\r\nHost: x\r\nAuthorization: {_bearer(agent)}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"name\"".encode())
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        took = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:300]
    assert b'"code": "timeout"' in answer and b'"field": "body"' in answer
    assert HEADER_TIMEOUT - 0.5 < took < HEADER_TIMEOUT + 5


def test_keep_alive_requests_are_not_delayed(agent: Agent) -> None:
    conn = http.client.HTTPConnection(*_address(agent), timeout=10)
    times = []
    try:
        for _ in range(20):
            start = time.perf_counter()
            conn.request("GET", "/containers", headers={"Authorization": _bearer(agent)})
            resp = conn.getresponse()
            resp.read()
            times.append(time.perf_counter() - start)
            assert resp.status == 200
            if len(times) == 1:
                sock = conn.sock
            assert conn.sock is sock   # one connection throughout
    finally:
        conn.close()
    # Nagle's algorithm against the client's delayed ACK costs ~40 ms a request: a detector, not
    # a benchmark.
    assert statistics.median(times) < 0.010, [round(t * 1000, 1) for t in times]
