"""The proxy's listeners, reconciled against the newest route table.

Route tables arrive faster than listeners can be opened (every pod status change produces
one), so only the newest is applied: :meth:`ProxyServer.update` replaces whatever was waiting,
and one worker task brings the listeners to it. A port that cannot be bound is logged and
retried on the next update and on a timer; it never takes the other routes down.

A port that cannot be bound is also *blocked*: its message (the holder of the port, when it can
be found) goes to ``on_blocked``, which tells the manager (:mod:`common.blocked_ports`), and
the pods asking for it show Error. A blocked port stays blocked after its route is gone (the
pods no longer Running take their routes away) until a probe finds it free: otherwise the pods
would flap between Running and Error.

A worker taking over from a predecessor (:mod:`services.proxy.handoff`) first passes its
listening sockets to :meth:`ProxyServer.adopt`: the next reconcile serves those instead of
binding, so the ports never stop accepting.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from common import blocked_ports, holders
from services.proxy.balance import Balance
from services.proxy.routes import STREAMS, Endpoint, RouteKey, Routes, diff, family_of
from services.proxy.stats import Stats
from services.proxy.tcp import CONNECT_TIMEOUT, ClientConnection
from services.proxy.tcp_listener import TcpListener
from services.proxy.udp import IDLE_TIMEOUT, MAX_FLOWS, UdpListener

log = logging.getLogger(__name__)

Listener = TcpListener | UdpListener
_IPPROTO = {"SCTP": getattr(socket, "IPPROTO_SCTP", 132)}


@dataclass(frozen=True)
class ProxySettings:
    bind_host: str = "0.0.0.0"
    connect_timeout: float = CONNECT_TIMEOUT
    udp_max_flows: int = MAX_FLOWS
    udp_idle_timeout: float = IDLE_TIMEOUT
    max_connections: int = 0      # per TCP port; 0: no limit
    idle_timeout: float = 0.0     # TCP pairs with no byte either way for this long close; 0: never
    retry_interval: float = 5.0   # re-try ports that could not be bound


class ProxyServer:
    """Owns every listener and established TCP connection of the node's proxy. All methods run
    on the event loop thread; other threads use ``loop.call_soon_threadsafe(server.update, r)``."""

    def __init__(self, settings: ProxySettings | None = None, stats: Stats | None = None) -> None:
        self.settings = settings or ProxySettings()
        self.stats = stats or Stats()
        self.connections: set[ClientConnection] = set()
        self._listeners: dict[RouteKey, Listener] = {}
        self._routes: Routes = {}          # the table last reconciled against
        self._pending: Routes | None = None
        self._balance: dict[RouteKey, Balance] = {}     # newest; absent means round robin
        self._applied_balance: dict[RouteKey, Balance] = {}
        self._failed: set[RouteKey] = set()
        self._adopted: dict[RouteKey, socket.socket] = {}
        self._worker: asyncio.Task[None] | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False
        self._blocked: dict[RouteKey, str] = {}
        self.on_blocked: Callable[[dict[RouteKey, str]], None] | None = None

    @property
    def routes(self) -> Routes:
        return dict(self._routes)

    def listening(self) -> set[RouteKey]:
        return set(self._listeners)

    def listener(self, key: RouteKey) -> Listener | None:
        return self._listeners.get(key)

    def failed(self) -> set[RouteKey]:
        return set(self._failed)

    def blocked(self) -> dict[RouteKey, str]:
        """Ports that could not be bound, with why (and by whom), until found free."""
        return dict(self._blocked)

    def seed_blocked(self, blocked: Mapping[RouteKey, str]) -> None:
        """Ports a predecessor found blocked: they stay so until bound or probed free."""
        self._blocked.update(blocked)
        if self._blocked:
            self._arm_retry()

    @property
    def balance(self) -> dict[RouteKey, Balance]:
        """The balancing applied with :attr:`routes` (absent: round robin)."""
        return dict(self._applied_balance)

    def listener_fds(self) -> list[tuple[RouteKey, int]]:
        """Each open listener's key and socket descriptor, sorted by key (for a successor)."""
        out = []
        for key in sorted(self._listeners):
            fd = self._listeners[key].fileno()
            if fd is not None:
                out.append((key, fd))
        return out

    def adopt(self, sockets: Mapping[RouteKey, socket.socket]) -> None:
        """Listening sockets handed over by a predecessor, served by the next reconcile instead
        of binding when a route has their key; those it does not use are then closed. The
        server owns them from here on."""
        for key, sock in sockets.items():
            if self._closed:
                sock.close()
                continue
            previous = self._adopted.pop(key, None)
            if previous is not None:
                previous.close()
            self._adopted[key] = sock

    async def settled(self) -> None:
        """Return once no route table is being applied or waiting."""
        while self._worker is not None and not self._worker.done():
            await asyncio.shield(self._worker)

    def buffered_bytes(self) -> int:
        """User-space bytes held by all TCP connections: what back-pressure keeps bounded."""
        return sum(conn.buffered() for conn in self.connections)

    def update(self, routes: Routes, balance: Mapping[RouteKey, Balance] | None = None) -> None:
        """Ask for ``routes`` (and each TCP route's balancing) to be applied; a table still
        waiting is replaced, not queued."""
        if self._closed:
            return
        self._pending = routes
        self._balance = dict(balance or {})
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._drain())

    async def apply(self, routes: Routes, balance: Mapping[RouteKey, Balance] | None = None) -> None:
        """Apply ``routes`` and return once the listeners match it (or failed to bind)."""
        self.update(routes, balance)
        await self.settled()

    async def close(self, abort_connections: bool = True) -> None:
        self._closed = True
        self._pending = None
        if self._retry is not None:
            self._retry.cancel()
        if self._worker is not None:
            await asyncio.shield(self._worker)
        for listener in self._listeners.values():
            listener.close()
        self._listeners.clear()
        self._close_adopted()
        if abort_connections:
            for conn in list(self.connections):
                conn.abort()

    async def _drain(self) -> None:
        while self._pending is not None and not self._closed:
            routes, self._pending = self._pending, None
            await self._reconcile(routes)

    async def _reconcile(self, routes: Routes) -> None:
        changes = diff(self._routes, routes)
        if changes:
            log.info("routes changed", extra={"added": sorted(changes.added),
                                              "removed": sorted(changes.removed),
                                              "changed": sorted(changes.changed)})
        for key in changes.removed:
            self._failed.discard(key)
            listener = self._listeners.pop(key, None)
            if listener is not None:
                listener.close()   # established connections are left alone
                log.info("listener closed", extra={"protocol": key[0], "port": key[1]})
        balance, old_balance = self._balance, self._applied_balance
        for key, endpoints in routes.items():
            existing = self._listeners.get(key)
            policy = balance.get(key, Balance.ROUND_ROBIN)
            if existing is not None:
                if isinstance(existing, TcpListener) and policy != old_balance.get(key, Balance.ROUND_ROBIN):
                    existing.set_endpoints(endpoints, policy)
                elif key in changes.changed:
                    existing.set_endpoints(endpoints)
                continue
            await self._open(key, endpoints, policy)
        self._routes, self._applied_balance = routes, balance
        self._close_adopted()
        if self._failed or self._blocked:
            self._arm_retry()

    def _arm_retry(self) -> None:
        if self._retry is None and not self._closed:
            self._retry = asyncio.get_running_loop().call_later(
                self.settings.retry_interval, self._retry_failed)

    def _listener(self, key: RouteKey, endpoints: tuple[Endpoint, ...], policy: Balance) -> Listener:
        s = self.settings
        if key[0] in STREAMS:
            return TcpListener(key[1], endpoints, host=s.bind_host, stats=self.stats,
                               conns=self.connections, connect_timeout=s.connect_timeout,
                               balance=policy, max_connections=s.max_connections,
                               idle_timeout=s.idle_timeout, protocol=key[0])
        return UdpListener(key[1], endpoints, host=s.bind_host, stats=self.stats,
                           max_flows=s.udp_max_flows, idle_timeout=s.udp_idle_timeout)

    async def _open(self, key: RouteKey, endpoints: tuple[Endpoint, ...], policy: Balance) -> None:
        s = self.settings
        adopted = await self._open_adopted(key, endpoints, policy)
        listener = adopted if adopted is not None else self._listener(key, endpoints, policy)
        if adopted is None:
            try:
                await listener.open()
            except OSError as exc:
                # Logged loudly once per failure streak; the timer keeps retrying quietly.
                level = logging.DEBUG if key in self._failed else logging.WARNING
                log.log(level, "cannot listen", extra={"protocol": key[0], "port": key[1],
                                                       "host": s.bind_host, "error": str(exc)})
                if key not in self._failed:
                    await self._block(key, exc)
                self._failed.add(key)
                return
        self._listeners[key] = listener
        self._failed.discard(key)
        self._unblock([key])
        log.info("listening", extra={"protocol": key[0], "port": key[1], "host": s.bind_host,
                                     "endpoints": [str(e) for e in endpoints],
                                     "adopted": adopted is not None})

    async def _open_adopted(self, key: RouteKey, endpoints: tuple[Endpoint, ...],
                            policy: Balance) -> Listener | None:
        """A listener serving the adopted socket for ``key``, if there is one it can serve;
        one bound elsewhere (the bind address changed) or refused is closed (None)."""
        sock = self._adopted.pop(key, None)
        if sock is None:
            return None
        host = self.settings.bind_host
        if not _bound_to(sock, host, key[1]):
            log.warning("adopted socket is not bound to the configured address; binding anew",
                        extra={"protocol": key[0], "port": key[1], "host": host})
            sock.close()
            return None
        listener = self._listener(key, endpoints, policy)
        try:
            await listener.open(sock)
        except OSError as exc:
            log.warning("cannot serve the adopted socket; binding anew",
                        extra={"protocol": key[0], "port": key[1], "error": str(exc)})
            sock.close()
            return None
        return listener

    def _close_adopted(self) -> None:
        for (proto, port), sock in self._adopted.items():
            log.info("adopted socket not needed, closed", extra={"protocol": proto, "port": port})
            sock.close()
        self._adopted.clear()

    def _retry_failed(self) -> None:
        self._retry = None
        if self._closed:
            return
        self._unblock([key for key in self._blocked if key not in self._routes and self._free(key)])
        if self._failed and self._pending is None:
            self.update(self._routes)
        elif self._blocked:
            self._arm_retry()

    async def _block(self, key: RouteKey, exc: OSError) -> None:
        if exc.errno == errno.EADDRINUSE:
            # Off the loop: finding the holder reads every process's descriptors.
            who = await asyncio.get_running_loop().run_in_executor(
                None, holders.describe, key[0], key[1])
            message = f"host port {key[1]}/{key[0]} is in use on the node by {who}"
        else:
            message = f"host port {key[1]}/{key[0]} cannot be bound: {exc.strerror or exc}"
        if self._blocked.get(key) != message and not self._closed:
            self._blocked[key] = message
            self._tell_blocked()

    def _unblock(self, keys: list[RouteKey]) -> None:
        gone = [key for key in keys if self._blocked.pop(key, None) is not None]
        if gone and not self._closed:
            log.info("host ports free again", extra={"ports": [f"{p}/{n}" for p, n in gone]})
            self._tell_blocked()

    def _tell_blocked(self) -> None:
        blocked_ports.tell(self.on_blocked, self._blocked)

    def _free(self, key: RouteKey) -> bool:
        """Whether a blocked port with no route could be bound now (bound and closed at once)."""
        proto, port = key
        kind = socket.SOCK_STREAM if proto in STREAMS else socket.SOCK_DGRAM
        try:
            with socket.socket(family_of(self.settings.bind_host), kind, _IPPROTO.get(proto, 0)) as sock:
                if kind == socket.SOCK_STREAM:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.settings.bind_host, port))
        except OSError:
            return False
        return True


def _bound_to(sock: socket.socket, host: str, port: int) -> bool:
    try:
        bound_host, bound_port = sock.getsockname()[:2]
    except OSError:
        return False
    if bound_port != port:
        return False
    try:
        return ipaddress.ip_address(bound_host) == ipaddress.ip_address(host)
    except ValueError:
        return bool(bound_host == host)
