"""TCP forwarding through the real proxy classes on a uvloop loop, with real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
import uvloop

from services.proxy.routes import Endpoint, Routes, sctp_unsupported
from services.proxy.server import ProxyServer, ProxySettings
from services.proxy.tcp import HANDOVER_AFTER, HIGH_WATER
from tests.support import free_port, wait_for

T = TypeVar("T")
MiB = 1024 * 1024


class LoopThread:
    """A uvloop event loop on a thread of its own, as the proxy runs in production."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def on_loop() -> T:
            return fn()
        return self.run(on_loop())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class Proxy:
    def __init__(self, settings: ProxySettings) -> None:
        self.lt = LoopThread()
        self.server = ProxyServer(settings)

    def apply(self, routes: Routes) -> None:
        self.lt.run(self.server.apply(routes))

    def route(self, port: int, *upstreams: int) -> None:
        self.apply({("TCP", port): tuple(Endpoint("127.0.0.1", p) for p in upstreams)})

    def buffered(self) -> int:
        return self.lt.call(self.server.buffered_bytes)

    def close(self) -> None:
        self.lt.run(self.server.close())
        self.lt.stop()


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    p = Proxy(ProxySettings(bind_host="127.0.0.1", connect_timeout=0.5, retry_interval=0.2))
    yield p
    p.close()


class Backend:
    """A blocking TCP server on 127.0.0.1 running ``handler`` on a thread per connection."""

    def __init__(self, handler: Callable[[socket.socket], None], port: int = 0) -> None:
        self.sock = socket.create_server(("127.0.0.1", port), backlog=256)
        self.port: int = self.sock.getsockname()[1]
        self.handler = handler
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):   # a client that went away is not our fault
            self.handler(conn)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@pytest.fixture
def backends() -> Iterator[Callable[[Callable[[socket.socket], None]], Backend]]:
    made: list[Backend] = []

    def make(handler: Callable[[socket.socket], None]) -> Backend:
        made.append(Backend(handler))
        return made[-1]
    yield make
    for b in made:
        b.close()


def echo(conn: socket.socket) -> None:
    while data := conn.recv(256 * 1024):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def named(name: bytes) -> Callable[[socket.socket], None]:
    """Says its name, then echoes: tells the test which upstream a connection reached."""
    def handler(conn: socket.socket) -> None:
        conn.sendall(name)
        echo(conn)
    return handler





def refusing_port() -> int:
    return free_port()   # nothing listens there once the probe socket is closed


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def drain(sock: socket.socket) -> tuple[int, str]:
    """Read to EOF; returns (bytes, sha256)."""
    h, n = hashlib.sha256(), 0
    while chunk := sock.recv(1024 * 1024):
        h.update(chunk)
        n += len(chunk)
    return n, h.hexdigest()


def echo_through(port: int, payload: bytes) -> tuple[int, str]:
    """Send ``payload`` and half-close on one thread while reading the echo on this one."""
    with connect(port, timeout=30) as sock:
        def send() -> None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        sender = threading.Thread(target=send)
        sender.start()
        result = drain(sock)
        sender.join()
    return result





# --- bytes in == bytes out -----------------------------------------------------------------

def test_a_50_mb_stream_arrives_intact(proxy: Proxy, backends: Any) -> None:
    up = backends(echo)
    port = free_port()
    proxy.route(port, up.port)
    payload = os.urandom(50 * MiB)
    assert echo_through(port, payload) == (len(payload), hashlib.sha256(payload).hexdigest())


def test_100_concurrent_connections_of_1_mb_each_arrive_intact(proxy: Proxy, backends: Any) -> None:
    up = backends(echo)
    port = free_port()
    proxy.route(port, up.port)
    payloads = [os.urandom(MiB) for _ in range(100)]
    with ThreadPoolExecutor(max_workers=100) as pool:
        results = list(pool.map(lambda p: echo_through(port, p), payloads))
    assert results == [(MiB, hashlib.sha256(p).hexdigest()) for p in payloads]
    wait_for(lambda: proxy.server.stats.connections_active == 0, what="all pairs closed")
    assert proxy.server.stats.connections_total == 100
    assert proxy.server.stats.bytes_in == proxy.server.stats.bytes_out == 100 * MiB


