"""TCP forwarding: raw non-blocking sockets for setting pairs up and for bulk flows, uvloop's
transports for long-lived chatty ones.

One :class:`ClientConnection` per accepted client. It connects to an endpoint with a plain
non-blocking ``connect`` (no task, coroutine or future per connection; to an endpoint on this
node the handshake is usually done inside the call) and then moves bytes in two
:class:`_Half` objects, one per direction, each called from the route's epoll set
(:class:`~services.proxy.poller.Poller`) when its source socket is readable. uvloop's own
transports cost a task for ``create_connection``, two weak-reference registrations and four
extra system calls per connection, which made a new connection three times HAProxy's CPU.

A half starts by copying (``recv_into`` one shared buffer, ``send`` from it). Once a read
brings :data:`SPLICE_AT` bytes or more the flow is bulk, and the half switches to ``splice``
through a pooled pipe: the kernel moves the pages from one socket to the other and the bytes
never enter the process. A pair that has forwarded :data:`HANDOVER_AFTER` small reads instead
is long-lived and chatty; it is handed to uvloop's transports (:class:`_Side`), which read and
write in C: per small read that costs a third less CPU than two socket calls from Python.

Back-pressure: when the destination does not take everything, the rest stays in the half (at
most one read in user space, or the pipe's contents), the source stops being read and the
destination is watched for writability; reading resumes once the rest is out. On transports,
a full write buffer pauses reading on the other side. A slow reader thus stalls its writer
instead of growing memory.

EOF from one side is forwarded as ``shutdown(SHUT_WR)`` once everything before it is out, and
the pair closes when both directions are done, or at once when either side fails.
"""

from __future__ import annotations

import _socket  # the C socket type: socket.socket's Python layer costs ~1 us per call here
import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import select
import socket
import struct
import termios
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, cast

from services.proxy.poller import Poller
from services.proxy.routes import Endpoint, family_of
from services.proxy.stats import Stats

if TYPE_CHECKING:
    from services.proxy.tcp_listener import TcpListener

log = logging.getLogger(__name__)

BUF_SIZE = 256 * 1024       # one read; the buffer is shared by the listener's connections
PIPE_SIZE = 256 * 1024      # a splicing half moves at most this much per round
SPLICE_AT = 64 * 1024       # a read this large marks a bulk flow
HIGH_WATER = 512 * 1024     # what one pair may hold in all (two halves): reported by buffered()
CONNECT_TIMEOUT = 3.0
BACKLOG = 1024
POOLED_PIPES = 64           # empty pipes kept for the next bulk flow
HANDOVER_AFTER = 32         # small reads after which a pair moves to uvloop's transports

_LINGER_RESET = struct.pack("ii", 1, 0)
_SPLICE = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
_RESET_ERRORS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT})


def _unread(fd: int) -> int:
    """Bytes waiting in a pipe; -1 if the kernel cannot say."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return -1


class PipePool:
    """Empty pipes for splicing halves, so a bulk flow does not pay pipe2 and fcntl each time."""

    def __init__(self, keep: int = POOLED_PIPES) -> None:
        self._free: list[tuple[int, int]] = []
        self._keep = keep
        self.usable = True     # False where splice does not apply (SCTP)

    def take(self) -> tuple[int, int] | None:
        if not self.usable:
            return None
        if self._free:
            return self._free.pop()
        try:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        with contextlib.suppress(OSError):   # the default 64 KiB still works, only slower
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        return r, w

    def give(self, pipe: tuple[int, int]) -> None:
        """Keep ``pipe`` for another flow if it is empty: stale bytes would corrupt that flow,
        so the kernel is asked rather than the caller's count trusted."""
        if len(self._free) < self._keep and _unread(pipe[0]) == 0:
            self._free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def close(self) -> None:
        for r, w in self._free:
            os.close(r)
            os.close(w)
        self._free.clear()


