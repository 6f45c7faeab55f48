"""Connections of the CHaS HTTP API: the rules for read deadlines and the connection cap
(aiohttp has neither; services/manager/chas/server.py applies them to its connections).

A client that connects and sends nothing, or trickles a header a byte at a time (slowloris),
must not hold a connection for long nor keep others out. Two rules see to it:

- a request's head (request line and headers) must arrive within ``header_timeout`` of the
  moment the server starts waiting for it (a deadline for the whole head, not per read, so a
  byte now and then does not extend it), and a body at ``MIN_BODY_RATE`` after the same grace;
- at ``max_connections`` a new connection closes the oldest idle one (waiting for, or still
  reading, a request's head); connections in the middle of a request (its head read, and so
  its token checked) are never closed for another. Only when every connection is busy is the
  new one refused with 503.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

HEADER_TIMEOUT = 10.0           # seconds for a request's head (chas.header_timeout)
MAX_CONNECTIONS = 128           # connections held at once (chas.max_connections)
MIN_BODY_RATE = 16 * 1024       # bytes per second a body must at least arrive at


def body_deadline(size: int, header_timeout: float) -> float:
    """Seconds a body of ``size`` bytes may take: the head's grace plus the slowest rate."""
    return header_timeout + size / MIN_BODY_RATE


class Conn:
    """One connection (a key: a socket, or the protocol serving it), whether a request is in
    progress, and since when it is idle; ``closer`` ends it (default: shut the socket down)."""

    __slots__ = ("busy", "closer", "since", "sock")

    def __init__(self, sock: Any, closer: Callable[[], None] | None = None) -> None:
        self.sock = sock
        self.closer = closer
        self.busy = False
        self.since = time.monotonic()

    def close(self) -> None:
        if self.closer is not None:
            self.closer()
            return
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class Connections:
    """The live connections, at most ``cap``."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._lock = threading.Lock()
        self._live: dict[Any, Conn] = {}
        self.shed = 0              # idle connections closed to make room (for tests and logs)

    def __len__(self) -> int:
        with self._lock:
            return len(self._live)

    def admit(self, sock: Any, closer: Callable[[], None] | None = None) -> Conn | None:
        """Register a new connection; at the cap the oldest idle one is closed to make room.
        None when every connection is busy with a request: the new one is to be refused."""
        victim = None
        with self._lock:
            if len(self._live) >= self.cap:
                idle = [(c.since, key) for key, c in self._live.items() if not c.busy]
                if not idle:
                    return None
                victim = self._live.pop(min(idle, key=lambda pair: pair[0])[1])
                self.shed += 1
            conn = self._live[sock] = Conn(sock, closer)
        if victim is not None:
            victim.close()
        return conn

    def get(self, sock: Any) -> Conn:
        """The connection of ``sock`` (a detached one if it was closed for another already)."""
        with self._lock:
            return self._live.get(sock) or Conn(sock)

    def leave(self, sock: Any) -> None:
        with self._lock:
            self._live.pop(sock, None)
