"""UDP forwarding through the real proxy classes on a uvloop loop, and the bounded flow table."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import uvloop

from services.proxy.routes import Endpoint, Routes
from services.proxy.server import ProxyServer, ProxySettings
from services.proxy.udp import FlowTable, UdpListener
from tests.support import wait_for

T = TypeVar("T")


class Proxy:
    """The proxy server on a uvloop loop running on its own thread."""

    def __init__(self, settings: ProxySettings) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = ProxyServer(settings)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def call(self, fn: Callable[[], T]) -> T:
        async def on_loop() -> T:
            return fn()
        return self.run(on_loop())

    def route(self, port: int, *upstreams: int) -> None:
        routes: Routes = {("UDP", port): tuple(Endpoint("127.0.0.1", p) for p in upstreams)}
        self.run(self.server.apply(routes))

    def flows(self, port: int) -> int:
        def count() -> int:
            listener = self.server.listener(("UDP", port))
            assert isinstance(listener, UdpListener)
            return len(listener.flows)
        return self.call(count)

    def close(self) -> None:
        self.run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def make_proxy(**settings: Any) -> Proxy:
    return Proxy(ProxySettings(bind_host="127.0.0.1", **settings))


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    p = make_proxy(udp_idle_timeout=60.0)
    yield p
    p.close()


class Echo:
    """A UDP server answering each datagram with its name followed by the datagram."""

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.peers: set[Any] = set()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(65535)
            except OSError:
                return
            if addr is None:   # woken by close()
                return
            self.peers.add(addr)
            self.sock.sendto(self.name + data, addr)

    def close(self) -> None:
        # On Linux this wakes the blocked recvfrom although it reports ENOTCONN for UDP.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@pytest.fixture
def echoes() -> Iterator[Callable[[bytes], Echo]]:
    made: list[Echo] = []

    def make(name: bytes) -> Echo:
        made.append(Echo(name))
        return made[-1]
    yield make
    for e in made:
        e.close()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def client(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2.0)
    sock.connect(("127.0.0.1", port))
    return sock


def ask(sock: socket.socket, data: bytes, attempts: int = 5) -> bytes:
    """Send and wait for one reply, resending on loss or on an ICMP-reported refusal."""
    for _ in range(attempts):
        sock.send(data)
        try:
            return sock.recv(65535)
        except (TimeoutError, ConnectionRefusedError):
            continue
    raise AssertionError(f"no reply to {data!r}")





def test_two_clients_each_get_their_own_replies(proxy: Proxy, echoes: Any) -> None:
    up = echoes(b"e:")
    port = free_udp_port()
    proxy.route(port, up.port)
    a, b = client(port), client(port)
    with a, b:
        for i in range(50):
            a.send(b"a%d" % i)
            b.send(b"b%d" % i)
            assert a.recv(100) == b"e:a%d" % i
            assert b.recv(100) == b"e:b%d" % i
    assert proxy.flows(port) == 2
    assert proxy.server.stats.datagrams_in == proxy.server.stats.datagrams_out == 100


def test_new_flows_go_round_robin_and_a_flow_sticks_to_its_endpoint(proxy: Proxy, echoes: Any) -> None:
    ups = [echoes(n) for n in (b"a", b"b", b"c")]
    port = free_udp_port()
    proxy.route(port, *(u.port for u in ups))
    socks = [client(port) for _ in range(6)]
    first = [ask(s, b"!")[:1] for s in socks]
    assert Counter(first) == {b"a": 2, b"b": 2, b"c": 2}
    assert [ask(s, b"!")[:1] for s in socks] == first
    for s in socks:
        s.close()


def test_a_dead_endpoint_is_left_for_a_live_one(proxy: Proxy, echoes: Any) -> None:
    live = echoes(b"live:")
    port = free_udp_port()
    proxy.route(port, free_udp_port(), live.port)   # the first flow goes to the dead one
    with client(port) as sock:
        assert ask(sock, b"hi", attempts=10) == b"live:hi"


def test_idle_flows_expire_and_their_sockets_close() -> None:
    proxy = make_proxy(udp_idle_timeout=0.2)
    up = Echo(b"")
    try:
        port = free_udp_port()
        proxy.route(port, up.port)
        with client(port) as sock:
            assert ask(sock, b"x") == b"x"
            assert proxy.flows(port) == 1
            wait_for(lambda: proxy.flows(port) == 0, what="the idle flow to expire")
            assert proxy.server.stats.udp_flows_active == 0
            assert ask(sock, b"y") == b"y"        # a new flow opens on demand
    finally:
        up.close()
        proxy.close()


def test_the_flow_table_of_a_listener_stays_within_its_bound() -> None:
    proxy = make_proxy(udp_max_flows=64)
    up = Echo(b"")
    try:
        port = free_udp_port()
        proxy.route(port, up.port)
        socks = [client(port) for _ in range(300)]   # all open at once: 300 distinct sources
        for i, sock in enumerate(socks):
            assert ask(sock, b"%d" % i) == b"%d" % i
        for sock in socks:
            sock.close()
        assert proxy.flows(port) == 64
        stats = proxy.server.stats
        assert (stats.udp_flows_total, stats.udp_flows_evicted, stats.udp_flows_active) == (300, 236, 64)
    finally:
        up.close()
        proxy.close()


def test_flow_table_never_exceeds_its_bound_with_10000_sources() -> None:
    table: FlowTable[tuple[str, int], int] = FlowTable(4096)
    evicted: list[tuple[str, int]] = []
    for port in range(10_000):
        evicted += [key for key, _ in table.add(("10.0.0.1", port), port, now=float(port))]
        assert len(table) <= 4096
    assert len(table) == 4096
    assert evicted == [("10.0.0.1", p) for p in range(10_000 - 4096)]   # oldest first


def test_flow_table_evicts_the_least_recently_used_and_expires_idle_entries() -> None:
    table: FlowTable[str, int] = FlowTable(2)
    table.add("a", 1, now=0.0)
    table.add("b", 2, now=1.0)
    assert table.touch("a", now=2.0) == 1
    assert table.add("c", 3, now=3.0) == [("b", 2)]
    assert table.expire(now=6.5, idle=4.0) == [("a", 1)]
    assert "c" in table and len(table) == 1


def test_changing_endpoints_moves_flows_off_an_endpoint_that_left(proxy: Proxy, echoes: Any) -> None:
    a, b = echoes(b"a"), echoes(b"b")
    port = free_udp_port()
    proxy.route(port, a.port)
    with client(port) as sock:
        assert ask(sock, b"1") == b"a1"
        proxy.route(port, b.port)
        assert ask(sock, b"2") == b"b2"


def test_removing_a_udp_route_closes_its_port(proxy: Proxy, echoes: Any) -> None:
    up = echoes(b"")
    port = free_udp_port()
    proxy.route(port, up.port)
    with client(port) as sock:
        assert ask(sock, b"x") == b"x"
        proxy.run(proxy.server.apply({}))
        sock.send(b"y")
        with pytest.raises(ConnectionRefusedError):
            sock.recv(100)


def _ask_from(local_target: str, port: int, data: bytes) -> bytes:
    """A client connected to ``local_target``: it only accepts replies from that address."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2.0)
        sock.connect((local_target, port))
        return ask(sock, data)