class _Half:
    """One direction of a pair: bytes read from ``src`` are written to ``dst``."""

    __slots__ = ("_pair", "_upstream_bound", "dst", "dst_fd", "eof", "inpipe", "other", "pending",
                 "pipe", "shut", "src", "src_fd", "stalled")

    def __init__(self, pair: ClientConnection, src: _socket.socket, dst: _socket.socket,
                 upstream_bound: bool) -> None:
        self._pair = pair
        self._upstream_bound = upstream_bound   # client -> upstream: counted as bytes_in
        self.src, self.dst = src, dst
        self.src_fd, self.dst_fd = src.fileno(), dst.fileno()
        self.other: _Half = self                # the opposite direction, set by the pair
        self.pending = b""          # copy mode: what dst did not take yet
        self.pipe: tuple[int, int] | None = None
        self.inpipe = 0             # splice mode: bytes in the pipe not yet written to dst
        self.eof = False            # src has ended
        self.shut = False           # dst's write side is shut: this half is done
        self.stalled = False        # src not read until dst has taken what is held

    @property
    def reading(self) -> bool:
        return not (self.eof or self.stalled)

    def event(self, events: int) -> None:
        """The poller's handler for ``src``: readable is for this half, writable for the other
        one (``src`` is its destination). The plain read is inline: it is most events."""
        if events != _IN and not self._unusual(events):
            return
        if self.stalled or self.eof:
            # Reported before this half stopped reading, or an EOF seen again: the interest
            # is dropped lazily, as most pairs close before the next poll.
            self._pair.watch()
            return
        pair = self._pair
        if self.pipe is not None:
            self._splice()
            return
        try:
            n = self.src.recv_into(pair.buf)
        except BlockingIOError:
            return
        except OSError as exc:
            pair.fail(exc)
            return
        if n == 0:
            self._ended()
            return
        pair.active = True
        if self._upstream_bound:
            pair.stats.bytes_in += n
        else:
            pair.stats.bytes_out += n
        view = pair.view
        try:
            sent = self.dst.send(view[:n])
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            pair.fail(exc)
            return
        if sent < n:
            self.pending = bytes(view[sent:n])
            self.stalled = True
            pair.watch()
        elif n >= SPLICE_AT:
            self.pipe = pair.pipes.take()
        else:
            pair.small += 1
            if pair.small == HANDOVER_AFTER:
                pair.to_transports()

    def _unusual(self, events: int) -> bool:
        """Writability, errors and hang-ups; True if a read should follow."""
        pair, other = self._pair, self.other
        wrote = False
        if events & (_OUT | _BROKEN) and other.stalled:
            other.writable()
            wrote = True
            if pair.closed:
                return False
        if events & (_IN | _BROKEN) and not (self.eof or self.stalled):
            return True
        if not wrote and events & _BROKEN:
            pair.broken(self, events)
        return False

    def _splice(self) -> None:
        pair = self._pair
        pipe = self.pipe
        assert pipe is not None
        try:
            n = os.splice(self.src_fd, pipe[1], PIPE_SIZE, flags=_SPLICE)
        except BlockingIOError:
            return
        except OSError as exc:
            pair.fail(exc)
            return
        if n == 0:
            self._ended()
            return
        pair.active = True
        if self._upstream_bound:
            pair.stats.bytes_in += n
        else:
            pair.stats.bytes_out += n
        self.inpipe = n    # counted first: a failing write below must not hide them
        try:
            self.inpipe = n - os.splice(pipe[0], self.dst_fd, n, flags=_SPLICE)
        except BlockingIOError:
            pass
        except OSError as exc:
            pair.fail(exc)
            return
        if self.inpipe:
            self.stalled = True
            pair.watch()

    def writable(self) -> None:
        try:
            if self.inpipe:
                assert self.pipe is not None
                self.inpipe -= os.splice(self.pipe[0], self.dst_fd, self.inpipe, flags=_SPLICE)
            elif self.pending:
                sent = self.dst.send(self.pending)
                self.pending = self.pending[sent:]
        except BlockingIOError:
            return
        except OSError as exc:
            self._pair.fail(exc)
            return
        if self.inpipe or self.pending:
            return
        self.stalled = False
        self._pair.watch()

    def _ended(self) -> None:
        self.eof = True
        pair = self._pair
        if self.other.shut:
            self.shut = True      # the last direction: closing sends this FIN too
            pair.finish()
            return
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            pair.fail(exc)
            return
        self.shut = True

    def held(self) -> int:
        return len(self.pending) + self.inpipe

    def release(self) -> None:
        """Give the pipe back (the pair is closing)."""
        if self.pipe is not None:
            self._pair.pipes.give(self.pipe)
            self.pipe = None


