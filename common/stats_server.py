"""A service's stats endpoint (the proxy's ``proxy.sock``, the manager's ``manager.sock``):
answers ``stats`` from a thread of its own, so a scrape never runs on a data path.

Ops (requests and replies in the :mod:`common.ipc` envelope)::

    stats {}   -> the service's snapshot (the proxy: its counters and connect_latency histogram;
                  the manager: services.manager.chas.stats.ChasStats.snapshot())

The counters are plain ints written by the loop thread; reading them here may see a value one
update old, which is fine for a scrape.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import zmq

from common import ipc
from common.errors import InvalidArgument
from common.zmqutil import Waker, ipc_path, make_run_dir, prepare_ipc_bind, route_one

log = logging.getLogger(__name__)



class StatsServer:
    """Serves ``snapshot()`` as op ``stats`` on a ROUTER socket at ``endpoint``."""

    def __init__(self, endpoint: str, snapshot: Callable[[], dict[str, Any]],
                 context: zmq.Context[Any] | None = None, name: str = "stats") -> None:
        self.endpoint = endpoint
        self._snapshot = snapshot
        self._ctx = context or zmq.Context.instance()
        self._stop = threading.Event()
        self._waker: Waker | None = None
        self._sock: zmq.Socket[Any] | None = None
        self._inode: tuple[int, int] | None = None    # of the ipc file this server bound
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)

    def handle(self, req: ipc.Request) -> Any:
        if req.op != "stats":
            raise InvalidArgument(f"unknown op {req.op!r} (known: stats)", "op")
        for key in req.args:
            raise InvalidArgument("stats takes no arguments", f"args.{key}")
        return self._snapshot()

    def start(self) -> None:
        """Bind (here, so a live twin or an unwritable run dir raises to the caller) and serve."""
        path = ipc_path(self.endpoint)
        if path:
            make_run_dir(os.path.dirname(path))
        prepare_ipc_bind(self.endpoint, self._ctx)
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(self.endpoint)
            if path:
                os.chmod(path, 0o600)
                st = os.stat(path)
                self._inode = (st.st_dev, st.st_ino)
        except BaseException:
            sock.close(linger=0)
            raise
        self._sock = sock
        self._waker = Waker(sock)
        self._thread.start()

    def _serve(self) -> None:
        sock = self._sock
        assert sock is not None
        try:
            while not self._stop.is_set():
                if self._waker is not None and self._waker.wait():
                    route_one(sock, self.handle)
        except zmq.ZMQError as exc:  # the context went away under us: nothing left to serve
            log.warning("stats endpoint stopped", extra={"error": str(exc)})
        finally:
            sock.close(linger=0)

    def stop(self) -> None:
        self._stop.set()
        if self._waker is not None:
            self._waker.wake()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        path = ipc_path(self.endpoint)
        if self._sock is not None and path:
            # Only our own file: a successor may have bound the path already (the proxy's
            # hand-off, when the old worker was too slow to let go).
            with contextlib.suppress(OSError):
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(path)
        self._sock = None
        if self._waker is not None and not self._thread.is_alive():
            self._waker.close()
