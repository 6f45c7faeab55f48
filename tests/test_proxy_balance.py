"""Endpoint choice: round robin, least connections, and passive health (ejection, recovery)."""

from __future__ import annotations

from services.proxy.balance import Balance, Balancer, balances
from services.proxy.routes import Endpoint, balance_from_pods

A, B, C = Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80), Endpoint("10.0.0.3", 80)


def test_round_robin_rotates_through_every_endpoint() -> None:
    bal = Balancer((A, B, C))
    assert [bal.order(0.0)[0] for _ in range(6)] == [A, B, C, A, B, C]
    assert Balancer().order(0.0) == ()


def test_least_connections_prefers_the_endpoint_with_fewest_open() -> None:
    bal = Balancer((A, B, C), Balance.LEAST_CONNECTIONS)
    bal.connected(A)
    bal.connected(A)
    bal.connected(B)
    assert bal.order(0.0)[0] == C
    bal.connected(C)
    bal.connected(C)
    assert bal.order(0.0)[0] == B
    bal.released(A)
    bal.released(A)
    assert bal.order(0.0)[0] == A


def test_equal_loads_still_take_turns_under_least_connections() -> None:
    bal = Balancer((A, B), Balance.LEAST_CONNECTIONS)
    assert {bal.order(0.0)[0], bal.order(0.0)[0]} == {A, B}


def test_a_refusing_endpoint_is_ejected_for_a_doubling_back_off_then_recovers() -> None:
    bal = Balancer((A, B), eject_initial=1.0, eject_max=3.0)
    bal.failed(A, now=10.0)
    assert all(A not in bal.order(10.5) for _ in range(4))   # traffic goes to the others
    assert A in bal.order(11.0)                              # back-off over: tried again
    bal.failed(A, now=11.0)
    assert A not in bal.order(12.9) and A in bal.order(13.0)  # 2 s the second time
    bal.failed(A, now=13.0)
    assert A not in bal.order(15.9) and A in bal.order(16.0)  # capped at 3 s
    bal.connected(A)                                          # a success forgets the failures
    bal.failed(A, now=20.0)
    assert A in bal.order(21.0)
    assert bal.ejections == 4


def test_with_every_endpoint_ejected_the_order_is_empty() -> None:
    bal = Balancer((A, B))
    bal.failed(A, now=0.0)
    bal.failed(B, now=0.0)
    assert bal.order(0.5) == ()
    assert bal.ejected(0.5) == {A, B}


def test_an_endpoint_that_leaves_the_route_forgets_its_ejection() -> None:
    bal = Balancer((A, B))
    bal.failed(A, now=0.0)
    bal.set((B,))
    bal.set((A, B), Balance.LEAST_CONNECTIONS)
    assert A in bal.order(0.1) and bal.policy is Balance.LEAST_CONNECTIONS


def test_the_balancing_of_a_port_comes_from_the_pod_spec() -> None:
    pods = [{"name": "web-0", "spec": {"ports": [
        {"port": 8080, "target_port": 80, "protocol": "TCP", "container": "c",
         "balance": "least_connections"},
        {"port": 8081, "target_port": 81, "protocol": "TCP", "container": "c"}]}}]
    assert balance_from_pods(pods) == {("TCP", 8080): "least_connections"}
    assert balances({("TCP", 1): "least_connections", ("TCP", 2): "bogus"}) == \
        {("TCP", 1): Balance.LEAST_CONNECTIONS}
