"""The kernel data path: keeps the agent's nftables table equal to the routes' ready endpoints.

:class:`KernelForwarder` plays :class:`services.proxy.server.ProxyServer`'s part for the worker
(``update(routes, balance)``, ``apply``, ``close``...), but binds nothing: the kernel DNATs each
host port to the ready endpoints and carries every byte. Like ProxyServer only the newest
route table is applied; each sync is one nft transaction that rewrites only the chains that
changed (all of them on the first sync after a start, without ever flushing the table: rules
are replaced atomically, established flows keep their NAT in conntrack).

- Start: the table a predecessor left is reconciled (missing chains added, stale ones deleted)
  once the first routes arrive; until then it stays as it was and carries traffic.
- Close (the worker stopping, handed over, killed): the table stays. Workloads keep running
  and the next start reconciles, as kube-proxy does. With no host port left it stays too,
  empty but for its guard of 127.0.0.0/8 (route_localnet stays on once set).
- Health: a :class:`HealthChecker` probes the TCP/SCTP endpoints; unhealthy ones leave the maps,
  and a port with none ready rejects (TCP reset; ICMP port unreachable for UDP and SCTP).
- Conntrack: when an endpoint leaves a port, its UDP entries for that port are deleted (and its
  TCP/SCTP ones when it left the routes, not merely failed a probe).
- A host port another program holds (the bind probe fails) is *blocked*, as in user space: not
  programmed (the DNAT would steal that program's traffic) and reported through ``on_blocked``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from common import blocked_ports, holders
from common.ports import bindable
from services.proxy.balance import Balance
from services.proxy.kernel import conntrack, nft, ruleset
from services.proxy.kernel.conntrack import Stale
from services.proxy.kernel.health import HealthChecker
from services.proxy.routes import STREAMS, Endpoint, RouteKey, Routes
from services.proxy.server import ProxySettings
from services.proxy.stats import Stats

log = logging.getLogger(__name__)

ROUTE_LOCALNET = "/proc/sys/net/ipv4/conf/all/route_localnet"
Ready = dict[RouteKey, tuple[Endpoint, ...]]


class KernelForwarder:
    """All methods run on the event loop thread but :meth:`snapshot` (the stats thread)."""

    def __init__(self, settings: ProxySettings, table: str, *, stats: Stats | None = None,
                 health: Callable[[Callable[[], None]], HealthChecker] | None = None) -> None:
        self.settings = settings
        self.table = table
        self.stats = stats or Stats()
        self.connections: set[Any] = set()          # the kernel holds them; none here
        self.health = (health or (lambda cb: HealthChecker(cb)))(self._health_changed)
        self.on_blocked: Callable[[dict[RouteKey, str]], None] | None = None
        self._routes: Routes = {}
        self._balance: dict[RouteKey, Balance] = {}
        self._pending: tuple[Routes, dict[RouteKey, Balance]] | None = None
        self._ready: Ready | None = None            # what the table holds (None: unknown yet)
        self._applied: ruleset.Ruleset | None = None
        self._blocked: dict[RouteKey, str] = {}
        self._adopted: dict[RouteKey, socket.socket] = {}
        self._worker: asyncio.Task[None] | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False
        self._warned: set[str] = set()
        # Stream endpoints out of the routes whose pod may still drain its connections: their
        # conntrack entries go once no pod lists them (``alive``, from memory's pods).
        self._lingering: set[Stale] = set()
        self._alive: frozenset[tuple[RouteKey, Endpoint]] | None = None
        self.syncs = self.sync_errors = 0
        self.last_sync_seconds = 0.0
        self.conntrack_deleted = 0

    # --- the worker's interface (as ProxyServer's) --------------------------------------------

    @property
    def routes(self) -> Routes:
        return dict(self._routes)

    @property
    def balance(self) -> dict[RouteKey, Balance]:
        return dict(self._balance)

    def listening(self) -> set[RouteKey]:
        """The host ports the kernel forwards now."""
        return set(self._ready or {})

    def failed(self) -> set[RouteKey]:
        return set(self._blocked)

    def blocked(self) -> dict[RouteKey, str]:
        return dict(self._blocked)

    def seed_blocked(self, blocked: Mapping[RouteKey, str]) -> None:
        self._blocked.update(blocked)

    def listener_fds(self) -> list[tuple[RouteKey, int]]:
        return []

    def adopt(self, sockets: Mapping[RouteKey, socket.socket]) -> None:
        """A user-space predecessor's listeners: held (so the port probe is not fooled by our
        own socket) until the table carries their ports, then closed."""
        for key, sock in sockets.items():
            old = self._adopted.pop(key, None)
            if old is not None:
                old.close()
            self._adopted[key] = sock

    def update(self, routes: Routes, balance: Mapping[RouteKey, Balance] | None = None,
               alive: frozenset[tuple[RouteKey, Endpoint]] | None = None) -> None:
        """Apply ``routes``; ``alive``: every endpoint some pod record still lists (running or
        stopping), when known: a stream endpoint that left the routes and is no longer listed
        belongs to a deleted pod, and its TCP conntrack entries are deleted."""
        if self._closed:
            return
        if alive is not None:
            self._alive = alive
        self._pending = (routes, dict(balance or {}))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._drain())

    async def apply(self, routes: Routes, balance: Mapping[RouteKey, Balance] | None = None) -> None:
        self.update(routes, balance)
        await self.settled()

    async def settled(self) -> None:
        while self._worker is not None and not self._worker.done():
            await asyncio.shield(self._worker)

    async def close(self, abort_connections: bool = True) -> None:
        """Stop syncing; the table stays in the kernel (see the module's docstring)."""
        self._closed = True
        self._pending = None
        if self._retry is not None:
            self._retry.cancel()
        if self._worker is not None:
            await asyncio.shield(self._worker)
        await self.health.close()
        for sock in self._adopted.values():
            sock.close()
        self._adopted.clear()

    # --- syncing ------------------------------------------------------------------------------

    def _health_changed(self) -> None:
        if not self._closed and self._pending is None:
            self.update(self._routes, self._balance)

    async def _drain(self) -> None:
        while self._pending is not None and not self._closed:
            (routes, balance), self._pending = self._pending, None
            await self._sync(routes, balance)

    async def _sync(self, routes: Routes, balance: dict[RouteKey, Balance]) -> None:
        loop = asyncio.get_running_loop()
        self.health.start()
        await self._probe_ports(routes)
        # Probed only where there is a choice: a sole endpoint that refuses is refused by the
        # kernel all the same, and each probe is a connection the workload sees.
        for proto in ("TCP", "SCTP", "UDP"):
            self.health.watch([ep for k, eps in routes.items() if k[0] == proto and len(eps) > 1
                               for ep in eps], proto)
        ready = self._ready_endpoints(routes, balance)
        self._routes, self._balance = routes, balance
        started = time.monotonic()
        try:
            old = await loop.run_in_executor(None, self._program, ready)
        except nft.NftError as exc:
            self.sync_errors += 1
            self._applied = None        # the next sync lists the table and rewrites it whole
            log.error("cannot program the kernel table", extra={"table": self.table, "error": str(exc)})
            self._arm_retry()
            return
        self.last_sync_seconds = time.monotonic() - started
        self.syncs += 1
        if old != ready:
            log.info("kernel table synced", extra={
                "table": self.table, "ports": len(ready), "seconds": round(self.last_sync_seconds, 4),
                "ready": {f"{p}/{n}": [str(e) for e in eps] for (p, n), eps in sorted(ready.items())}})
        self._ready = ready
        self._close_adopted(ready)
        udp, streams = _stale(old, ready, routes)
        # Back in the table: its flows are wanted again. Not listed by any pod: deleted pod.
        self._lingering = {s for s in self._lingering | set(streams)
                           if s.endpoint not in ready.get(s.key, ())}
        alive = self._alive
        gone = [s for s in self._lingering if alive is not None and (s.key, s.endpoint) not in alive]
        self._lingering.difference_update(gone)
        if udp or gone:
            self.conntrack_deleted += await loop.run_in_executor(None, conntrack.delete, udp + gone)
        self._tell_blocked()
        if self._blocked:
            self._arm_retry()

    def _ready_endpoints(self, routes: Routes, balance: Mapping[RouteKey, Balance]) -> Ready:
        ready: Ready = {}
        for key, eps in routes.items():
            if key in self._blocked:
                continue
            if balance.get(key) is Balance.LEAST_CONNECTIONS:
                self._warn_once("least_connections", "least_connections balances at random in kernel mode",
                                key)
            usable = [ep for ep in eps if ruleset.kernel_endpoint(ep)]
            if len(usable) < len(eps):
                self._warn_once("ipv6", "IPv6 endpoints are not forwarded in kernel mode", key)
            ready[key] = tuple(ep for ep in usable if self.health.healthy(ep, key[0]))
        return ready

    def _program(self, ready: Ready) -> Ready:
        """Runs on an executor thread: the nft transaction. Returns what the table held before."""
        applied, previous = self._applied, self._ready
        present: ruleset.Present | None
        if applied is None:
            present = nft.present(self.table)
            previous = _ready_in(present)
        else:
            present = ruleset.Present(frozenset(applied.chains), applied.counters)
        desired = ruleset.build(self.table, ready, self.settings.bind_host)
        if desired != applied:
            if any(_loopback(ep) for eps in ready.values() for ep in eps):
                self._route_localnet()
            nft.apply(ruleset.commands(desired, present, applied))
            self._applied = desired
        return previous or {}

    def _route_localnet(self) -> None:
        # DNAT to 127.0.0.1 of traffic from other hosts needs it, as kube-proxy sets it; the
        # guard chain drops what else would come to 127.0.0.0/8 from outside.
        if "route_localnet" in self._warned:
            return
        self._warned.add("route_localnet")
        try:
            with open(ROUTE_LOCALNET, "r+", encoding="ascii") as fh:
                if fh.read().strip() != "1":
                    fh.seek(0)
                    fh.write("1")
                    log.info("net.ipv4.conf.all.route_localnet set to 1 (DNAT to loopback endpoints)")
        except OSError as exc:
            log.warning("cannot set route_localnet: other hosts cannot reach loopback endpoints",
                        extra={"error": str(exc)})

    # --- host ports held by other programs ------------------------------------------------------

    async def _probe_ports(self, routes: Routes) -> None:
        """Block the new ports another program holds (not the ones the table already carries)."""
        carried = set(self._ready or {})
        fresh = [k for k in routes if k not in carried and k not in self._adopted
                 and k[0] != "SCTP" and k not in self._blocked]
        if not fresh:
            return
        loop = asyncio.get_running_loop()
        held = await loop.run_in_executor(None, _held, fresh, self.settings.bind_host)
        self._blocked.update(held)
        for (proto, port), message in held.items():
            log.warning("host port held by another program: not forwarded",
                        extra={"protocol": proto, "port": port, "error": message})

    def _arm_retry(self) -> None:
        if self._retry is None and not self._closed:
            self._retry = asyncio.get_running_loop().call_later(self.settings.retry_interval, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        if self._closed:
            return
        asyncio.get_running_loop().create_task(self._reprobe())

    async def _reprobe(self) -> None:
        keys = list(self._blocked)
        held = await asyncio.get_running_loop().run_in_executor(None, _held, keys, self.settings.bind_host)
        free = [k for k in keys if k not in held]
        for key in free:
            self._blocked.pop(key, None)
        if free:
            log.info("host ports free again", extra={"ports": [f"{p}/{n}" for p, n in free]})
        if free or self._applied is None:
            self.update(self._routes, self._balance)   # also reports the change
        elif self._blocked:
            self._arm_retry()

    def _tell_blocked(self) -> None:
        blocked_ports.tell(self.on_blocked, self._blocked)

    def _close_adopted(self, ready: Ready) -> None:
        for key in list(self._adopted):
            self._adopted.pop(key).close()
            log.info("user-space listener closed: the kernel forwards the port",
                     extra={"protocol": key[0], "port": key[1], "forwarded": key in ready})

    def _warn_once(self, what: str, message: str, key: RouteKey) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning(message, extra={"protocol": key[0], "port": key[1]})

    # --- stats (the stats thread) ---------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The user-space counters (zero but for a predecessor's) plus the kernel's: per-port
        packets and bytes (nft named counters) and conntrack entries, summed into the totals."""
        out = self.stats.as_dict()
        routes, ready = self._routes, self._ready or {}
        try:
            counted = nft.counters(self.table) if ready else {}
        except nft.NftError as exc:
            log.debug("cannot read the kernel counters", extra={"error": str(exc)})
            counted = {}
        tracked = conntrack.counts(ready)
        ports: list[dict[str, Any]] = []
        for key in sorted(routes):
            inbound, outbound = (counted.get(n, (0, 0)) for n in ruleset.counter_names(key))
            ports.append({"protocol": key[0], "port": key[1], "endpoints": len(routes[key]),
                          "ready": len(ready.get(key, ())), "blocked": key in self._blocked,
                          "flows": counted.get(ruleset.flows_counter(key), (0, 0))[0],
                          "packets_in": inbound[0], "bytes_in": inbound[1],
                          "packets_out": outbound[0], "bytes_out": outbound[1],
                          "conntrack": tracked.get(key, 0)})
        out["bytes_in"] += sum(p["bytes_in"] for p in ports)
        out["bytes_out"] += sum(p["bytes_out"] for p in ports)
        out["connections_total"] += sum(p["flows"] for p in ports if p["protocol"] in STREAMS)
        out["udp_flows_total"] += sum(p["flows"] for p in ports if p["protocol"] == "UDP")
        out.update(packets_in=sum(p["packets_in"] for p in ports),
                   packets_out=sum(p["packets_out"] for p in ports),
                   conntrack_entries=sum(tracked.values()), ports=ports, table=self.table,
                   syncs=self.syncs, sync_errors=self.sync_errors,
                   last_sync_seconds=self.last_sync_seconds, conntrack_deleted=self.conntrack_deleted,
                   endpoints_ready=sum(p["ready"] for p in ports),
                   endpoints_total=sum(p["endpoints"] for p in ports))
        return out


def retire(table: str, bind: str) -> bool:
    """Empty a table a kernel-mode run left (user space took over): its rules go in one
    transaction, its guard stays. Not deleted: deleting the last nat chain drops the NAT state
    of every live flow, while emptying the rules leaves established flows to finish. False if
    there was no such table or nothing to remove."""
    present = nft.present(table)
    if present is None or not _ready_in(present):
        return False
    nft.apply(ruleset.commands(ruleset.build(table, {}, bind), present, None))
    return True


# --- helpers -----------------------------------------------------------------------------------

def _loopback(ep: Endpoint) -> bool:
    return ep.address.startswith("127.")


def _held(keys: list[RouteKey], host: str) -> dict[RouteKey, str]:
    """The ports among ``keys`` another program holds, with a message naming it."""
    out = {}
    for proto, port in keys:
        with contextlib.suppress(OSError):
            if not bindable(proto, port):
                out[(proto, port)] = (f"host port {port}/{proto} is in use on the node by "
                                      f"{holders.describe(proto, port)}")
    return out


def _ready_in(present: ruleset.Present | None) -> Ready:
    """The endpoints a table left by a predecessor forwards to, read from its chain names."""
    out: dict[RouteKey, list[Endpoint]] = {}
    for name in present.chains if present is not None else ():
        parsed = _parse_ep_chain(name)
        if parsed is not None:
            out.setdefault(parsed[0], []).append(parsed[1])
    return {k: tuple(sorted(v)) for k, v in out.items()}


def _parse_ep_chain(name: str) -> tuple[RouteKey, Endpoint] | None:
    # ep_<proto>_<port>__<address>_<port>
    if not name.startswith("ep_") or "__" not in name:
        return None
    head, _, tail = name[3:].partition("__")
    proto, _, port = head.partition("_")
    address, _, ep_port = tail.rpartition("_")
    if not (port.isdigit() and ep_port.isdigit() and address):
        return None
    return (proto.upper(), int(port)), Endpoint(address, int(ep_port))


def _stale(old: Ready, new: Ready, routes: Routes) -> tuple[list[Stale], list[Stale]]:
    """Endpoints that left a port's ready set: (UDP ones, whose conntrack entries go now; stream
    ones that left the routes, whose entries go once their pod is gone). An endpoint merely
    unhealthy keeps its stream flows, and a stopping pod drains its own."""
    udp, streams = [], []
    for key, eps in old.items():
        kept = set(new.get(key, ()))
        routed = set(routes.get(key, ()))
        for ep in eps:
            if ep in kept:
                continue
            if key[0] not in STREAMS:
                udp.append(Stale(key, ep))
            elif ep not in routed:
                streams.append(Stale(key, ep))
    return udp, streams
