"""Endpoint choice for one route: round robin or least connections, with passive health.

Pure (the caller passes the time), so the rules are tested directly. An endpoint whose connect
fails is ejected for a back-off that doubles with each consecutive failure (1 s up to 30 s by
default) and is reset by a success; ejected endpoints are left out of the order, so new
connections go to the others, and when every endpoint is ejected the order is empty and the
client is reset at once instead of waiting on connects that will fail.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from services.proxy.routes import Endpoint, RouteKey

EJECT_INITIAL = 1.0
EJECT_MAX = 30.0


class Balance(StrEnum):
    ROUND_ROBIN = "round_robin"
    LEAST_CONNECTIONS = "least_connections"


def balances(named: Mapping[RouteKey, str]) -> dict[RouteKey, Balance]:
    """Known balancing names as enums; an unknown one (validated away at apply) is skipped."""
    values = {b.value for b in Balance}
    return {key: Balance(name) for key, name in named.items() if name in values}


class Balancer:
    """Each ``order`` call returns the healthy endpoints, best first; the caller tries them in
    turn and reports each outcome with ``failed``/``connected``, and ``released`` on close."""

    __slots__ = (
        "_ejected",
        "_endpoints",
        "_failures",
        "_next",
        "active",
        "eject_initial",
        "eject_max",
        "ejections",
        "policy",
    )

    def __init__(self, endpoints: tuple[Endpoint, ...] = (), policy: Balance = Balance.ROUND_ROBIN,
                 *, eject_initial: float = EJECT_INITIAL, eject_max: float = EJECT_MAX) -> None:
        self._endpoints = endpoints
        self._next = 0
        self.policy = policy
        self.active: dict[Endpoint, int] = {}         # open connections per endpoint
        self._ejected: dict[Endpoint, float] = {}     # endpoint -> time it may be tried again
        self._failures: dict[Endpoint, int] = {}      # consecutive failed connects
        self.eject_initial, self.eject_max = eject_initial, eject_max
        self.ejections = 0

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self._endpoints

    def set(self, endpoints: tuple[Endpoint, ...], policy: Balance | None = None) -> None:
        self._endpoints = endpoints
        if policy is not None:
            self.policy = policy
        keep = set(endpoints)
        for table in (self._ejected, self._failures):
            for ep in [e for e in table if e not in keep]:
                del table[ep]

    def ejected(self, now: float) -> frozenset[Endpoint]:
        return frozenset(ep for ep, until in self._ejected.items() if until > now)

    def order(self, now: float) -> tuple[Endpoint, ...]:
        eps = self._endpoints
        if not eps:
            return ()
        start = self._next % len(eps)
        self._next = start + 1
        rotated = eps[start:] + eps[:start]
        if self._ejected:
            rotated = tuple(ep for ep in rotated if self._ejected.get(ep, 0.0) <= now)
        if self.policy is Balance.LEAST_CONNECTIONS:
            active = self.active
            # sorted() is stable: ties keep the rotation, so equal loads still take turns.
            rotated = tuple(sorted(rotated, key=lambda ep: active.get(ep, 0)))
        return rotated

    def failed(self, ep: Endpoint, now: float) -> None:
        n = self._failures.get(ep, 0) + 1
        self._failures[ep] = n
        self._ejected[ep] = now + min(self.eject_initial * 2 ** (n - 1), self.eject_max)
        self.ejections += 1

    def connected(self, ep: Endpoint) -> None:
        if self._failures:
            self._failures.pop(ep, None)
            self._ejected.pop(ep, None)
        self.active[ep] = self.active.get(ep, 0) + 1

    def released(self, ep: Endpoint) -> None:
        n = self.active.get(ep, 0) - 1
        if n > 0:
            self.active[ep] = n
        else:
            self.active.pop(ep, None)
