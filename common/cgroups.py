"""Linux control groups: v1 (one hierarchy per controller) or v2 (one unified tree), detected.

A :class:`Cgroup` is a relative path such as ``riklet/<agent>/<pod>/<container>`` that exists in
every controller riklet uses. Kernel errors become :class:`~common.errors.Unavailable` naming the
file; a cgroup file that does not exist raises :class:`~common.errors.NotFound`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

from common.errors import InvalidArgument, NotFound, RikletError, Unavailable

V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "pids", "freezer")
V2_CONTROLLERS = ("cpu", "memory", "pids")
CFS_PERIOD_US = 100_000
_MIN_QUOTA_US = 1000  # the kernel refuses CFS quotas under 1 ms
_V1_UNLIMITED = 1 << 62  # v1 reports "no limit" as LONG_MAX rounded down to a page
_RMDIR_RETRY = 1.0  # a group stays busy for a moment after its last task is reaped
_FREEZE_WAIT = 1.0


@dataclass(frozen=True)
class Layout:
    """Where each controller's hierarchy is mounted; ``version`` is 0 when none is usable."""

    version: int
    root: str
    mounts: Mapping[str, str] = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return bool(self.mounts)


@dataclass(frozen=True)
class Usage:
    cpu_ns: int  # cumulative CPU time
    memory_bytes: int  # working set: usage minus inactive page cache
    memory_limit: int | None  # None when unlimited
    oom_kills: int  # cumulative count of OOM kills in the group


def detect(root: str = "/sys/fs/cgroup") -> Layout:
    """v2 if ``root`` is a cgroup2 tree offering memory and cpu, else the v1 per-controller mounts."""
    controllers = os.path.join(root, "cgroup.controllers")
    if os.path.exists(controllers):
        have = set(_read(controllers).split())
        if {"memory", "cpu"} <= have and os.access(root, os.W_OK):
            return Layout(2, root, {c: root for c in V2_CONTROLLERS if c in have})
    mounts = {}
    for name in V1_CONTROLLERS:
        path = os.path.join(root, name)
        is_v1 = os.path.exists(os.path.join(path, "cgroup.procs")) and not os.path.exists(
            os.path.join(path, "cgroup.controllers")
        )
        if is_v1 and os.access(path, os.W_OK):
            # realpath: a combined "cpu,cpuacct" mount is reached through two symlinks
            mounts[name] = os.path.realpath(path)
    return Layout(1 if mounts else 0, root, mounts)


