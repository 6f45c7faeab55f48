"""A level-triggered epoll set of the proxy's own, watched by the event loop as one descriptor."""

from __future__ import annotations

import asyncio
import select
from collections.abc import Callable


class Poller:
    """A level-triggered epoll set for one route's sockets, watched by the event loop as a
    single descriptor: the loop calls :meth:`dispatch` when any of them is ready, and each
    ready socket's handler is called with its events.

    Registering sockets with the loop itself (``add_reader``) cost eleven system calls per
    descriptor (libuv checks, re-registers and removes each one several times); here a socket
    costs one ``epoll_ctl`` to add, one per change of interest, and none to remove (closing it
    takes it out of the set).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._ep = select.epoll()
        self._loop = loop
        self.handlers: dict[int, Callable[[int], None]] = {}
        self._gone: set[int] = set()     # closed during this dispatch: their events are stale
        self.fileno = self._ep.fileno()
        loop.add_reader(self.fileno, self.dispatch)

    def add(self, fd: int, mask: int, handler: Callable[[int], None]) -> None:
        self._ep.register(fd, mask)
        self.handlers[fd] = handler

    def modify(self, fd: int, mask: int) -> None:
        self._ep.modify(fd, mask)

    def park(self, fd: int) -> None:
        """Stop watching ``fd`` for now (a hang-up is reported whatever the mask)."""
        self._ep.unregister(fd)

    def unpark(self, fd: int, mask: int) -> None:
        self._ep.register(fd, mask)

    def remove(self, fd: int) -> None:
        """Stop watching ``fd``, which stays open (it moves to another owner)."""
        if self.handlers.pop(fd, None) is not None:
            self._ep.unregister(fd)
            self._gone.add(fd)

    def forget(self, fd: int) -> None:
        """``fd`` is about to be closed (which removes it from the set)."""
        if self.handlers.pop(fd, None) is not None:
            self._gone.add(fd)

    def dispatch(self) -> None:
        handlers, gone = self.handlers, self._gone
        gone.clear()
        for fd, events in self._ep.poll(0, 1024):
            # A descriptor closed earlier in this batch may already be reused by a new socket;
            # level-triggered readiness is reported again, so skipping is safe.
            if fd in gone:
                continue
            handler = handlers.get(fd)
            if handler is not None:
                handler(events)

    def close(self) -> None:
        if not self._ep.closed:
            self._loop.remove_reader(self.fileno)
            self._ep.close()