_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
_BROKEN = select.EPOLLERR | select.EPOLLHUP


def _drive(coro: Coroutine[Any, Any, Any]) -> None:
    """Run a coroutine that awaits once (uvloop's connect_accepted_socket) without a task."""
    try:
        waiter = coro.send(None)
    except StopIteration:
        return

    def resume(_: object) -> None:
        with contextlib.suppress(StopIteration, OSError):
            coro.send(None)
    waiter.add_done_callback(resume)


class _Side(asyncio.Protocol):
    """One socket of a pair on a uvloop transport: what it reads goes to its peer's transport.
    Back-pressure is the transports' own: a peer's full write buffer pauses reading here."""

    __slots__ = ("_pair", "_upstream_bound", "eof", "lost", "peer", "transport")

    def __init__(self, pair: ClientConnection, client: bool) -> None:
        self._pair = pair
        self._upstream_bound = client    # what the client sends goes upstream: bytes_in
        self.peer: _Side = self
        self.transport: asyncio.Transport | None = None
        self.eof = False                 # this socket has ended its sending
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: narrowed by a cast.
        stream = cast(asyncio.Transport, transport)
        stream.set_write_buffer_limits(HIGH_WATER)
        self.transport = stream

    def data_received(self, data: bytes) -> None:
        # Both connection_made calls are queued in the same turn, before either side reads.
        peer = self.peer.transport
        assert peer is not None
        peer.write(data)
        pair = self._pair
        pair.active = True
        if self._upstream_bound:
            pair.stats.bytes_in += len(data)
        else:
            pair.stats.bytes_out += len(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer.transport
        if peer is not None and not peer.is_closing():
            peer.write_eof()      # after what is still buffered for it
        # Both directions ended: let this transport close (which closes the peer, flushed).
        # Otherwise keep it open: the other direction may still be sending.
        return not self.peer.eof

    def pause_writing(self) -> None:
        peer = self.peer.transport
        if peer is not None:
            peer.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer.transport
        if peer is not None:
            peer.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._pair.side_lost(self, exc)


class ClientConnection:
    """An accepted client and, once connected, its upstream. Created by the listener for each
    accepted socket; lives until both directions are done, either side fails, the idle sweep
    finds it quiet, or the proxy aborts it."""

    __slots__ = ("_masks", "_order", "_started", "active", "back", "buf", "client", "client_fd",
                 "closed", "deadline", "endpoint", "fwd", "idle_sweeps", "listener", "pipes",
                 "poller", "sides", "small", "stats", "upstream", "upstream_fd", "view")

    def __init__(self, listener: TcpListener, client: _socket.socket, poller: Poller) -> None:
        self.listener = listener
        self.stats: Stats = listener.stats
        self.buf = listener.buf
        self.view = listener.view
        self.pipes = listener.pipes
        self.poller = poller
        self.client = client
        self.client_fd = client.fileno()
        self.upstream: _socket.socket | None = None
        self.upstream_fd = -1
        self.endpoint: Endpoint | None = None
        self.fwd: _Half | None = None     # client -> upstream
        self.back: _Half | None = None    # upstream -> client
        self.active = False               # bytes moved since the idle sweep last looked
        self.idle_sweeps = 0
        self.closed = False
        self._masks = (0, 0)              # what the poller watches: (client, upstream)
        self._order: tuple[Endpoint, ...] = ()
        self.deadline = 0.0               # of the connect in progress (loop time), 0: none
        self._started = 0.0
        self.small = 0                    # reads under SPLICE_AT forwarded whole
        self.sides: tuple[_Side, _Side] | None = None   # (client, upstream) once on transports

    # --- connecting ------------------------------------------------------------------------

    def connect(self, order: tuple[Endpoint, ...]) -> None:
        """Try the endpoints of ``order`` in turn; reset the client when none answers."""
        self._order = order
        self._next()

    def _next(self) -> None:
        for i, ep in enumerate(self._order):
            listener = self.listener
            sock = _socket.socket(family_of(ep.address), socket.SOCK_STREAM | socket.SOCK_NONBLOCK,
                                  listener.ipproto)
            sock.setsockopt(*listener.nodelay, 1)
            self._started = time.perf_counter()
            err = sock.connect_ex((ep.address, ep.port))
            if err not in (0, errno.EINPROGRESS):
                sock.close()
                self._failed(ep, errno.errorcode.get(err, str(err)))
                continue
            self.upstream, self.endpoint = sock, ep
            self.upstream_fd = fd = sock.fileno()
            # To an endpoint on this node the handshake has usually completed inside connect()
            # (the kernel runs the peer's side on the way out): look before waiting a round.
            try:
                sock.getpeername()
            except OSError:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    sock.close()
                    self.upstream, self.endpoint, self.upstream_fd = None, None, -1
                    self._failed(ep, errno.errorcode.get(err, str(err)))
                    continue
            else:
                self._established(False)
                return
            self._order = self._order[i + 1:]
            self.poller.add(fd, _OUT, self._on_connect)
            self.deadline = self.listener.connecting(self)
            return
        self.reset()

    def _on_connect(self, events: int) -> None:
        sock, ep = self.upstream, self.endpoint
        assert sock is not None and ep is not None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not err and not events & _OUT:
            return   # not done yet
        self.deadline = 0.0
        if err:
            self._drop_upstream()
            self._failed(ep, errno.errorcode.get(err, str(err)))
            self._next()
            return
        self._established(True)

    def _established(self, registered: bool) -> None:
        sock, ep = self.upstream, self.endpoint
        assert sock is not None and ep is not None
        self._order = ()
        self.stats.observe_connect(time.perf_counter() - self._started)
        self.listener.picker.connected(ep)
        client = self.client
        self.fwd = fwd = _Half(self, client, sock, True)
        self.back = back = _Half(self, sock, client, False)
        fwd.other, back.other = back, fwd
        poller = self.poller
        if registered:
            poller.modify(self.upstream_fd, _IN)
            poller.handlers[self.upstream_fd] = back.event
        else:
            poller.add(self.upstream_fd, _IN, back.event)
        poller.add(self.client_fd, _IN, fwd.event)
        self._masks = (_IN, _IN)

    def timed_out(self) -> None:
        """The connect in progress took longer than the route's connect timeout."""
        ep = self.endpoint
        self.deadline = 0.0
        if self.closed or ep is None or self.fwd is not None:
            return
        self._drop_upstream()
        self._failed(ep, "timed out")
        self._next()

    def _drop_upstream(self) -> None:
        sock = self.upstream
        assert sock is not None
        self.poller.forget(self.upstream_fd)
        sock.close()
        self.upstream, self.endpoint, self.upstream_fd = None, None, -1

    def _failed(self, ep: Endpoint, why: str) -> None:
        stats = self.stats
        stats.connect_errors += 1
        stats.ejections += 1
        self.listener.picker.failed(ep, self.listener.loop.time())
        log.debug("upstream connect failed", extra={"endpoint": str(ep), "error": why})

    # --- moving bytes ----------------------------------------------------------------------

    def broken(self, half: _Half, events: int) -> None:
        """An error or hang-up on ``half``'s source while nothing waits on it; it would be
        reported again at every poll. A hang-up with the reader stalled is normal at the end of
        a flow to a slow reader (unread bytes remain): stop watching that socket until the
        reader resumes. Anything else fails the pair."""
        if self.closed:
            return
        if not events & select.EPOLLERR and half.stalled and not half.eof:
            self.poller.park(half.src_fd)
            client_mask, upstream_mask = self._masks
            self._masks = (-1, upstream_mask) if half is self.fwd else (client_mask, -1)
            return
        err = half.src.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or errno.ECONNRESET
        self.fail(OSError(err, os.strerror(err)))

    def watch(self) -> None:
        """Bring what the poller watches in line with what each half waits for."""
        fwd, back = self.fwd, self.back
        if self.closed or fwd is None or back is None:
            return
        # A socket is read by one half and written by the other.
        client_mask = (_IN if fwd.reading else 0) | (_OUT if back.stalled else 0)
        upstream_mask = (_IN if back.reading else 0) | (_OUT if fwd.stalled else 0)
        old_client, old_upstream = self._masks
        self._masks = (self._watch(self.client_fd, old_client, client_mask),
                       self._watch(self.upstream_fd, old_upstream, upstream_mask))

    def _watch(self, fd: int, old: int, mask: int) -> int:
        """Set ``fd``'s interest to ``mask`` if it changed; returns what is watched now (-1:
        parked, and stays so until something waits on it)."""
        if old == -1:
            if not mask:
                return -1
            self.poller.unpark(fd, mask)
        elif mask != old:
            self.poller.modify(fd, mask)
        return mask

    # --- ending ----------------------------------------------------------------------------

    def finish(self) -> None:
        """Both directions have ended: close both sockets (which flushes and sends FIN)."""
        self._close()

    def fail(self, exc: OSError) -> None:
        if exc.errno not in _RESET_ERRORS:
            log.debug("connection failed", extra={"endpoint": str(self.endpoint), "error": repr(exc)})
        self._close()

    def reset(self, refused: bool = True) -> None:
        """Close the client with a TCP reset, so it fails fast instead of waiting for data."""
        if refused:
            self.stats.connections_refused += 1
        with contextlib.suppress(OSError):
            self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self._close()

    def abort(self) -> None:
        """Drop both sides at once, discarding what is held."""
        if self.sides is not None:
            for side in self.sides:
                if side.transport is not None:
                    side.transport.abort()
            return
        self._close()

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.deadline = 0.0
        poller = self.poller
        connected = self.fwd is not None
        for half in (self.fwd, self.back):
            if half is not None:
                half.release()
                del half.other   # no reference cycle left: freed at once, not by the GC
        self.fwd = self.back = None
        poller.forget(self.client_fd)
        self.client.close()
        if self.upstream is not None:
            poller.forget(self.upstream_fd)
            self.upstream.close()
            if connected and self.endpoint is not None:
                self.listener.picker.released(self.endpoint)
        self.listener.dropped(self)

    def buffered(self) -> int:
        """Bytes this pair holds (user space and pipes) on their way to either side."""
        if self.sides is not None:
            return sum(side.transport.get_write_buffer_size() for side in self.sides
                       if side.transport is not None)
        return sum(h.held() for h in (self.fwd, self.back) if h is not None)

    # --- long-lived pairs: uvloop's transports -----------------------------------------------

    def to_transports(self) -> None:
        """Hand both sockets to uvloop's transports, which read, call back and write in C:
        per small read that is a third less CPU than the Python path here, whose advantage is
        only in setting a connection up (and splicing bulk flows, which never come here)."""
        fwd, back, upstream = self.fwd, self.back, self.upstream
        assert fwd is not None and back is not None and upstream is not None
        if fwd.stalled or back.stalled or fwd.eof or back.eof or fwd.pipe or back.pipe \
                or self.listener.sctp:
            return
        poller = self.poller
        poller.remove(self.client_fd)
        poller.remove(self.upstream_fd)
        del fwd.other, back.other
        self.fwd = self.back = None
        client_side, upstream_side = _Side(self, True), _Side(self, False)
        client_side.peer, upstream_side.peer = upstream_side, client_side
        self.sides = (client_side, upstream_side)
        loop = self.listener.loop
        try:
            for sock, side in ((self.client, client_side), (upstream, upstream_side)):
                # uvloop takes any socket object (it needs fileno, family and type) and closes
                # it with the transport.
                _drive(loop.connect_accepted_socket(lambda s=side: s, cast(socket.socket, sock)))  # type: ignore[misc]
        except Exception:   # not expected; the pair cannot go on half moved
            log.exception("handing a connection to the loop's transports failed")
            for side in self.sides:
                if side.transport is not None:
                    side.transport.abort()
            for sock in (self.client, upstream):
                with contextlib.suppress(OSError):
                    sock.close()
            if not self.closed:
                self.closed = True
                self.sides = None
                if self.endpoint is not None:
                    self.listener.picker.released(self.endpoint)
                self.listener.dropped(self)

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        peer = side.peer
        if peer.transport is not None and not peer.lost:
            if exc is None:
                peer.transport.close()      # flushes what is still buffered for it
            else:
                peer.transport.abort()
        if side.lost and peer.lost and not self.closed:
            self.closed = True
            if self.endpoint is not None:
                self.listener.picker.released(self.endpoint)
            self.sides = None
            side.peer = peer.peer = None  # type: ignore[assignment]
            self.listener.dropped(self)
