"""A pod's usage read cheaply from its cgroup files, once per sampling pass.

Only the files the figures need are read: CPU time, memory in use, the inactive page cache
(the working set leaves it out, as :meth:`common.cgroups.Cgroup.usage` does) and the memory
limit. Files stay open between passes and are re-read with ``pread`` at offset 0 (a cgroup
file renders its text afresh on every read from the start), which saves an open and a close
per file per pass; the number kept open is bounded, files past the bound are opened per read.
A removed group fails its next read (ENOENT on open, ENODEV on a kept file): its files are
closed and the caller hears :class:`GroupGone`.
"""

from __future__ import annotations

import errno
import os
import resource
from dataclasses import dataclass

from common.cgroups import Layout

MAX_KEPT = 8192          # open files kept at most, whatever the descriptor limit
_CHUNK = 8192            # the largest file read here (memory.stat) is ~1-3 KiB
_GONE = (errno.ENOENT, errno.ENODEV, errno.ESRCH)
_V1_UNLIMITED = 1 << 62  # v1 reports "no limit" as LONG_MAX rounded down to a page
_V2_FILES = ("cpu.stat", "memory.current", "memory.stat", "memory.max")
_V1_MEMORY_FILES = ("memory.usage_in_bytes", "memory.stat", "memory.limit_in_bytes")


class GroupGone(Exception):
    """The group (or one of its files) no longer exists."""


@dataclass(frozen=True)
class GroupUsage:
    cpu_ns: int                 # cumulative CPU time
    memory_bytes: int           # working set: in use minus inactive page cache
    memory_limit: int | None    # None when unlimited


def kept_budget(limit: int = MAX_KEPT) -> int:
    """Half the soft descriptor limit (sockets, logs and psutil need the rest), at most ``limit``."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return limit if soft == resource.RLIM_INFINITY else max(0, min(limit, soft // 2))


class FileCache:
    """Reads small kernel files, keeping up to ``budget`` of them open. Not thread-safe: the
    sampling thread is its only user. ``reads`` counts file reads (a seam for tests)."""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = kept_budget() if budget is None else budget
        self.reads = 0
        self._fds: dict[str, int] = {}

    def read(self, path: str) -> bytes:
        self.reads += 1
        fd = self._fds.get(path)
        if fd is not None:
            try:
                return _pread_all(fd)
            except OSError:
                self.drop(path)
                raise
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = _pread_all(fd)
        except OSError:
            os.close(fd)
            raise
        if len(self._fds) < self.budget:
            self._fds[path] = fd
        else:
            os.close(fd)
        return data

    def drop(self, path: str) -> None:
        fd = self._fds.pop(path, None)
        if fd is not None:
            os.close(fd)

    @property
    def kept(self) -> int:
        return len(self._fds)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _pread_all(fd: int) -> bytes:
    data = os.pread(fd, _CHUNK, 0)
    while len(data) % _CHUNK == 0 and data:
        more = os.pread(fd, _CHUNK, len(data))
        if not more:
            break
        data += more
    return data


def _keyed(text: bytes, key: bytes) -> int | None:
    """The value of ``key`` in a file of ``key value`` lines, None when absent."""
    needle = key + b" "
    if text.startswith(needle):
        at = 0
    else:
        at = text.find(b"\n" + needle)
        if at < 0:
            return None
        at += 1
    end = text.find(b"\n", at)
    return int(text[at + len(needle):end if end >= 0 else len(text)])


class GroupReader:
    """Where each figure lives for a cgroup ``relpath`` under ``layout``, read through ``files``."""

    def __init__(self, layout: Layout, files: FileCache) -> None:
        self.layout = layout
        self.files = files

    def usage(self, relpath: str) -> GroupUsage:
        """Raises GroupGone when the group does not exist, OSError or ValueError when a file
        cannot be read or parsed."""
        try:
            return self._usage(relpath)
        except OSError as exc:
            if exc.errno not in _GONE:
                raise
            self.forget(relpath)
        try:  # the kept files were a removed group's: the path may hold a new one
            return self._usage(relpath)
        except OSError as exc:
            if exc.errno in _GONE:
                self.forget(relpath)
                raise GroupGone(relpath) from exc
            raise

    def _usage(self, relpath: str) -> GroupUsage:
        return self._usage_v2(relpath) if self.layout.version == 2 else self._usage_v1(relpath)

    def forget(self, relpath: str) -> None:
        for path in self._paths(relpath):
            self.files.drop(path)

    def _paths(self, relpath: str) -> list[str]:
        if self.layout.version == 2:
            base = os.path.join(self.layout.root, relpath)
            return [os.path.join(base, f) for f in _V2_FILES]
        cpu, mem = self._dir("cpuacct", relpath), self._dir("memory", relpath)
        out = [os.path.join(cpu, "cpuacct.usage")] if cpu else []
        if mem:
            out += [os.path.join(mem, f) for f in _V1_MEMORY_FILES]
        return out

    def _dir(self, controller: str, relpath: str) -> str | None:
        mount = self.layout.mounts.get(controller)
        return None if mount is None else os.path.join(mount, relpath)

    def _usage_v1(self, relpath: str) -> GroupUsage:
        read = self.files.read
        cpu, mem = self._dir("cpuacct", relpath), self._dir("memory", relpath)
        cpu_ns = int(read(os.path.join(cpu, "cpuacct.usage"))) if cpu else 0
        if not mem:
            return GroupUsage(cpu_ns, 0, None)
        used = int(read(os.path.join(mem, "memory.usage_in_bytes")))
        stat = read(os.path.join(mem, "memory.stat"))
        total = _keyed(stat, b"total_inactive_file")
        inactive = total if total is not None else _keyed(stat, b"inactive_file") or 0
        raw = int(read(os.path.join(mem, "memory.limit_in_bytes")))
        return GroupUsage(cpu_ns, max(0, used - inactive), None if raw >= _V1_UNLIMITED else raw)

    def _usage_v2(self, relpath: str) -> GroupUsage:
        read = self.files.read
        base = os.path.join(self.layout.root, relpath)
        cpu_ns = (_keyed(read(os.path.join(base, "cpu.stat")), b"usage_usec") or 0) * 1000
        if "memory" not in self.layout.mounts:
            return GroupUsage(cpu_ns, 0, None)
        used = int(read(os.path.join(base, "memory.current")))
        inactive = _keyed(read(os.path.join(base, "memory.stat")), b"inactive_file") or 0
        raw = read(os.path.join(base, "memory.max")).strip()
        return GroupUsage(cpu_ns, max(0, used - inactive), None if raw == b"max" else int(raw))
