"""Container log files: a size-rotated writer, and readers that see across rotation.

The files are ``NAME.log`` (newest), ``NAME.log.1``, … ``NAME.log.<max_files-1>`` (oldest); no
file grows past ``max_size``, so the set never holds more than ``max_size * max_files`` bytes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from io import BufferedReader

from common.errors import InvalidArgument, Unavailable

_CHUNK = 64 * 1024


class RotatingWriter:
    def __init__(self, path: str, max_size: int, max_files: int) -> None:
        if max_size < 1:
            raise InvalidArgument("must be at least 1 byte", "max_size")
        if max_files < 1:
            raise InvalidArgument("must be at least 1", "max_files")
        self.path = path
        self.max_size = max_size
        self.max_files = max_files
        self._fd = -1
        self._size = 0
        self._open()

    def write(self, data: bytes) -> None:
        """Append data, rotating first whenever the file would pass max_size.

        A rotation falls after the last newline that fits, or before a line that does not fit,
        so lines shorter than max_size stay whole within one file.
        """
        view = memoryview(data)
        start = 0
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

    def _open(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._size = os.fstat(self._fd).st_size
        except OSError as exc:
            raise Unavailable(f"{self.path}: {exc.strerror}", "log") from exc

    def _write_all(self, view: memoryview) -> None:
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
            for index in range(self.max_files - 1, 0, -1):
                older = f"{self.path}.{index - 1}" if index > 1 else self.path
                if os.path.exists(older):
                    os.replace(older, f"{self.path}.{index}")  # replaces, so drops, the oldest
        except OSError as exc:
            raise Unavailable(f"{self.path}: rotation failed: {exc.strerror}", "log") from exc
        self._open()


def rotated_files(path: str) -> list[str]:
    """The existing files of one log, oldest first."""
    older = []
    index = 1
    while os.path.exists(f"{path}.{index}"):
        older.append(f"{path}.{index}")
        index += 1
    return [*reversed(older), *([path] if os.path.exists(path) else [])]


def tail(path: str, n: int | None) -> bytes:
    """The last n lines across the log and its rotated files (None: everything), oldest first."""
    files = rotated_files(path)
    if n is None:
        return b"".join(_read_whole(f) for f in files)
    if n <= 0:
        return b""
    data = b""
    newlines = 0
    for name in reversed(files):
        for block in _blocks_backwards(name):
            data = block + data
            newlines += block.count(b"\n")
            # n lines need n newlines before them, plus possibly the one ending the last line
            if newlines > n:
                return _last_lines(data, n)
    return _last_lines(data, n)


def follow(path: str, stop: threading.Event, poll: float = 0.2) -> Iterator[bytes]:
    """Yield data appended to path after this call, until stop is set, surviving rotation.

    The position is taken now, not at the first ``next()``: call follow before :func:`tail` and
    nothing written in between is lost. When a new file appears under the name, the old one is
    drained first (the writer never touches it again), then the new one is read from its start.
    Two rotations within one poll interval lose the file in between.
    """
    return _follow(path, _open_at_end(path), stop, poll)


def _follow(path: str, current: BufferedReader | None, stop: threading.Event, poll: float) -> Iterator[bytes]:
    try:
        while not stop.is_set():
            data = current.read(_CHUNK) if current else b""
            if data:
                yield data
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


def _drain(f: BufferedReader) -> Iterator[bytes]:
    while data := f.read(_CHUNK):
        yield data


def _read_whole(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""  # rotated away while we listed


def _blocks_backwards(path: str) -> Iterator[bytes]:
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
            yield f.read(size)


def _last_lines(data: bytes, n: int) -> bytes:
    end = len(data) - 1 if data.endswith(b"\n") else len(data)
    for _ in range(n):
        end = data.rfind(b"\n", 0, end)
        if end < 0:
            return data
    return data[end + 1 :]
