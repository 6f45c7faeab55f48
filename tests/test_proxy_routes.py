"""The route table: which pods serve which host ports, and what changed between two tables."""

from __future__ import annotations

import logging
import socket
from typing import Any

import pytest

from services.proxy import routes as routes_mod
from services.proxy.routes import Endpoint, RoundRobin, RouteChanges, diff, routes_from_pods


def pod(name: str, *endpoints: dict[str, Any], phase: str = "Running",
        desired: str = "running") -> dict[str, Any]:
    return {"name": name, "uid": f"uid-{name}", "version": 1, "desired": desired,
            "spec": {"workload": "web", "ports": []},
            "status": {"phase": phase, "endpoints": list(endpoints)}}


def ep(host_port: int, port: int, address: str = "127.0.0.1", protocol: str = "TCP") -> dict[str, Any]:
    return {"host_port": host_port, "protocol": protocol, "address": address, "port": port}


def test_running_pods_give_sorted_endpoints_per_protocol_and_port() -> None:
    pods = [pod("web-1", ep(8080, 18081, "10.0.0.2")), pod("web-0", ep(8080, 18080, "10.0.0.1")),
            pod("dns-0", ep(5353, 53, "10.0.0.3", "udp"))]
    assert routes_from_pods(pods) == {
        ("TCP", 8080): (Endpoint("10.0.0.1", 18080), Endpoint("10.0.0.2", 18081)),
        ("UDP", 5353): (Endpoint("10.0.0.3", 53),),
    }


def test_the_same_pods_in_any_order_give_an_equal_table() -> None:
    pods = [pod(f"web-{i}", ep(8080, 18000 + i)) for i in range(5)]
    assert routes_from_pods(pods) == routes_from_pods(reversed(pods))


@pytest.mark.parametrize("phase, desired", [("Pending", "running"), ("Failed", "running"),
                                            ("Running", "stopped"), ("Running", "deleted")])
def test_only_pods_running_and_desired_running_contribute(phase: str, desired: str) -> None:
    assert routes_from_pods([pod("web-0", ep(8080, 80), phase=phase, desired=desired)]) == {}


def test_without_kernel_sctp_its_endpoints_are_skipped_and_logged_once(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routes_mod, "_sctp_warned", False)
    monkeypatch.setattr(routes_mod, "_sctp_checked", True)
    monkeypatch.setattr(routes_mod, "_sctp_error", "Protocol not supported")
    pods = [pod("a", ep(9000, 9000, protocol="SCTP"), ep(8080, 80)),
            pod("b", ep(9001, 9001, protocol="sctp"))]
    with caplog.at_level(logging.WARNING):
        table = routes_from_pods(pods)
        routes_from_pods(pods)
    assert table == {("TCP", 8080): (Endpoint("127.0.0.1", 80),)}
    warned = [r for r in caplog.records if "SCTP" in r.getMessage()]
    assert len(warned) == 1 and warned[0].__dict__["error"] == "Protocol not supported"


def test_with_kernel_sctp_its_endpoints_make_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routes_mod, "_sctp_checked", True)
    monkeypatch.setattr(routes_mod, "_sctp_error", None)
    table = routes_from_pods([pod("a", ep(9000, 9000, protocol="sctp"))])
    assert table == {("SCTP", 9000): (Endpoint("127.0.0.1", 9000),)}


def test_sctp_support_is_detected_by_opening_a_socket() -> None:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP).close()
        expected = None
    except OSError as exc:
        expected = exc.strerror
    routes_mod._sctp_checked = False
    assert routes_mod.sctp_unsupported() == expected


@pytest.mark.parametrize("bad", [
    {"host_port": 0, "protocol": "TCP", "address": "127.0.0.1", "port": 80},
    {"host_port": 70000, "protocol": "TCP", "address": "127.0.0.1", "port": 80},
    {"host_port": 8080, "protocol": "TCP", "address": "127.0.0.1", "port": "80"},
    {"host_port": True, "protocol": "TCP", "address": "127.0.0.1", "port": 80},
    {"host_port": 8080, "protocol": "TCP", "address": "db.example", "port": 80},
    {"host_port": 8080, "protocol": "ICMP", "address": "127.0.0.1", "port": 80},
    "not an object",
])
def test_unusable_endpoints_are_skipped_not_fatal(bad: Any) -> None:
    table = routes_from_pods([pod("a", bad, ep(9090, 90))])
    assert table == {("TCP", 9090): (Endpoint("127.0.0.1", 90),)}


def test_missing_protocol_means_tcp_and_duplicates_collapse() -> None:
    raw = {"host_port": 8080, "address": "127.0.0.1", "port": 80}
    table = routes_from_pods([pod("a", raw), pod("b", dict(raw))])
    assert table == {("TCP", 8080): (Endpoint("127.0.0.1", 80),)}


def test_diff_reports_added_removed_and_changed_keys() -> None:
    a, b = Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80)
    old = {("TCP", 1): (a,), ("TCP", 2): (a,), ("UDP", 3): (a,)}
    new = {("TCP", 1): (a,), ("TCP", 2): (a, b), ("TCP", 4): (b,)}
    assert diff(old, new) == RouteChanges(added=frozenset({("TCP", 4)}), removed=frozenset({("UDP", 3)}),
                                          changed=frozenset({("TCP", 2)}))
    assert not diff(new, dict(new))


def test_round_robin_rotates_and_offers_the_rest_as_fallbacks() -> None:
    a, b, c = (Endpoint("10.0.0.1", p) for p in (1, 2, 3))
    rr = RoundRobin((a, b, c))
    assert [rr.order() for _ in range(4)] == [(a, b, c), (b, c, a), (c, a, b), (a, b, c)]
    rr.set((a,))
    assert rr.order() == (a,)
    assert RoundRobin().order() == ()
