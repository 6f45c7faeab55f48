"""``logging.file``: one file every service appends to, rotated by size across processes.

The four services share the file (CHaS's ``logging.file`` names one), so rotation is a critical
section between processes: each line is written under an exclusive ``flock`` of ``FILE.lock``,
which covers the check that the file is still the one this process has open (another process
may have rotated it), the size check, the renames (``FILE.1`` the newest rotated copy, up to
``FILE.<max_files>``) and the append itself. A line is never split or lost, and no file grows
past ``max_size`` unless one line alone is longer. One lock and one ``stat`` a line cost a few
microseconds; the services log far less than that matters.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator


class SharedRotatingHandler(logging.Handler):
    def __init__(self, path: str, max_size: int, max_files: int) -> None:
        super().__init__()
        self.path, self.max_size, self.max_files = path, max_size, max_files
        self._lock_fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._fd = -1
        with self._locked():
            self._reopen()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _reopen(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _rotate(self) -> None:
        for n in range(self.max_files - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{self.path}.{n}", f"{self.path}.{n + 1}")
        os.replace(self.path, f"{self.path}.1")
        self._reopen()

    def write(self, data: bytes) -> None:
        with self._locked():
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                self._reopen()                  # removed under us (logrotate, an operator)
                current = os.stat(self.path)
            mine = os.fstat(self._fd)
            if (mine.st_dev, mine.st_ino) != (current.st_dev, current.st_ino):
                self._reopen()                  # another service rotated it
            if current.st_size and current.st_size + len(data) > self.max_size:
                self._rotate()
            os.write(self._fd, data)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write((self.format(record) + "\n").encode("utf-8", "replace"))
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fd = self._lock_fd = -1
        super().close()
