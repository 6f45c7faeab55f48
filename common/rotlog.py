"""Container log files: a size-rotated writer, and readers that see across rotation.

The files are ``NAME.log`` (newest), ``NAME.log.1``, … ``NAME.log.<max_files-1>`` (oldest); no
file grows past ``max_size``, so the set never holds more than ``max_size * max_files`` bytes.
Beside each, ``NAME.log.times`` (``NAME.log.1.times``, …) says when its bytes were written
(common/logindex.py): the readers' ``since`` and ``timestamps`` use it. A line's time is the
time of the chunk holding its first byte; a line with no known time (a log written before the
index existed) is older than any ``since`` and is stamped ``0001-01-01T00:00:00.000000000Z``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from io import BufferedReader

from common.errors import InvalidArgument, Unavailable
from common.logindex import IndexReader, IndexWriter, index_path, stamp

_CHUNK = 64 * 1024


class RotatingWriter:
    def __init__(self, path: str, max_size: int, max_files: int,
                 clock: Callable[[], int] = time.time_ns) -> None:
        if max_size < 1:
            raise InvalidArgument("must be at least 1 byte", "max_size")
        if max_files < 1:
            raise InvalidArgument("must be at least 1", "max_files")
        self.path = path
        self.max_size = max_size
        self.max_files = max_files
        self._fd = -1
        self._size = 0
        self._index: IndexWriter | None = None
        self._now = 0
        self._clock = clock
        self._open()

    def write(self, data: bytes) -> None:
        """Append data, rotating first whenever the file would pass max_size.

        A rotation falls after the last newline that fits, or before a line that does not fit,
        so lines shorter than max_size stay whole within one file.
        """
        view = memoryview(data)
        start = 0
        self._now = self._clock()
        while len(data) - start > self.max_size - self._size:
            end = data.rfind(b"\n", start, start + self.max_size - self._size) + 1
            if end == 0 and self._size == 0:
                end = start + self.max_size  # a line longer than a whole file: cut it
            self._write_all(view[start:end])
            start = max(start, end)
            self._rotate()
        self._write_all(view[start:])

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._index is not None:
            self._index.close()
            self._index = None

    def _open(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._size = os.fstat(self._fd).st_size
        except OSError as exc:
            raise Unavailable(f"{self.path}: {exc.strerror}", "log") from exc
        self._index = IndexWriter(self.path, self._fd)

    def _write_all(self, view: memoryview) -> None:
        if view and self._index is not None:
            self._index.note(self._size, self._now)
        try:
            while view:
                written = os.write(self._fd, view)
                self._size += written
                view = view[written:]
        except OSError as exc:
            raise Unavailable(f"{self.path}: {exc.strerror}", "log") from exc

    def _rotate(self) -> None:
        self.close()
        try:
            if self.max_files == 1:
                os.unlink(self.path)
                _unlink_quietly(index_path(self.path))
            for index in range(self.max_files - 1, 0, -1):
                older = f"{self.path}.{index - 1}" if index > 1 else self.path
                if os.path.exists(older):
                    os.replace(older, f"{self.path}.{index}")  # replaces, so drops, the oldest
                    # then its index (a reader pairs them by inode, never by name alone)
                    _replace_quietly(index_path(older), index_path(f"{self.path}.{index}"))
        except OSError as exc:
            raise Unavailable(f"{self.path}: rotation failed: {exc.strerror}", "log") from exc
        self._open()


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _replace_quietly(old: str, new: str) -> None:
    try:
        os.replace(old, new)
    except FileNotFoundError:
        _unlink_quietly(new)   # no index to move: none must stay paired with the name
    except OSError:
        pass


def rotated_files(path: str) -> list[str]:
    """The existing files of one log, oldest first."""
    older = []
    index = 1
    while os.path.exists(f"{path}.{index}"):
        older.append(f"{path}.{index}")
        index += 1
    return [*reversed(older), *([path] if os.path.exists(path) else [])]


def tail(path: str, n: int | None, since: int | None = None, timestamps: bool = False) -> bytes:
    """The last n lines across the log and its rotated files (None: everything), oldest first.

    ``since`` (ns since the epoch): only the lines written at or after it (then n counts among
    those). ``timestamps``: each line prefixed with its time and a space.
    """
    if since is not None or timestamps:
        return _timed_tail(path, n, since, timestamps)
    files = rotated_files(path)
    if n is None:
        return b"".join(_read_whole(f) for f in files)
    if n <= 0:
        return b""
    data = b""
    newlines = 0
    for name in reversed(files):
        for _, block in _blocks_backwards(name):
            data = block + data
            newlines += block.count(b"\n")
            # n lines need n newlines before them, plus possibly the one ending the last line
            if newlines > n:
                return _last_lines(data, n)
    return _last_lines(data, n)


def follow(path: str, stop: threading.Event, poll: float = 0.2, since: int | None = None,
           timestamps: bool = False) -> Iterator[bytes]:
    """Yield data appended to path after this call, until stop is set, surviving rotation.

    The position is taken now, not at the first ``next()``: call follow before :func:`tail` and
    nothing written in between is lost. When a new file appears under the name, the old one is
    drained first (the writer never touches it again), then the new one is read from its start.
    Two rotations within one poll interval lose the file in between. ``since`` and
    ``timestamps`` as in :func:`tail`; a line is then stamped when its first byte comes, and
    yielded as it comes (not held back until its end).
    """
    first = _open_at_end(path)
    chunks = _follow(path, first, stop, poll)
    if since is None and not timestamps:
        return _plain(chunks)
    mid_line = False
    if first is not None and first.tell() > 0:
        mid_line = os.pread(first.fileno(), 1, first.tell() - 1) != b"\n"
    return _timed_follow(path, chunks, mid_line, since, timestamps)


def _plain(chunks: Iterator[tuple[BufferedReader, int, bytes]]) -> Iterator[bytes]:
    try:
        for _, _, data in chunks:
            yield data
    finally:
        chunks.close()  # type: ignore[attr-defined]


def _timed_follow(path: str, chunks: Iterator[tuple[BufferedReader, int, bytes]], mid_line: bool,
                  since: int | None, timestamps: bool) -> Iterator[bytes]:
    idx: IndexReader | None = None
    source: BufferedReader | None = None
    expect = -1
    in_line = mid_line
    keep = since is None
    try:
        for f, offset, data in chunks:
            end = offset + len(data)
            if f is not source:
                if idx is not None:
                    idx.close()
                source, expect = f, -1
                idx = IndexReader.open(path, f.fileno(), (f"{path}.1",))
            assert idx is not None
            if offset != expect:   # a new file, or truncated in place
                idx.seek(offset)
                if expect >= 0:
                    in_line = False
            if mid_line:           # the line under way when we started: kept as tail kept it
                mid_line = False
                ns = idx.time_at(offset - 1, end)
                keep = since is None or (ns is not None and ns >= since)
            expect = end
            out = bytearray()
            j = 0
            while j < len(data):
                if not in_line:
                    ns = idx.time_at(offset + j, end)
                    in_line = True
                    keep = since is None or (ns is not None and ns >= since)
                    if keep and timestamps:
                        out += stamp(ns) + b" "
                nl = data.find(b"\n", j)
                stop = len(data) if nl < 0 else nl + 1
                if keep:
                    out += data[j:stop]
                if nl >= 0:
                    in_line = False
                j = stop
            if out:
                yield bytes(out)
    finally:
        chunks.close()  # type: ignore[attr-defined]
        if idx is not None:
            idx.close()


def _follow(path: str, current: BufferedReader | None, stop: threading.Event,
            poll: float) -> Iterator[tuple[BufferedReader, int, bytes]]:
    """(file, offset, data) as data comes."""
    try:
        while not stop.is_set():
            offset = current.tell() if current else 0
            data = current.read(_CHUNK) if current else b""
            if data:
                assert current is not None
                yield current, offset, data
                continue
            renamed = _replaced(path, current)
            if renamed is not None:
                if current:
                    yield from _drain(current)
                    current.close()
                current = renamed
                continue
            if current and os.fstat(current.fileno()).st_size < current.tell():
                current.seek(0)  # truncated in place
            stop.wait(poll)
    finally:
        if current:
            current.close()


def _timed_tail(path: str, n: int | None, since: int | None, timestamps: bool) -> bytes:
    if n is not None and n <= 0:
        return b""
    files = rotated_files(path)
    start = (0, 0) if n is None else _lines_start(files, n)
    if since is not None:
        start = max(start, _since_start(path, files, since))
    out: deque[bytes] = deque(maxlen=n)
    for ns, line in _timed_lines(path, files, start):
        if since is not None and (ns is None or ns < since):
            continue
        out.append(stamp(ns) + b" " + line if timestamps else line)
    return b"".join(out)


def _siblings(path: str, name: str) -> tuple[str, ...]:
    """The names a rotated file of ``path`` had just before or gets just after a rotation."""
    level = 0 if name == path else int(name.rsplit(".", 1)[1])
    return tuple(f"{path}.{k}" if k else path for k in (level + 1, level - 1) if k >= 0)


def _lines_start(files: list[str], n: int) -> tuple[int, int]:
    """(file number, offset) where the last n lines begin."""
    seen = 0
    last = True
    for i in range(len(files) - 1, -1, -1):
        for pos, block in _blocks_backwards(files[i]):
            end = len(block)
            if last:
                last = False
                if block.endswith(b"\n"):
                    end -= 1  # the newline ending the last line starts no line
            while (nl := block.rfind(b"\n", 0, end)) >= 0:
                seen += 1
                if seen == n:
                    return i, pos + nl + 1
                end = nl
    return 0, 0


def _since_start(path: str, files: list[str], since: int) -> tuple[int, int]:
    """(file number, offset) of the first chunk written at or after since."""
    for i, name in enumerate(files):
        try:
            f = open(name, "rb")  # noqa: SIM115
        except FileNotFoundError:
            continue
        with f, IndexReader.open(name, f.fileno(), _siblings(path, name)) as idx:
            offset = idx.first_at_or_after(since)
        if offset is not None:
            return i, offset
    return len(files), 0


def _byte_before(files: list[str], i: int, offset: int) -> bytes:
    try:
        if offset > 0:
            with open(files[i], "rb") as f:
                return os.pread(f.fileno(), 1, offset - 1)
        while i > 0:
            i -= 1
            with open(files[i], "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size:
                    return os.pread(f.fileno(), 1, size - 1)
    except OSError:
        pass
    return b""


def _timed_lines(path: str, files: list[str], start: tuple[int, int]) -> Iterator[tuple[int | None, bytes]]:
    """(time, line) from start on; a line begun before start is skipped."""
    first, offset = start
    before = _byte_before(files, first, offset) if first < len(files) else b""
    skip = before not in (b"", b"\n")
    line = bytearray()
    line_ns: int | None = None
    in_line = False
    for i in range(first, len(files)):
        try:
            f = open(files[i], "rb")  # noqa: SIM115
        except FileNotFoundError:
            continue  # rotated away while we read
        pos = offset if i == first else 0
        with f, IndexReader.open(files[i], f.fileno(), _siblings(path, files[i])) as idx:
            f.seek(pos)
            idx.seek(pos)
            while block := f.read(_CHUNK):
                end = pos + len(block)
                j = 0
                while j < len(block):
                    if not in_line:
                        line_ns = idx.time_at(pos + j, end)
                        in_line = True
                    nl = block.find(b"\n", j)
                    stop = len(block) if nl < 0 else nl + 1
                    if not skip:
                        line += block[j:stop]
                    j = stop
                    if nl >= 0:
                        if not skip:
                            yield line_ns, bytes(line)
                        line.clear()
                        in_line = skip = False
                pos = end
    if line and not skip:
        yield line_ns, bytes(line)


def _open_at_end(path: str) -> BufferedReader | None:
    try:
        f = open(path, "rb")  # noqa: SIM115 - the generator owns it and closes it
    except FileNotFoundError:
        return None
    f.seek(0, os.SEEK_END)
    return f


def _replaced(path: str, current: BufferedReader | None) -> BufferedReader | None:
    """The file now at path if it is not the one open (rotated or newly created), else None."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    if current is not None and os.fstat(current.fileno()).st_ino == st.st_ino:
        return None
    try:
        return open(path, "rb")
    except FileNotFoundError:
        return None


def _drain(f: BufferedReader) -> Iterator[tuple[BufferedReader, int, bytes]]:
    while True:
        offset = f.tell()
        data = f.read(_CHUNK)
        if not data:
            return
        yield f, offset, data


def _read_whole(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""  # rotated away while we listed


def _blocks_backwards(path: str) -> Iterator[tuple[int, bytes]]:
    try:
        f = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return
    with f:
        pos = f.seek(0, os.SEEK_END)
        while pos > 0:
            size = min(_CHUNK, pos)
            pos -= size
            f.seek(pos)
            yield pos, f.read(size)


def _last_lines(data: bytes, n: int) -> bytes:
    end = len(data) - 1 if data.endswith(b"\n") else len(data)
    for _ in range(n):
        end = data.rfind(b"\n", 0, end)
        if end < 0:
            return data
    return data[end + 1 :]