def test_half_close_the_client_still_receives_the_full_reply(proxy: Proxy, backends: Any) -> None:
    def digest_then_reply(conn: socket.socket) -> None:
        _, digest = drain(conn)              # reads until the client's half-close arrives
        conn.sendall(digest.encode() + b"x" * (4 * MiB))
    up = backends(digest_then_reply)
    port = free_port()
    proxy.route(port, up.port)
    request = os.urandom(3 * MiB)
    with connect(port) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        reply = b"".join(iter(lambda: sock.recv(MiB), b""))
    assert reply[:64] == hashlib.sha256(request).hexdigest().encode()
    assert len(reply) == 64 + 4 * MiB


def test_clients_that_reset_in_mid_stream_leave_no_stale_bytes_for_the_next(
        proxy: Proxy, backends: Any) -> None:
    # Bulk flows go through pooled pipes: a pipe still holding a reset client's bytes must
    # never be handed to the next flow.
    block = os.urandom(MiB)

    def stream(conn: socket.socket) -> None:
        for _ in range(16):
            conn.sendall(block)
    up = backends(stream)
    port = free_port()
    proxy.route(port, up.port)
    for _ in range(20):
        with connect(port, timeout=10) as sock:
            recv_exact(sock, 300 * 1024)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    for _ in range(3):
        with connect(port, timeout=30) as sock:
            assert drain(sock) == (16 * MiB, hashlib.sha256(block * 16).hexdigest())
    wait_for(lambda: proxy.server.stats.connections_active == 0, what="all pairs closed")


# --- long-lived pairs, handed to uvloop's transports after HANDOVER_AFTER small reads -------

def chatter(sock: socket.socket, rounds: int) -> bytes:
    """Small request/reply rounds through an echo: enough to hand the pair over."""
    got = b""
    for i in range(rounds):
        msg = b"%05d" % i
        sock.sendall(msg)
        got += recv_exact(sock, len(msg))
    return got


def test_a_long_lived_pair_keeps_its_bytes_and_half_close_after_the_handover(
        proxy: Proxy, backends: Any) -> None:
    up = backends(echo)
    port = free_port()
    proxy.route(port, up.port)
    with connect(port) as sock:
        rounds = 2 * HANDOVER_AFTER
        assert chatter(sock, rounds) == b"".join(b"%05d" % i for i in range(rounds))
        assert proxy.lt.call(lambda: all(c.sides is not None for c in proxy.server.connections))
        tail = os.urandom(3 * MiB)
        sock.sendall(tail)
        sock.shutdown(socket.SHUT_WR)       # the client is done: the echo must still arrive
        assert drain(sock) == (len(tail), hashlib.sha256(tail).hexdigest())
    wait_for(lambda: proxy.server.stats.connections_active == 0, what="the pair closed")
    stats = proxy.server.stats
    assert stats.bytes_in == stats.bytes_out == 5 * rounds + len(tail)


def test_after_the_handover_a_slow_client_still_stalls_the_upstream(proxy: Proxy, backends: Any) -> None:
    total, block, sent = 200 * MiB, os.urandom(MiB), [0]
    go = threading.Event()

    def talk_then_flood(conn: socket.socket) -> None:
        while (data := conn.recv(5)) != b"flood":
            conn.sendall(data)
        go.set()
        firehose(block, total, sent)(conn)
    up = backends(talk_then_flood)
    port = free_port()
    proxy.route(port, up.port)
    with connect(port, timeout=30) as sock:
        chatter(sock, 2 * HANDOVER_AFTER)
        sock.sendall(b"flood")
        assert go.wait(10)
        peak = wait_until_stalled(sent, proxy, total)
        assert peak <= 2 * HIGH_WATER + MiB, f"proxy buffered {peak} bytes"
        assert drain(sock) == (total, hashlib.sha256(block * 200).hexdigest())


def test_a_handed_over_pair_is_closed_when_idle(backends: Any) -> None:
    p = Proxy(ProxySettings(bind_host="127.0.0.1", connect_timeout=0.5, idle_timeout=0.3))
    try:
        up = backends(echo)
        port = free_port()
        p.route(port, up.port)
        with connect(port, timeout=5) as sock:
            chatter(sock, 2 * HANDOVER_AFTER)
            assert sock.recv(1) == b""          # closed by the proxy after 0.3 s of silence
        assert p.server.stats.idle_closed == 1
    finally:
        p.close()


# --- back-pressure -------------------------------------------------------------------------

