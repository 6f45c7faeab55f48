"""A pod's usage read cheaply from its cgroup files, once per sampling pass.

Only the files the figures need are read: CPU time, memory in use and the inactive page cache
(the working set leaves it out, as :meth:`common.cgroups.Cgroup.usage` does), and the memory
limit, which is set before a container starts, so it is read when the group is first opened
and then only every ``LIMIT_EVERY`` reads. Memory is re-read only when the group's CPU time
moved since the last pass, or every ``QUIET_EVERY`` passes: an idle workload allocates nothing
(growing takes CPU in the group), and most pods on a dense node are idle, so a pass over them
costs one small read each, as cAdvisor's dynamic housekeeping slows down for quiet containers.
Page cache the kernel reclaims meanwhile shows within ``QUIET_EVERY`` passes. A group's files
stay open between passes and are re-read with ``pread`` at offset 0 (a cgroup file renders its
text afresh on every read from the start), which saves an open and a close per file per pass;
the number of descriptors kept is bounded (groups past the bound are opened per read): each
costs the kernel a page (its read buffer) while it is open. A removed group fails its next read
(ENOENT on open, ENODEV on a kept file): its files are closed and the caller hears
:class:`GroupGone`. :meth:`GroupReader.retain` closes the groups of pods that went away.
"""

from __future__ import annotations

import errno
import os
import resource
from collections.abc import Collection
from typing import NamedTuple

from common.cgroups import Layout

MAX_KEPT = 8192          # descriptors kept open at most, whatever the descriptor limit
LIMIT_EVERY = 12         # reads of a group between two reads of its memory limit (a minute at 5 s)
QUIET_EVERY = 6          # passes a group whose CPU time stood still keeps its memory figure (30 s at 5 s)
_CHUNK = 8192            # the largest file read here (memory.stat) is 1-3 KiB
_GONE = (errno.ENOENT, errno.ENODEV, errno.ESRCH)
_V1_UNLIMITED = 1 << 62  # v1 reports "no limit" as LONG_MAX rounded down to a page
_V1_MEMORY = ("memory.usage_in_bytes", "memory.stat", "memory.limit_in_bytes")   # in use, stat, limit
_V2_MEMORY = ("memory.current", "memory.stat", "memory.max")


class GroupGone(Exception):
    """The group (or one of its files) no longer exists."""


class GroupUsage(NamedTuple):  # a tuple: thousands are made per pass, a frozen dataclass costs ~4x
    cpu_ns: int                 # cumulative CPU time
    memory_bytes: int           # working set: in use minus inactive page cache
    memory_limit: int | None    # None when unlimited


def raise_open_files(want: int = 2 * MAX_KEPT) -> int:
    """Lift the soft descriptor limit to ``want`` where the hard limit allows (a login shell's
    or supervisord's soft 1024 would keep only 128 groups open). Returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return soft
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        return soft
    return target


def kept_budget(limit: int = MAX_KEPT) -> int:
    """Half the soft descriptor limit (sockets, logs and psutil need the rest), at most ``limit``."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return limit if soft == resource.RLIM_INFINITY else max(0, min(limit, soft // 2))


class _Group:
    __slots__ = ("cpu", "cpu_ns", "dirs", "fds", "limit", "limit_age", "memory", "quiet", "sole",
                 "sole_age", "working_set")

    def __init__(self, dirs: list[str], cpu: str | None, memory: tuple[str, str, str] | None) -> None:
        self.dirs = dirs                # the group's directory in each hierarchy read
        self.cpu = cpu                  # cpuacct.usage (v1) or cpu.stat (v2)
        self.memory = memory            # in use, stat, limit
        self.fds: dict[str, int] = {}   # path -> kept descriptor
        self.limit: int | None = None
        self.limit_age = LIMIT_EVERY    # reads since the limit was read: read it on the first
        self.sole: str | None = None    # its only child group, if it has no tasks of its own
        self.sole_age = LIMIT_EVERY
        self.cpu_ns = -1                # the CPU time and working set of the last read
        self.working_set = 0
        self.quiet = 0                  # reads since memory was last read

    def kept_paths(self) -> list[str]:
        """The files read every pass (the limit, read seldom, is opened when read)."""
        return ([self.cpu] if self.cpu else []) + list(self.memory[:2] if self.memory else ())


