"""Pod holders watched through pidfds: a holder (shim) killed with SIGKILL writes no status and
sends no event, but its pidfd becomes readable. One epoll thread watches every live holder and
pokes the pod when its holder exits; an idle agent's watch thread sleeps in epoll_wait.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import select
import threading
from collections.abc import Callable

from common.procstat import pid_alive

log = logging.getLogger(__name__)


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one (a pidfd per pod: 5000 pods need 5000+
    descriptors, beyond the usual 1024); the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class PidWatch:
    """``watch(name, pid, start)`` while a pod's holder lives; ``on_exit(name)`` once it ends
    (or at once, when it has already ended). A name has one watched holder at a time."""

    def __init__(self, on_exit: Callable[[str], None]) -> None:
        self.on_exit = on_exit
        self._lock = threading.Lock()
        self._epoll = select.epoll()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake, select.EPOLLIN)
        self._by_name: dict[str, tuple[int, int, int]] = {}   # name -> (pid, start, pidfd)
        self._by_fd: dict[int, str] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="pidwatch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._closed = True
        os.eventfd_write(self._wake, 1)
        self._thread.join(timeout=5)
        with self._lock:
            for name in list(self._by_name):
                self._drop(name)
        self._epoll.close()
        os.close(self._wake)

    def watched(self) -> int:
        with self._lock:
            return len(self._by_name)

    def watching(self, name: str) -> bool:
        with self._lock:
            return name in self._by_name

    def watch(self, name: str, pid: int, start: int) -> None:
        with self._lock:
            held = self._by_name.get(name)
            if self._closed or (held is not None and held[:2] == (pid, start)):
                return
            if held is not None:
                self._drop(name)
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.on_exit(name)
            return
        except OSError as exc:  # out of descriptors: the slow resync still sees the exit
            log.warning("cannot watch a pod's holder", extra={"pod": name, "error": str(exc)})
            return
        # checked after pidfd_open: the descriptor is known to name the holder, not a reuse
        if not pid_alive(pid, start):
            os.close(fd)
            self.on_exit(name)
            return
        with self._lock:
            if self._closed or name in self._by_name:
                os.close(fd)   # stopped, or another sync of the pod won the race: theirs stays
                return
            self._by_name[name] = (pid, start, fd)
            self._by_fd[fd] = name
            self._epoll.register(fd, select.EPOLLIN)

    def forget(self, name: str) -> None:
        with self._lock:
            if name in self._by_name:
                self._drop(name)

    def _drop(self, name: str) -> None:
        _pid, _start, fd = self._by_name.pop(name)
        del self._by_fd[fd]
        with contextlib.suppress(OSError):
            self._epoll.unregister(fd)
        os.close(fd)

    def _loop(self) -> None:
        while True:
            try:
                ready = self._epoll.poll()
            except InterruptedError:
                continue
            exited: list[str] = []
            with self._lock:
                if self._closed:
                    return
                for fd, _mask in ready:
                    name = self._by_fd.get(fd)
                    if name is not None:
                        self._drop(name)
                        exited.append(name)
            for name in exited:
                self.on_exit(name)