def wait_until_stalled(sent: list[int], proxy: Proxy, total: int) -> int:
    """Poll until the writer's byte count stops moving; returns the proxy's peak buffering."""
    peak, last, still_since = 0, -1, time.monotonic()
    deadline = time.monotonic() + 20
    while time.monotonic() - still_since < 0.5:
        assert time.monotonic() < deadline, "the writer never stalled"
        peak = max(peak, proxy.buffered())
        if sent[0] != last:
            last, still_since = sent[0], time.monotonic()
        time.sleep(0.02)
    assert sent[0] < total / 4, f"{sent[0]} bytes were pushed towards a reader that does not read"
    return peak


def firehose(block: bytes, total: int, sent: list[int]) -> Callable[[socket.socket], None]:
    def send(sock: socket.socket) -> None:
        view = memoryview(block * 4)
        while sent[0] < total:
            sent[0] += sock.send(view[sent[0] % len(block):][:min(len(block), total - sent[0])])
        sock.shutdown(socket.SHUT_WR)
    return send


def test_a_slow_client_stalls_the_upstream_instead_of_filling_memory(proxy: Proxy, backends: Any) -> None:
    total, block, sent = 200 * MiB, os.urandom(MiB), [0]
    up = backends(firehose(block, total, sent))
    port = free_port()
    proxy.route(port, up.port)
    with connect(port, timeout=30) as sock:
        peak = wait_until_stalled(sent, proxy, total)      # the client is not reading yet
        assert peak <= 2 * HIGH_WATER + MiB, f"proxy buffered {peak} bytes"
        assert drain(sock) == (total, hashlib.sha256(block * 200).hexdigest())


def test_a_slow_upstream_stalls_the_client_instead_of_filling_memory(proxy: Proxy, backends: Any) -> None:
    total, block, sent = 200 * MiB, os.urandom(MiB), [0]
    go = threading.Event()

    def late_reader(conn: socket.socket) -> None:
        go.wait(30)
        conn.sendall(drain(conn)[1].encode())
    up = backends(late_reader)
    port = free_port()
    proxy.route(port, up.port)
    with connect(port, timeout=30) as sock:
        writer = threading.Thread(target=firehose(block, total, sent), args=(sock,))
        writer.start()
        peak = wait_until_stalled(sent, proxy, total)
        assert peak <= 2 * HIGH_WATER + MiB, f"proxy buffered {peak} bytes"
        go.set()
        writer.join(30)
        assert recv_exact(sock, 64) == hashlib.sha256(block * 200).hexdigest().encode()


# --- choosing upstreams --------------------------------------------------------------------

def first_bytes(port: int, n: int = 1) -> bytes:
    with connect(port, timeout=5) as sock:
        return recv_exact(sock, n)


def test_round_robin_spreads_connections_over_three_upstreams(proxy: Proxy, backends: Any) -> None:
    ups = [backends(named(n)) for n in (b"a", b"b", b"c")]
    port = free_port()
    proxy.route(port, *(u.port for u in ups))
    seen = [first_bytes(port) for _ in range(9)]
    assert Counter(seen) == {b"a": 3, b"b": 3, b"c": 3}
    assert seen[:3] != seen[3:6] or len(set(seen[:3])) == 3   # each turn of three visits each one


def test_a_refusing_upstream_is_skipped_for_the_others(proxy: Proxy, backends: Any) -> None:
    a, b = backends(named(b"a")), backends(named(b"b"))
    port = free_port()
    proxy.route(port, a.port, refusing_port(), b.port)
    seen = [first_bytes(port) for _ in range(9)]
    assert set(seen) == {b"a", b"b"}
    # Refused once, then ejected for its back-off: the later connections do not try it again.
    assert proxy.server.stats.connect_errors == proxy.server.stats.ejections == 1


def test_with_no_upstream_answering_the_client_is_reset_at_once(proxy: Proxy) -> None:
    port = free_port()
    proxy.route(port, refusing_port(), refusing_port())
    started = time.monotonic()
    # The reset can be quick enough to fail connect() itself: that is a reset seen, too.
    with pytest.raises((ConnectionResetError, BrokenPipeError, EOFError)), connect(port) as sock:
        sock.sendall(b"hello")
        recv_exact(sock, 1)
    assert time.monotonic() - started < 1.0
    assert proxy.server.stats.connections_refused == 1


