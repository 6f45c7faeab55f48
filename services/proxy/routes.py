"""The proxy's route table, computed from pod records with no I/O.

A route is keyed by ``(protocol, host_port)`` and lists the endpoints that traffic arriving on
that host port may go to. ``status.endpoints`` of each pod is authoritative; only pods that are
both observed Running and desired running contribute, so a pod being stopped stops receiving
new connections as soon as its desired state changes.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from common.pod import serving

log = logging.getLogger(__name__)

PROTOCOLS = ("TCP", "UDP", "SCTP")
STREAMS = ("TCP", "SCTP")      # served by the stream path (services.proxy.tcp)


class Endpoint(NamedTuple):
    """Where a route's traffic may go. A tuple, so hashing it (several times per connection,
    in the balancer's tables) costs no Python call."""

    address: str   # an IP literal: the data path never waits on name resolution
    port: int

    def __str__(self) -> str:
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"


RouteKey = tuple[str, int]                      # (protocol, host_port)
Routes = dict[RouteKey, tuple[Endpoint, ...]]


@dataclass(frozen=True)
class RouteChanges:
    added: frozenset[RouteKey] = frozenset()
    removed: frozenset[RouteKey] = frozenset()
    changed: frozenset[RouteKey] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


_sctp_warned = False
_sctp_error: str | None = None
_sctp_checked = False


def sctp_unsupported() -> str | None:
    """Why this kernel cannot do SCTP (opening an SCTP socket failed), or None if it can.
    Asked once: a kernel does not gain or lose the protocol while the proxy runs."""
    global _sctp_checked, _sctp_error
    if not _sctp_checked:
        _sctp_checked = True
        try:
            socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_SCTP).close()
        except OSError as exc:
            _sctp_error = exc.strerror or str(exc)
    return _sctp_error


def _warn_sctp(pod: str, host_port: object, why: str) -> None:
    global _sctp_warned
    if not _sctp_warned:
        _sctp_warned = True
        log.warning("SCTP endpoints are ignored: this kernel has no SCTP",
                    extra={"pod": pod, "host_port": host_port, "error": why})


def valid_port(value: object) -> int | None:
    """``value`` if it is a port number (1-65535), else None."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        return None
    return value


def family_of(address: str) -> socket.AddressFamily:
    """The socket family of an IP literal (validated already: a colon means IPv6)."""
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def is_ip_literal(value: object) -> bool:
    """True for an IPv4 or IPv6 address written out: the data path never resolves names."""
    try:
        return isinstance(value, str) and bool(ipaddress.ip_address(value))
    except ValueError:
        return False


def _endpoint(pod: str, raw: object) -> tuple[RouteKey, Endpoint] | None:
    """One ``status.endpoints`` entry as a route key and endpoint; None (logged) if unusable."""
    if not isinstance(raw, Mapping):
        log.debug("endpoint is not an object", extra={"pod": pod})
        return None
    proto = str(raw.get("protocol") or "TCP").upper()
    if proto == "SCTP" and (why := sctp_unsupported()) is not None:
        _warn_sctp(pod, raw.get("host_port"), why)
        return None
    host_port, port = valid_port(raw.get("host_port")), valid_port(raw.get("port"))
    address = raw.get("address")
    if proto not in PROTOCOLS or host_port is None or port is None or not is_ip_literal(address):
        log.debug("unusable endpoint skipped", extra={"pod": pod, "endpoint": dict(raw)})
        return None
    return (proto, host_port), Endpoint(str(address), port)


def routes_from_pods(pods: Iterable[Mapping[str, Any]]) -> Routes:
    """Route table of the pods that serve traffic; endpoints sorted so equal inputs compare equal."""
    table: dict[RouteKey, set[Endpoint]] = {}
    for pod in pods:
        if not serving(pod):
            continue
        name = str(pod.get("name", "?"))
        entries = pod["status"].get("endpoints") or []
        if not isinstance(entries, list):
            continue
        for raw in entries:
            found = _endpoint(name, raw)
            if found is not None:
                table.setdefault(found[0], set()).add(found[1])
    return {key: tuple(sorted(eps)) for key, eps in sorted(table.items())}


def listed_endpoints(pods: Iterable[Mapping[str, Any]]) -> frozenset[tuple[RouteKey, Endpoint]]:
    """Every endpoint some pod record lists, whatever its phase: a pod stopping still drains
    its connections; one no longer listed is gone."""
    found = set()
    for pod in pods:
        status = pod.get("status")
        entries = status.get("endpoints") if isinstance(status, Mapping) else None
        for raw in entries if isinstance(entries, list) else []:
            parsed = _endpoint(str(pod.get("name", "?")), raw)
            if parsed is not None:
                found.add(parsed)
    return frozenset(found)


def balance_from_pods(pods: Iterable[Mapping[str, Any]]) -> dict[RouteKey, str]:
    """The balancing each host port asks for in its pods' specs (``spec.ports[].balance``);
    ports that do not ask are left out (round robin). Replicas share one spec, so they agree."""
    found: dict[RouteKey, str] = {}
    for pod in pods:
        spec = pod.get("spec")
        ports = spec.get("ports") if isinstance(spec, Mapping) else None
        for p in ports if isinstance(ports, list) else []:
            if isinstance(p, Mapping) and isinstance(p.get("balance"), str) and valid_port(p.get("port")):
                found[(str(p.get("protocol", "TCP")).upper(), p["port"])] = p["balance"]
    return found


def diff(old: Mapping[RouteKey, tuple[Endpoint, ...]],
         new: Mapping[RouteKey, tuple[Endpoint, ...]]) -> RouteChanges:
    return RouteChanges(
        added=frozenset(new.keys() - old.keys()),
        removed=frozenset(old.keys() - new.keys()),
        changed=frozenset(k for k in old.keys() & new.keys() if old[k] != new[k]),
    )


class RoundRobin:
    """Endpoint choice for new connections or flows. Each pick starts one further along, and
    returns the whole rotation so a caller can fail over to the next endpoints in turn."""

    __slots__ = ("_endpoints", "_next")

    def __init__(self, endpoints: tuple[Endpoint, ...] = ()) -> None:
        self._endpoints = endpoints
        self._next = 0

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return self._endpoints

    def set(self, endpoints: tuple[Endpoint, ...]) -> None:
        self._endpoints = endpoints

    def order(self) -> tuple[Endpoint, ...]:
        eps = self._endpoints
        if not eps:
            return ()
        start = self._next % len(eps)
        self._next = start + 1
        return eps[start:] + eps[:start]