@pytest.mark.parametrize("own_sockets", [True, False], ids=["client-socket", "listening-socket"])
def test_on_a_wildcard_port_replies_leave_from_the_address_the_client_wrote_to(
        own_sockets: bool, echoes: Any) -> None:
    proxy = Proxy(ProxySettings(bind_host="0.0.0.0", udp_idle_timeout=60.0))
    up = echoes(b"e:")
    try:
        port = free_udp_port()
        proxy.route(port, up.port)
        if not own_sockets:   # every flow served through the listening socket (sendmsg + PKTINFO)
            def no_client_sockets() -> None:
                listener = proxy.server.listener(("UDP", port))
                assert isinstance(listener, UdpListener)
                listener.max_connected = 0
            proxy.call(no_client_sockets)
        # 127.0.0.2 is this host too (lo holds 127/8), but not the address routing would pick.
        assert _ask_from("127.0.0.2", port, b"a") == b"e:a"
        assert _ask_from("127.0.0.1", port, b"b") == b"e:b"
        assert proxy.flows(port) == 2
    finally:
        proxy.close()


def test_flows_beyond_the_client_socket_quota_are_still_served(echoes: Any) -> None:
    proxy = make_proxy(udp_idle_timeout=60.0)
    up = echoes(b"")
    try:
        port = free_udp_port()
        proxy.route(port, up.port)

        def quota(n: int) -> None:
            listener = proxy.server.listener(("UDP", port))
            assert isinstance(listener, UdpListener)
            listener.max_connected = n
        proxy.call(lambda: quota(2))
        socks = [client(port) for _ in range(5)]
        for round_ in range(3):
            for i, sock in enumerate(socks):
                assert ask(sock, b"%d.%d" % (round_, i)) == b"%d.%d" % (round_, i)
        for sock in socks:
            sock.close()
        stats = proxy.server.stats
        # The reply reaches the client before the proxy has counted it: wait for the count.
        wait_for(lambda: stats.datagrams_in == stats.datagrams_out == 15, what="15 datagrams each way")
    finally:
        proxy.close()
