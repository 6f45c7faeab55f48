"""The shims' events: ``<run_dir>/shim-events.sock``, a unix datagram socket the manager binds.

After every write of its status.json a shim sends one datagram whose payload is its pod's name
(utf-8). One thread reads them and pokes the reconciler, which coalesces a burst for one pod
into one sync. A datagram says only "look at this pod": the status file stays the truth, so a
lost datagram costs latency (the pidfd watch or the slow resync catch up), never correctness.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

FILE_NAME = "shim-events.sock"
_MAX_DATAGRAM = 256           # a pod name is at most 63 bytes: anything longer is not a shim's
_RCVBUF = 4 * 1024 * 1024     # room for a burst (every pod stopping at once) while we catch up
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def path_in(run_dir: str) -> str:
    return os.path.join(run_dir, FILE_NAME)


class ShimEvents:
    """Binds the socket (replacing one a previous manager left) and calls ``on_event(pod)``."""

    def __init__(self, path: str, on_event: Callable[[str], None]) -> None:
        self.path = path
        self.on_event = on_event
        self.received = 0     # datagrams read, for tests and diagnostics
        self._sock: socket.socket | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="shim-events", daemon=True)

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with contextlib.suppress(OSError):   # capped by net.core.rmem_max: best effort
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
        old = os.umask(0o077)   # only the agent's user (the shims') may send
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        self._sock = sock
        self._thread.start()

    def stop(self) -> None:
        if self._sock is None:
            return
        self._stopping.set()
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"", self.path)   # wakes the reader
        self._thread.join(timeout=5)
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                data = self._sock.recv(_MAX_DATAGRAM)
            except OSError as exc:
                log.error("shim events socket failed", extra={"error": str(exc)})
                return
            self.received += 1
            try:
                name = data.decode()
            except UnicodeDecodeError:
                continue
            if _NAME.fullmatch(name):
                self.on_event(name)