class Cgroup:
    def __init__(self, relpath: str, layout: Layout | None = None) -> None:
        parts = relpath.split("/")
        if not relpath or any(p in ("", ".", "..") for p in parts):
            raise InvalidArgument(f"not a relative cgroup path: {relpath!r}", "cgroup")
        self.relpath = relpath
        self.layout = layout if layout is not None else detect()

    def __repr__(self) -> str:
        return f"Cgroup({self.relpath!r}, v{self.layout.version})"

    def create(self) -> bool:
        """Make the group in every hierarchy; True when none of its directories was there
        (then it has the kernel's defaults: no limit)."""
        if not self.layout.available:
            raise Unavailable(f"no writable cgroup hierarchy under {self.layout.root}", "cgroup")
        if self.layout.version == 2:
            self._enable_v2_controllers()
        made = [_mkdir(path) for path in self._dirs()]
        return all(made)

    def set_limits(
        self, cpu_millis: int | None, memory_bytes: int | None, pids_max: int | None = None
    ) -> None:
        """Apply the limits; None lifts a limit. Asking a limit of a missing controller fails."""
        v2 = self.layout.version == 2
        pids = self._controller_dir("pids", pids_max)
        if pids:
            _write(os.path.join(pids, "pids.max"), "max" if pids_max is None else str(pids_max))
        memory = self._controller_dir("memory", memory_bytes)
        if memory:
            (_memory_v2 if v2 else _memory_v1)(memory, memory_bytes)
        cpu = self._controller_dir("cpu", cpu_millis)
        if cpu:
            quota = None if cpu_millis is None else max(_MIN_QUOTA_US, cpu_millis * CFS_PERIOD_US // 1000)
            (_cpu_v2 if v2 else _cpu_v1)(cpu, quota)

    def dirs(self) -> list[str]:
        """The group's directory in each hierarchy (one on v2)."""
        return self._dirs()

    def oom_counter(self) -> tuple[str, str] | None:
        """The file and the key of the group's cumulative OOM-kill count, if memory is managed."""
        memory = self._dir("memory")
        if memory is None:
            return None
        events = "memory.events" if self.layout.version == 2 else "memory.oom_control"
        return os.path.join(memory, events), "oom_kill"

    def freezer_state(self) -> str | None:
        """v1's freezer.state of the group (v2 kills a group whole through cgroup.kill)."""
        freezer = self._dir("freezer") if self.layout.version == 1 else None
        return None if freezer is None else os.path.join(freezer, "freezer.state")

    def add(self, pid: int) -> None:
        for path in self._dirs():
            _write(os.path.join(path, "cgroup.procs"), str(pid))

    def pids(self) -> list[int]:
        """Every pid in this group and its descendants, in any controller."""
        found: set[int] = set()
        for top in self._dirs():
            for path, _subdirs, _files in os.walk(top):
                try:
                    found.update(int(p) for p in _read(os.path.join(path, "cgroup.procs")).split())
                except NotFound:
                    continue  # removed while we walked
        return sorted(found)

    def usage(self) -> Usage:
        if not self.exists():
            raise NotFound(f"cgroup {self.relpath} does not exist", "cgroup")
        return self._usage_v2() if self.layout.version == 2 else self._usage_v1()

    def kill_all(self, sig: int) -> None:
        if sig == signal.SIGKILL and self._kill_v2():
            return
        # frozen, a process forking in a loop cannot create children the sweep would miss
        with self._frozen(sig == signal.SIGKILL):
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    continue

    def remove(self) -> None:
        """rmdir the group and its descendants, children before parents, in every controller."""
        for top in self._dirs():
            for path, _subdirs, _files in os.walk(top, topdown=False):
                _rmdir(path)

    def exists(self) -> bool:
        return any(os.path.isdir(path) for path in self._dirs())

    def _dirs(self) -> list[str]:
        return sorted({os.path.join(m, self.relpath) for m in self.layout.mounts.values()})

    def _dir(self, controller: str) -> str | None:
        mount = self.layout.mounts.get(controller)
        return None if mount is None else os.path.join(mount, self.relpath)

    def _controller_dir(self, controller: str, value: int | None) -> str | None:
        path = self._dir(controller)
        if path is None and value is not None:
            raise Unavailable(f"the {controller} cgroup controller is not available", controller)
        return path

    def _enable_v2_controllers(self) -> None:
        # v2 delegates a controller to a group only if every ancestor lists it in subtree_control
        wanted = " ".join(f"+{c}" for c in self.layout.mounts)
        parts = self.relpath.split("/")
        for depth in range(len(parts)):
            path = os.path.join(self.layout.root, *parts[:depth])
            _mkdir(path)
            _write(os.path.join(path, "cgroup.subtree_control"), wanted)

    def _usage_v1(self) -> Usage:
        cpu_ns = memory = oom = 0
        limit: int | None = None
        cpuacct = self._dir("cpuacct")
        if cpuacct:
            cpu_ns = int(_read(os.path.join(cpuacct, "cpuacct.usage")))
        mem = self._dir("memory")
        if mem:
            stat = _keyed(os.path.join(mem, "memory.stat"))
            used = int(_read(os.path.join(mem, "memory.usage_in_bytes")))
            memory = max(0, used - stat.get("total_inactive_file", stat.get("inactive_file", 0)))
            raw = int(_read(os.path.join(mem, "memory.limit_in_bytes")))
            limit = None if raw >= _V1_UNLIMITED else raw
            oom = _keyed(os.path.join(mem, "memory.oom_control")).get("oom_kill", 0)
        return Usage(cpu_ns, memory, limit, oom)

    def _usage_v2(self) -> Usage:
        path = os.path.join(self.layout.root, self.relpath)
        cpu_ns = _keyed(os.path.join(path, "cpu.stat")).get("usage_usec", 0) * 1000
        if "memory" not in self.layout.mounts:
            return Usage(cpu_ns, 0, None, 0)
        used = int(_read(os.path.join(path, "memory.current")))
        inactive = _keyed(os.path.join(path, "memory.stat")).get("inactive_file", 0)
        raw = _read(os.path.join(path, "memory.max")).strip()
        oom = _keyed(os.path.join(path, "memory.events")).get("oom_kill", 0)
        return Usage(cpu_ns, max(0, used - inactive), None if raw == "max" else int(raw), oom)

    def _kill_v2(self) -> bool:
        kill = os.path.join(self.layout.root, self.relpath, "cgroup.kill")
        if self.layout.version != 2 or not os.path.exists(kill):
            return False
        _write(kill, "1")
        return True

    @contextmanager
    def _frozen(self, wanted: bool) -> Iterator[None]:
        spec = self._freezer() if wanted else None
        if spec is None:
            yield
            return
        state, frozen, thawed, check = spec
        _write(state, frozen)
        try:
            deadline = time.monotonic() + _FREEZE_WAIT
            while not check() and time.monotonic() < deadline:
                time.sleep(0.005)  # the kernel offers no event for "frozen" on v1
            yield
        finally:
            _write(state, thawed)

    def _freezer(self) -> tuple[str, str, str, Callable[[], bool]] | None:
        if self.layout.version == 2:
            path = os.path.join(self.layout.root, self.relpath)
            events = os.path.join(path, "cgroup.events")
            return os.path.join(path, "cgroup.freeze"), "1", "0", lambda: "frozen 1" in _read(events)
        freezer = self._dir("freezer")
        if freezer is None or not os.path.isdir(freezer):
            return None
        state = os.path.join(freezer, "freezer.state")
        return state, "FROZEN", "THAWED", lambda: _read(state).strip() == "FROZEN"



def hierarchies(root: str = "/sys/fs/cgroup") -> list[str]:
    """Every cgroup hierarchy under ``root`` (each v1 controller, named ones such as systemd,
    the unified tree), as real paths: containerd's runc makes groups in all of them, not only
    in the controllers riklet sets limits with."""
    found = {os.path.realpath(root)} if os.path.exists(os.path.join(root, "cgroup.procs")) else set()
    with contextlib.suppress(OSError):
        for name in os.listdir(root):
            path = os.path.join(root, name)
            if os.path.exists(os.path.join(path, "cgroup.procs")):
                found.add(os.path.realpath(path))
    return sorted(found)


def prune(relpath: str, root: str = "/sys/fs/cgroup") -> list[str]:
    """Remove ``relpath`` and the groups under it, in every hierarchy, where they are empty; a
    group with a process in it (or under it) stays, and is returned. Never waits."""
    Cgroup(relpath, Layout(0, root))   # validates the path
    left = []
    for top in (os.path.join(h, relpath) for h in hierarchies(root)):
        for path, _subdirs, _files in os.walk(top, topdown=False):
            try:
                os.rmdir(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                    raise Unavailable(f"{path}: {exc.strerror}", "cgroup") from exc
                left.append(path)
    return left


def _memory_v1(path: str, limit: int | None) -> None:
    value = "-1" if limit is None else str(limit)
    memsw = os.path.join(path, "memory.memsw.limit_in_bytes")
    mem = os.path.join(path, "memory.limit_in_bytes")
    if not os.path.exists(memsw):
        _write(mem, value)
        return
    # the kernel keeps limit <= memsw limit at every step, so the write order depends on direction
    growing = limit is None or limit > int(_read(mem))
    for name in (memsw, mem) if growing else (mem, memsw):
        _write(name, value)


def _memory_v2(path: str, limit: int | None) -> None:
    _write(os.path.join(path, "memory.max"), "max" if limit is None else str(limit))
    swap = os.path.join(path, "memory.swap.max")
    if os.path.exists(swap):
        _write(swap, "max" if limit is None else "0")  # otherwise the limit leaks into swap


def _cpu_v1(path: str, quota_us: int | None) -> None:
    _write(os.path.join(path, "cpu.cfs_period_us"), str(CFS_PERIOD_US))
    _write(os.path.join(path, "cpu.cfs_quota_us"), "-1" if quota_us is None else str(quota_us))


def _cpu_v2(path: str, quota_us: int | None) -> None:
    _write(os.path.join(path, "cpu.max"), f"{'max' if quota_us is None else quota_us} {CFS_PERIOD_US}")


def _error(path: str, exc: OSError) -> RikletError:
    cls = NotFound if exc.errno == errno.ENOENT else Unavailable
    return cls(f"{path}: {exc.strerror or exc}", "cgroup")


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError as exc:
        raise _error(path, exc) from exc


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        raise _error(path, exc) from exc


def _keyed(path: str) -> dict[str, int]:
    """``key value`` lines (memory.stat, cpu.stat, memory.events) as a dict."""
    out = {}
    for line in _read(path).splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


def _mkdir(path: str) -> bool:
    """Make ``path`` and any missing parent; True if ``path`` itself was made now."""
    try:
        os.mkdir(path)
        return True
    except FileExistsError:
        return False
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _error(path, exc) from exc
    try:
        os.makedirs(path)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        raise _error(path, exc) from exc


def _rmdir(path: str) -> None:
    deadline = time.monotonic() + _RMDIR_RETRY
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                raise Unavailable(f"{path}: {exc.strerror}", "cgroup") from exc
        time.sleep(0.02)  # zombies not yet released keep the group busy briefly