def black_hole() -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose accept queue is full drops SYNs: a connect to it hangs."""
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(blackhole.getsockname())
        fillers.append(s)
    return blackhole, fillers


def test_an_upstream_that_never_answers_is_abandoned_after_the_timeout(proxy: Proxy, backends: Any) -> None:
    blackhole, fillers = black_hole()
    b = backends(named(b"b"))
    port = free_port()
    try:
        proxy.route(port, blackhole.getsockname()[1], b.port)
        started = time.monotonic()
        with connect(port) as sock:
            # Sent and half-closed while the proxy is still waiting on the black hole: both
            # must be kept and delivered once the second endpoint is connected.
            sock.sendall(b"early")
            sock.shutdown(socket.SHUT_WR)
            assert drain(sock) == (6, hashlib.sha256(b"bearly").hexdigest())
        assert 0.4 < time.monotonic() - started < 3.0   # connect_timeout is 0.5 s in these tests
    finally:
        for s in fillers:
            s.close()
        blackhole.close()


def test_a_connect_in_progress_when_its_route_is_removed_still_times_out(
        proxy: Proxy, backends: Any) -> None:
    blackhole, fillers = black_hole()
    b = backends(named(b"b"))
    port = free_port()
    try:
        proxy.route(port, blackhole.getsockname()[1], b.port)
        with connect(port) as sock:
            wait_for(lambda: proxy.server.stats.connections_active == 1, what="the client accepted")
            proxy.apply({})          # the listener closes while its client waits on the black hole
            assert recv_exact(sock, 1) == b"b"   # moved on to the second endpoint after 0.5 s
    finally:
        for s in fillers:
            s.close()
        blackhole.close()


# --- route changes -------------------------------------------------------------------------

def test_changing_a_route_keeps_open_connections_and_steers_new_ones(proxy: Proxy, backends: Any) -> None:
    a, b = backends(named(b"a")), backends(named(b"b"))
    port = free_port()
    proxy.route(port, a.port)
    with connect(port) as old:
        assert recv_exact(old, 1) == b"a"
        proxy.route(port, b.port)
        assert first_bytes(port) == b"b"
        old.sendall(b"still here")
        assert recv_exact(old, 10) == b"still here"


def test_removing_a_route_closes_the_listener_but_not_open_connections(proxy: Proxy, backends: Any) -> None:
    a = backends(named(b"a"))
    port = free_port()
    proxy.route(port, a.port)
    with connect(port) as old:
        assert recv_exact(old, 1) == b"a"
        proxy.apply({})
        assert proxy.server.listening() == set()
        with pytest.raises(ConnectionRefusedError):
            connect(port)
        old.sendall(b"ping")
        assert recv_exact(old, 4) == b"ping"


def test_a_port_in_use_is_reported_and_retried_without_harming_other_routes(
        proxy: Proxy, backends: Any, caplog: pytest.LogCaptureFixture) -> None:
    a = backends(named(b"a"))
    squatter = socket.create_server(("127.0.0.1", 0))
    taken, other = squatter.getsockname()[1], free_port()
    routes: Routes = {("TCP", taken): (Endpoint("127.0.0.1", a.port),),
                      ("TCP", other): (Endpoint("127.0.0.1", a.port),)}
    with caplog.at_level(logging.WARNING, logger="services.proxy"):
        proxy.apply(routes)
    assert proxy.server.failed() == {("TCP", taken)}
    assert [r.__dict__.get("port") for r in caplog.records if r.getMessage() == "cannot listen"] == [taken]
    assert first_bytes(other) == b"a"
    squatter.close()
    wait_for(lambda: ("TCP", taken) in proxy.lt.call(proxy.server.listening), what="retry to bind")
    assert first_bytes(taken) == b"a"


# --- SCTP, where the kernel has it --------------------------------------------------------

@pytest.mark.skipif(sctp_unsupported() is not None,
                    reason=f"this kernel has no SCTP: {sctp_unsupported()}")
def test_sctp_messages_are_forwarded_in_order_both_ways(proxy: Proxy) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP)
    server.bind(("127.0.0.1", 0))
    server.listen(8)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(b"re:" + data)
    threading.Thread(target=serve, daemon=True).start()
    port = free_port()
    proxy.apply({("SCTP", port): (Endpoint("127.0.0.1", server.getsockname()[1]),)})
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP) as sock:
            sock.settimeout(5)
            sock.connect(("127.0.0.1", port))
            for i in range(100):
                sock.sendall(b"m%d" % i)
                assert sock.recv(65536) == b"re:m%d" % i
        wait_for(lambda: proxy.server.stats.connections_active == 0, what="the association closed")
    finally:
        server.close()