class GroupReader:
    """Reads groups under ``layout``. Used by one thread (the sampling loop). ``reads`` counts
    file opens and reads: a seam for tests, which check that requests cause none."""

    def __init__(self, layout: Layout, budget: int | None = None) -> None:
        self.layout = layout
        self.budget = kept_budget() if budget is None else budget
        self.reads = 0
        self._groups: dict[str, _Group] = {}
        self._limits: dict[str, tuple[int | None, int]] = {}   # relpath -> (limit, reads since)
        self._kept = 0

    @property
    def kept(self) -> int:
        return self._kept

    def usage(self, relpath: str) -> GroupUsage:
        """Raises GroupGone when the group does not exist, OSError or ValueError when a file
        cannot be read or parsed."""
        group = self._groups.get(relpath)
        try:
            return self._usage(group or self._open(relpath))
        except OSError as exc:
            if exc.errno not in _GONE:
                raise
            self.forget(relpath)
            if group is None:
                raise GroupGone(relpath) from exc
        try:  # the kept files were a removed group's: the path may hold a new one
            return self._usage(self._open(relpath))
        except OSError as exc:
            if exc.errno in _GONE:
                self.forget(relpath)
                raise GroupGone(relpath) from exc
            raise

    def limit(self, relpath: str) -> int | None:
        """The group's memory limit alone (read every ``LIMIT_EVERY`` calls); GroupGone when
        the group does not exist."""
        cached, age = self._limits.get(relpath, (None, LIMIT_EVERY))
        if age >= LIMIT_EVERY:
            group = self._layout_group(relpath)
            if group.memory is None:
                return None
            try:
                cached, age = _limit(self._read(group, group.memory[2]).strip(), self.layout.version == 2), 0
            except OSError as exc:
                self._limits.pop(relpath, None)
                if exc.errno in _GONE:
                    raise GroupGone(relpath) from exc
                raise
        self._limits[relpath] = (cached, age + 1)
        return cached

    def sole_child(self, relpath: str) -> str | None:
        """The name of the group's only child group when it has no tasks of its own (then the
        child's usage is the group's), else None. Looked at every ``LIMIT_EVERY`` calls: a
        pod's containers do not come and go while it runs. The group must have been read."""
        group = self._groups.get(relpath)
        if group is None:
            return None
        if group.sole_age >= LIMIT_EVERY:
            group.sole, group.sole_age = _sole_child(group.dirs), 0
        group.sole_age += 1
        return group.sole

    def forget(self, relpath: str) -> None:
        group = self._groups.pop(relpath, None)
        if group is not None:
            self._close(group)

    def retain(self, relpaths: Collection[str]) -> None:
        """Close every group not in ``relpaths`` (pods that went away)."""
        for relpath in [r for r in self._groups if r not in relpaths]:
            self.forget(relpath)
        for relpath in [r for r in self._limits if r not in relpaths]:
            del self._limits[relpath]

    def close(self) -> None:
        for group in self._groups.values():
            self._close(group)
        self._groups.clear()

    def _close(self, group: _Group) -> None:
        for fd in group.fds.values():
            os.close(fd)
        self._kept -= len(group.fds)
        group.fds.clear()

    def _open(self, relpath: str) -> _Group:
        group = self._layout_group(relpath)
        paths = group.kept_paths()
        if self._kept + len(paths) <= self.budget:
            try:
                for path in paths:
                    self.reads += 1
                    group.fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                    self._kept += 1
            except OSError:
                self._close(group)
                raise
        self._groups[relpath] = group
        return group

    def _layout_group(self, relpath: str) -> _Group:
        if self.layout.version == 2:
            base = os.path.join(self.layout.root, relpath)
            memory = _files(base, _V2_MEMORY) if "memory" in self.layout.mounts else None
            return _Group([base], os.path.join(base, "cpu.stat"), memory)
        cpuacct, mem = self.layout.mounts.get("cpuacct"), self.layout.mounts.get("memory")
        dirs = [os.path.join(m, relpath) for m in (cpuacct, mem) if m]
        cpu = os.path.join(cpuacct, relpath, "cpuacct.usage") if cpuacct else None
        return _Group(dirs, cpu, _files(os.path.join(mem, relpath), _V1_MEMORY) if mem else None)

    def _read(self, group: _Group, path: str) -> bytes:
        self.reads += 1
        fd = group.fds.get(path)
        if fd is not None:
            return _pread_all(fd)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return _pread_all(fd)
        finally:
            os.close(fd)

    def _usage(self, group: _Group) -> GroupUsage:
        v2 = self.layout.version == 2
        cpu_ns = 0
        if group.cpu:
            text = self._read(group, group.cpu)
            cpu_ns = (_keyed(text, b"usage_usec") or 0) * 1000 if v2 else int(text)
        if group.memory is None:
            return GroupUsage(cpu_ns, 0, None)
        current, stat, limit = group.memory
        if group.cpu and cpu_ns == group.cpu_ns and group.quiet < QUIET_EVERY:
            group.quiet += 1        # nothing ran in the group: nothing was allocated either
        else:
            used = int(self._read(group, current))
            text = self._read(group, stat)
            total = None if v2 else _keyed(text, b"total_inactive_file")
            inactive = total if total is not None else _keyed(text, b"inactive_file") or 0
            group.cpu_ns, group.working_set, group.quiet = cpu_ns, max(0, used - inactive), 0
        if group.limit_age >= LIMIT_EVERY:
            raw = self._read(group, limit).strip()
            group.limit = _limit(raw, v2)
            group.limit_age = 0
        group.limit_age += 1
        return GroupUsage(cpu_ns, group.working_set, group.limit)


def _sole_child(dirs: list[str]) -> str | None:
    """The one child directory common to ``dirs`` when none of them holds a task; else None."""
    found: set[str] = set()
    try:
        for path in dirs:
            with open(os.path.join(path, "cgroup.procs"), "rb") as fh:
                if fh.read(1):
                    return None
            with os.scandir(path) as it:
                found |= {e.name for e in it if e.is_dir(follow_symlinks=False)}
    except OSError:
        return None
    return found.pop() if len(found) == 1 else None


def _files(base: str, names: tuple[str, str, str]) -> tuple[str, str, str]:
    return os.path.join(base, names[0]), os.path.join(base, names[1]), os.path.join(base, names[2])


def _limit(raw: bytes, v2: bool) -> int | None:
    if v2:
        return None if raw == b"max" else int(raw)
    value = int(raw)
    return None if value >= _V1_UNLIMITED else value


def _pread_all(fd: int) -> bytes:
    data = os.pread(fd, _CHUNK, 0)
    while data and len(data) % _CHUNK == 0:
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
