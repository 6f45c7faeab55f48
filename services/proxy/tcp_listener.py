"""The listening side of a TCP route: its socket and the state its connections share (the
balancer, the limits, the read buffer and pipes, the count of open clients), allocated once per
route, not per connection."""

from __future__ import annotations

import _socket  # the C socket type: socket.socket's Python layer costs ~1 us per call here
import asyncio
import errno
import logging
import socket
from collections import deque

from services.proxy.balance import Balance, Balancer
from services.proxy.poller import Poller
from services.proxy.routes import Endpoint, family_of
from services.proxy.stats import Stats
from services.proxy.tcp import BACKLOG, BUF_SIZE, CONNECT_TIMEOUT, ClientConnection, PipePool

log = logging.getLogger(__name__)

ACCEPT_BURST = 64           # clients accepted per wake-up, so one busy port cannot starve the loop
SCTP_NODELAY = 3            # <netinet/sctp.h>; Python does not name it
ACCEPT_PAUSE = 0.1          # out of descriptors or memory: stop accepting this long
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class TcpListener:
    """A listening socket for one route and the state its connections share. Closing it stops
    new connections only: established pairs live on until their own ends close them."""

    def __init__(self, port: int, endpoints: tuple[Endpoint, ...], *, host: str, stats: Stats,
                 conns: set[ClientConnection], connect_timeout: float = CONNECT_TIMEOUT,
                 balance: Balance = Balance.ROUND_ROBIN, max_connections: int = 0,
                 idle_timeout: float = 0.0, protocol: str = "TCP") -> None:
        self.port = port
        self.protocol = protocol
        # SCTP goes through the same path as TCP (one-to-one sockets, one message per read and
        # per write), without splice and uvloop's transports, which are TCP's only.
        self.sctp = protocol == "SCTP"
        self.ipproto = socket.IPPROTO_SCTP if self.sctp else socket.IPPROTO_TCP
        self.nodelay = (self.ipproto, SCTP_NODELAY if self.sctp else socket.TCP_NODELAY)
        self.host = host
        self.picker = Balancer(endpoints, balance)
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections    # 0: no limit
        self.idle_timeout = idle_timeout          # 0: never
        self.stats = stats
        self.buf = bytearray(BUF_SIZE)
        self.view = memoryview(self.buf)
        self.pipes = PipePool()
        self.pipes.usable = not self.sctp
        self.conns: set[ClientConnection] = set()   # this route's
        self._all = conns                           # the server's
        self._sock: socket.socket | None = None
        self._family = int(socket.AF_INET)
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by open()
        self._poller: Poller | None = None
        self._paused: asyncio.TimerHandle | None = None
        self._sweep: asyncio.TimerHandle | None = None
        # Connects in progress by deadline: one timer per route rather than one per connect.
        self._connecting: deque[tuple[float, ClientConnection]] = deque()
        self._expiry: asyncio.TimerHandle | None = None

    @property
    def clients(self) -> int:
        return len(self.conns)

    async def open(self, sock: socket.socket | None = None) -> None:
        """Bind and listen, or serve ``sock`` (a listening socket handed over by a predecessor);
        raises OSError (e.g. EADDRINUSE) if the port cannot be had."""
        if sock is None:
            sock = socket.socket(family_of(self.host), socket.SOCK_STREAM, self.ipproto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.host, self.port))
                sock.listen(BACKLOG)
            except OSError:
                sock.close()
                raise
        sock.setblocking(False)
        self._sock = sock
        self._family = int(sock.family)   # read once: the property converts to an enum each time
        self.loop = loop = asyncio.get_running_loop()
        if self._poller is None:
            self._poller = Poller(loop)
        loop.add_reader(sock.fileno(), self._accept)
        if self.idle_timeout:
            self._schedule_sweep()

    def fileno(self) -> int | None:
        """The listening socket's descriptor (to hand over to a successor), None when closed."""
        return self._sock.fileno() if self._sock is not None else None

    def set_endpoints(self, endpoints: tuple[Endpoint, ...], balance: Balance | None = None) -> None:
        self.picker.set(endpoints, balance)

    def close(self) -> None:
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        if not self.conns:   # else the connect deadlines and the idle sweep go on for those left
            for timer in (self._expiry, self._sweep):
                if timer is not None:
                    timer.cancel()
            self._expiry = self._sweep = None
            self._connecting.clear()
        if self._sock is not None:
            self.loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if not self.conns:
            self._release()

    def _release(self) -> None:
        """Closed and no connection left: give back the pipes and the poller."""
        self.pipes.close()
        if self._poller is not None:
            self._poller.close()
            self._poller = None

    def dropped(self, conn: ClientConnection) -> None:
        """A connection of this route has closed."""
        self.conns.discard(conn)
        self._all.discard(conn)
        self.stats.connections_active -= 1
        if self._sock is None and not self.conns:
            self._release()

    # --- accepting -------------------------------------------------------------------------

    def _accept(self) -> None:
        lsock, loop, stats, poller = self._sock, self.loop, self.stats, self._poller
        if lsock is None or poller is None:
            return
        for _ in range(ACCEPT_BURST):
            try:
                fd, _ = lsock._accept()  # type: ignore[attr-defined]  # no Python socket per client
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    log.warning("cannot accept, pausing", extra={"port": self.port, "error": str(exc)})
                    loop.remove_reader(lsock.fileno())
                    self._paused = loop.call_later(ACCEPT_PAUSE, self._resume)
                    return
                continue   # e.g. ECONNABORTED: that client is gone, the next may not be
            client = _socket.socket(self._family, socket.SOCK_STREAM, self.ipproto, fd)
            client.setblocking(False)
            client.setsockopt(*self.nodelay, 1)
            conn = ClientConnection(self, client, poller)
            self.conns.add(conn)
            self._all.add(conn)
            stats.connections_total += 1
            stats.connections_active += 1
            if self.max_connections and len(self.conns) > self.max_connections:
                stats.connections_over_limit += 1
                conn.reset(refused=False)
                continue
            conn.connect(self.picker.order(loop.time()))

    def connecting(self, conn: ClientConnection) -> float:
        """``conn`` has started a connect: returns its deadline, after which it is told."""
        deadline = self.loop.time() + self.connect_timeout
        self._connecting.append((deadline, conn))
        if self._expiry is None:
            self._expiry = self.loop.call_at(deadline, self._expire)
        return deadline

    def _expire(self) -> None:
        self._expiry = None
        queue, now = self._connecting, self.loop.time()
        while queue and queue[0][0] <= now:
            deadline, conn = queue.popleft()
            if conn.deadline == deadline:    # else it connected, failed or moved on since
                conn.timed_out()
        if queue:
            self._expiry = self.loop.call_at(queue[0][0], self._expire)

    def _resume(self) -> None:
        self._paused = None
        if self._sock is not None:
            self.loop.add_reader(self._sock.fileno(), self._accept)

    # --- idle connections ------------------------------------------------------------------

    def _schedule_sweep(self) -> None:
        # A pair is closed after four sweeps in a row without a byte: idle for between
        # idle_timeout and 1.25 x idle_timeout. One timer per route, not one per connection.
        self._sweep = self.loop.call_later(max(self.idle_timeout / 4, 0.02), self._sweep_idle)

    def _sweep_idle(self) -> None:
        quiet = []
        for conn in self.conns:
            if conn.active:
                conn.active = False
                conn.idle_sweeps = 0
            else:
                conn.idle_sweeps += 1
                if conn.idle_sweeps >= 4:
                    quiet.append(conn)
        for conn in quiet:
            self.stats.idle_closed += 1
            conn.abort()
        if self._sock is not None or self.conns:
            self._schedule_sweep()
        else:
            self._sweep = None
