"""ZeroMQ helpers: a request client with timeouts and retries, a ROUTER serving loop, and
binding ipc:// endpoints safely (stale socket files from a crash, a live twin refused)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from common import ipc
from common.errors import BadFrame, Internal, RikletError, Timeout, Unavailable

log = logging.getLogger(__name__)

Handler = Callable[[ipc.Request], Any]


def ipc_path(endpoint: str) -> str | None:
    return endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else None


class RequestClient:
    """Sends one request at a time and waits for its reply (the "lazy pirate" pattern).

    A timeout closes the socket and opens a fresh one before retrying, so a restarted server
    is picked up and stale replies are never mistaken for new ones. Thread-safe (one lock).
    """

    def __init__(self, endpoint: str, timeout: float = 2.0, retries: int = 3,
                 context: zmq.Context[Any] | None = None) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.retries = retries
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket[Any] | None = None
        self._lock = threading.Lock()

    def _socket(self) -> zmq.Socket[Any]:
        if self._sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.endpoint)
            self._sock = sock
        return self._sock

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def call(self, op: str, timeout: float | None = None, retries: int | None = None,
             **args: Any) -> Any:
        """Send ``op`` with ``args``; return the result or raise the server's error."""
        req = ipc.Request(op=op, args=args)
        frames = ipc.encode_request(req)
        wait = self.timeout if timeout is None else timeout
        attempts = 1 + (self.retries if retries is None else retries)
        with self._lock:
            for _ in range(attempts):
                sock = self._socket()
                sock.send_multipart(frames)
                deadline = time.monotonic() + wait
                while (left := deadline - time.monotonic()) > 0:
                    if not sock.poll(int(left * 1000) + 1, zmq.POLLIN):
                        break
                    try:
                        rep = ipc.decode_reply(sock.recv_multipart())
                    except BadFrame:
                        log.warning("undecodable reply ignored", extra={"endpoint": self.endpoint})
                        continue
                    if rep.id == req.id:
                        return rep.raise_for_error()
                self._reset()
        raise Timeout(f"no reply from {self.endpoint} to {op!r} after {attempts} attempts")

    def close(self) -> None:
        with self._lock:
            self._reset()


def prepare_ipc_bind(endpoint: str, ctx: zmq.Context[Any] | None = None) -> None:
    """Before binding an ipc:// endpoint: refuse if a live server answers there; remove a
    stale socket file left by a crash. The directory must exist and be private (0700)."""
    path = ipc_path(endpoint)
    if path is None or not os.path.exists(path):
        return
    probe = RequestClient(endpoint, timeout=0.3, retries=0, context=ctx)
    try:
        probe.call("ping")
    except Timeout:
        os.unlink(path)
        log.info("removed stale socket", extra={"path": path})
        return
    except RikletError:
        pass
    finally:
        probe.close()
    raise Unavailable(f"another server is live on {endpoint}", "endpoint")


def make_run_dir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)


def serve_request(handler: Handler, frames: list[bytes]) -> list[bytes]:
    """Turn one incoming request (frames without the routing identity) into reply frames.
    Garbage gets an error reply naming the frame; a handler bug becomes ``internal``."""
    try:
        req = ipc.decode_request(frames)
    except BadFrame as exc:
        return ipc.encode_reply(ipc.error(ipc.request_id_of(frames), exc))
    try:
        if req.op == "ping":
            return ipc.encode_reply(ipc.ok(req.id, {"pong": True, "pid": os.getpid()}))
        return ipc.encode_reply(ipc.ok(req.id, handler(req)))
    except RikletError as exc:
        return ipc.encode_reply(ipc.error(req.id, exc))
    except Exception as exc:  # a bug in a handler must not take the service down
        log.exception("handler failed", extra={"op": req.op})
        return ipc.encode_reply(ipc.error(req.id, Internal(f"{type(exc).__name__}: {exc}")))


def route_one(sock: zmq.Socket[Any], handler: Handler) -> None:
    """Receive one message on a ROUTER socket and answer it."""
    msg = sock.recv_multipart()
    if len(msg) < 2:
        return  # nothing but an identity: not even worth an answer
    ident, frames = msg[0], msg[1:]
    if frames and frames[0] == b"":  # REQ peers put an empty delimiter first
        reply = serve_request(handler, frames[1:])
        sock.send_multipart([ident, b"", *reply])
    else:
        sock.send_multipart([ident, *serve_request(handler, frames)])


IDLE_POLL_MS = 1000  # how long an idle loop sleeps between looks at its stop flag


class Waker:
    """A socket's poll that its owner's ``stop()`` can cut short: a pipe polled beside the
    socket. Idle loops can then sleep a whole second (each wakeup of an idle agent's threads
    costs CPU, times every thread of every service) and still stop at once."""

    def __init__(self, sock: zmq.Socket[Any]) -> None:
        self._sock = sock
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._read, zmq.POLLIN)
        self._lock = threading.Lock()   # no wake() into descriptors close() gave back
        self._closed = False

    def wait(self, timeout_ms: int = IDLE_POLL_MS) -> bool:
        """Whether the socket is readable, after at most ``timeout_ms`` or a wake()."""
        ready = dict(self._poller.poll(timeout_ms))
        if self._read in ready:
            try:
                while os.read(self._read, 64):
                    pass
            except BlockingIOError:
                pass
        return self._sock in ready

    def wake(self) -> None:
        with self._lock, contextlib.suppress(OSError):  # a full pipe wakes the poll already
            if not self._closed:
                os.write(self._write, b"w")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in (self._read, self._write):
                with contextlib.suppress(OSError):
                    os.close(fd)
