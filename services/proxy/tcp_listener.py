"""The listening side of a TCP route: its socket and the state its connections share (the
balancer, the limits, the count of open clients), allocated once per route, not per connection."""

from __future__ import annotations

import asyncio
import socket

from services.proxy.balance import Balance, Balancer
from services.proxy.routes import Endpoint
from services.proxy.stats import Stats
from services.proxy.tcp import BACKLOG, CONNECT_TIMEOUT, ClientConnection


class TcpListener:
    """A listening socket for one route and the state its connections share. Closing it stops
    new connections only: established pairs live on until their own ends close them."""

    def __init__(self, port: int, endpoints: tuple[Endpoint, ...], *, host: str, stats: Stats,
                 conns: set[ClientConnection], connect_timeout: float = CONNECT_TIMEOUT,
                 balance: Balance = Balance.ROUND_ROBIN, max_connections: int = 0,
                 idle_timeout: float = 0.0) -> None:
        self.port = port
        self.host = host
        self.picker = Balancer(endpoints, balance)
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections    # 0: no limit
        self.idle_timeout = idle_timeout          # 0: never
        self.clients = 0
        self._stats = stats
        self._conns = conns
        self._server: asyncio.AbstractServer | None = None

    async def open(self, sock: socket.socket | None = None) -> None:
        """Bind and listen, or serve ``sock`` (a listening socket handed over by a predecessor);
        raises OSError (e.g. EADDRINUSE) if the port cannot be had."""
        loop = asyncio.get_running_loop()
        factory = lambda: ClientConnection(self, self._stats, self._conns)  # noqa: E731
        if sock is not None:
            self._server = await loop.create_server(factory, sock=sock, backlog=BACKLOG)
        else:
            self._server = await loop.create_server(factory, self.host, self.port,
                                                    reuse_address=True, backlog=BACKLOG)

    def fileno(self) -> int | None:
        """The listening socket's descriptor (to hand over to a successor), None when closed."""
        if self._server is None or not self._server.sockets:
            return None
        return int(self._server.sockets[0].fileno())

    def set_endpoints(self, endpoints: tuple[Endpoint, ...], balance: Balance | None = None) -> None:
        self.picker.set(endpoints, balance)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
