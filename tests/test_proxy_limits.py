"""Per-port limits, idle timeout, least-connections balancing and ejection through real sockets."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from services.proxy.balance import Balance
from services.proxy.routes import Endpoint
from services.proxy.server import ProxySettings
from tests.support import free_port, free_ports, wait_for
from tests.test_proxy_tcp import Backend, Proxy, backends, connect, echo, first_bytes, named, recv_exact

__all__ = ["backends"]   # the fixture, used by name


def make(**settings: Any) -> Proxy:
    return Proxy(ProxySettings(bind_host="127.0.0.1", connect_timeout=0.5, retry_interval=0.2, **settings))


@pytest.fixture
def limited() -> Iterator[Proxy]:
    p = make(max_connections=2)
    yield p
    p.close()


@pytest.fixture
def idling() -> Iterator[Proxy]:
    p = make(idle_timeout=0.3)
    yield p
    p.close()


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_past_max_connections_a_client_is_reset_and_a_freed_slot_is_reused(
        limited: Proxy, backends: Any) -> None:
    b: Backend = backends(named(b"b"))
    port = free_port()
    limited.route(port, b.port)
    held = [connect(port) for _ in range(2)]
    for s in held:
        assert recv_exact(s, 1) == b"b"
    try:
        with connect(port, timeout=2) as extra:
            assert closed_by_peer(extra)
    except ConnectionResetError:
        pass  # the reset may beat connect() itself: refused all the same
    assert limited.server.stats.connections_over_limit == 1
    held.pop().close()
    wait_for(lambda: limited.server.stats.connections_active == 1, what="the slot freed")
    assert first_bytes(port) == b"b"
    for s in held:
        s.close()


def test_an_idle_connection_is_closed_and_a_busy_one_is_not(idling: Proxy, backends: Any) -> None:
    b = backends(echo)
    port = free_port()
    idling.route(port, b.port)
    with connect(port, timeout=3) as idle, connect(port, timeout=3) as busy:
        started = time.monotonic()
        while time.monotonic() - started < 1.0:    # bytes every 0.1 s keep it open past 0.3 s
            busy.sendall(b"x")
            assert recv_exact(busy, 1) == b"x"
            time.sleep(0.1)
        assert closed_by_peer(idle)
        busy.sendall(b"y")
        assert recv_exact(busy, 1) == b"y"
    assert idling.server.stats.idle_closed == 1


def test_least_connections_chosen_per_port_sends_new_clients_to_the_idle_replica(backends: Any) -> None:
    proxy = make()
    try:
        a, b = backends(named(b"a")), backends(named(b"b"))
        port = free_port()
        key = ("TCP", port)
        proxy.lt.run(proxy.server.apply({key: (Endpoint("127.0.0.1", a.port), Endpoint("127.0.0.1", b.port))},
                                        {key: Balance.LEAST_CONNECTIONS}))
        with connect(port) as long_lived:
            busy = recv_exact(long_lived, 1)
            seen = []
            for _ in range(4):
                seen.append(first_bytes(port))
                wait_for(lambda: proxy.server.stats.connections_active == 1, what="the short one closed")
        assert seen == [({b"a", b"b"} - {busy}).pop()] * 4
    finally:
        proxy.close()


def test_an_ejected_endpoint_gets_traffic_again_once_it_answers(backends: Any) -> None:
    proxy = make()
    try:
        a = backends(named(b"a"))
        port, late_port = free_ports(2)
        proxy.route(port, a.port, late_port)
        assert {first_bytes(port) for _ in range(4)} == {b"a"}   # late_port refuses: ejected
        assert proxy.server.stats.ejections == 1
        late = Backend(named(b"L"), port=late_port)              # the endpoint comes back
        try:
            time.sleep(1.1)                                     # the first back-off is 1 s
            assert {first_bytes(port) for _ in range(4)} == {b"a", b"L"}
            assert proxy.server.stats.ejections == 1
        finally:
            late.close()
    finally:
        proxy.close()
