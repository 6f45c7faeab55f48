"""The time index beside a container log file: when each chunk of its bytes was written.

``NAME.log.times`` (``NAME.log.1.times``, … rotated with its log) holds little-endian
fixed-size records of 16 bytes:

- a header: the magic ``RKLTIME1`` (8 bytes) and the inode number of the log file it indexes
  (u64): a reader that opened a log pairs it only with the index naming the same inode, so a
  rotation between two opens never makes it read another file's times;
- then one record per chunk written: the byte offset in the log where the chunk starts (u64)
  and the wall-clock time it was written, in ns since the epoch (i64). A writer appends the
  record BEFORE the chunk's bytes, so a reader that sees bytes finds their record. Records
  come at most one per :data:`MIN_GAP_NS` per file (a faster writer's chunks take the time of
  the one that got the record: at most 1 ms early); the first chunk of a file always gets one.

A byte's time is the time of the last record at or before its offset; bytes before the first
record (a log written by an earlier riklet, or appended to after its index was lost) have no
known time (None here). Both writers (common/rotlog.RotatingWriter and the process shim,
shim.c) write this format byte for byte.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time

MAGIC = b"RKLTIME1"
HEADER = struct.Struct("<8sQ")
RECORD = struct.Struct("<Qq")
SIZE = 16                       # header and records alike
MIN_GAP_NS = 1_000_000          # at most one record per millisecond per file
UNKNOWN_STAMP = b"0001-01-01T00:00:00.000000000Z"   # the time of a line with no known time
_BLOCK = 4096                   # records read at once


def index_path(log_path: str) -> str:
    return log_path + ".times"


class IndexWriter:
    """Appends records for one log file (the writer's side). Errors never reach the caller: a
    log whose index cannot be written keeps its bytes, and its index is emptied (its times
    become unknown rather than wrong)."""

    def __init__(self, log_path: str, log_fd: int) -> None:
        self.path = index_path(log_path)
        self._fd = -1
        self._last: int | None = None
        try:
            ino = os.fstat(log_fd).st_ino
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            header = HEADER.pack(MAGIC, ino)
            if os.pread(self._fd, SIZE, 0) != header:
                os.ftruncate(self._fd, 0)   # another log's index, or none: start afresh
                os.write(self._fd, header)
        except OSError:
            self._fail()

    def note(self, offset: int, now_ns: int) -> None:
        """Called before writing bytes at ``offset`` of the log, at ``now_ns``."""
        if self._fd < 0 or (self._last is not None and now_ns - self._last < MIN_GAP_NS):
            return
        try:
            if os.write(self._fd, RECORD.pack(offset, now_ns)) != SIZE:
                raise OSError("short write")
            self._last = now_ns
        except OSError:
            self._fail()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _fail(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            self.close()


class IndexReader:
    """The times of one open log file. Reads forwards with a small buffer; :meth:`seek` finds a
    start by binary search. Memory: one block of records."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd
        self._next = 0                      # the record number of buf[0]
        self._buf = b""
        self._pos = 0                       # records of buf consumed
        self._cur: tuple[int, int] | None = None
        self._checked = -1                  # the data end up to which the file was last re-read

    @classmethod
    def open(cls, log_path: str, log_fd: int, siblings: tuple[str, ...] = ()) -> IndexReader:
        """The index of the log open as ``log_fd``: the one at its name, else at ``siblings``
        (the names it may have had or got through a rotation meanwhile), checked by inode."""
        ino = os.fstat(log_fd).st_ino
        want = HEADER.pack(MAGIC, ino)
        for name in (log_path, *siblings):
            try:
                fd = os.open(index_path(name), os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if os.pread(fd, SIZE, 0) == want:
                    return cls(fd)
            except OSError:
                pass
            os.close(fd)
        return cls(None)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> IndexReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def records(self) -> int:
        return 0 if self._fd is None else max(0, os.fstat(self._fd).st_size // SIZE - 1)

    def _record(self, k: int) -> tuple[int, int]:
        assert self._fd is not None
        offset, ns = RECORD.unpack(os.pread(self._fd, SIZE, SIZE * (k + 1)))
        return offset, ns

    def seek(self, offset: int) -> None:
        """Position so that :meth:`time_at` may next be asked about ``offset`` or later."""
        self._buf, self._pos, self._cur, self._checked = b"", 0, None, -1
        if self._fd is None:
            return
        lo, hi = 0, self.records()      # the last record at or before offset: binary search
        while lo < hi:
            mid = (lo + hi) // 2
            if self._record(mid)[0] <= offset:
                lo = mid + 1
            else:
                hi = mid
        if lo > 0:
            self._cur = self._record(lo - 1)
        self._next = lo

    def first_at_or_after(self, since_ns: int) -> int | None:
        """The offset of the first record written at or after ``since_ns`` (None: none)."""
        self._buf, self._pos, self._cur, self._next, self._checked = b"", 0, None, 0, -1
        while (rec := self._peek(True)) is not None:
            self._take()
            if rec[1] >= since_ns:
                return rec[0]
        return None

    def time_at(self, offset: int, data_end: int) -> int | None:
        """The time of the byte at ``offset``; ``data_end``: how far the log has been read (a
        record for it was written before it, so the index is re-read only when that grew)."""
        while True:
            rec = self._peek(data_end > self._checked)
            if rec is None or rec[0] > offset:
                break
            self._take()
        if rec is None:
            self._checked = max(self._checked, data_end)
        return None if self._cur is None else self._cur[1]

    def _peek(self, reread: bool) -> tuple[int, int] | None:
        if self._pos * SIZE >= len(self._buf):
            if self._fd is None or not reread:
                return None
            self._next += self._pos
            self._pos = 0
            data = os.pread(self._fd, SIZE * _BLOCK, SIZE * (self._next + 1))
            self._buf = data[:len(data) - len(data) % SIZE]
            if not self._buf:
                return None
        offset, ns = RECORD.unpack_from(self._buf, self._pos * SIZE)
        return offset, ns

    def _take(self) -> None:
        offset, ns = RECORD.unpack_from(self._buf, self._pos * SIZE)
        self._cur = (offset, ns)
        self._pos += 1


def stamp(ns: int | None) -> bytes:
    """RFC 3339 in UTC with nanoseconds, as ``docker logs -t`` prints (unknown: year 1)."""
    if ns is None:
        return UNKNOWN_STAMP
    secs, frac = divmod(ns, 1_000_000_000)
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:09d}Z").encode()
