"""Where a pod's usage is read from: its cgroup when it has one, else its process tree.

The cgroup is the better source: it counts every process the pod ever forked, including the
ones that already exited, and the memory the kernel charges it (its working set, active page
cache included). The process tree is the fallback for a pod whose cgroup is missing or
unreadable (no cgroup support, a runtime that made none, a monitor without access): it sees
only live processes and sums their RSS, which counts shared pages once per process.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import psutil

from common.cgroups import Cgroup
from common.errors import RikletError
from services.monitor.sampler import Reader

log = logging.getLogger(__name__)

# Reading a cgroup can fail in these ways: the group vanished between exists() and the read,
# a controller file is malformed, or common.cgroups reports its own error.
_CGROUP_ERRORS = (OSError, ValueError, RikletError)
_PROC_ERRORS = (psutil.NoSuchProcess, psutil.AccessDenied)


class CgroupUsage(Protocol):
    @property
    def cpu_ns(self) -> int: ...
    @property
    def memory_bytes(self) -> int: ...
    @property
    def memory_limit(self) -> int | None: ...


class CgroupLike(Protocol):
    """The part of :class:`common.cgroups.Cgroup` the monitor reads (tests pass stand-ins)."""

    def exists(self) -> bool: ...
    def usage(self) -> CgroupUsage: ...


CgroupOpener = Callable[[str], "CgroupLike | None"]


def open_cgroup_default(relpath: str) -> CgroupLike | None:
    return Cgroup(relpath)


@dataclass(frozen=True)
class PodSource:
    key: str                    # the CPU sampler's key; changes when the source is replaced
    read_cpu: Reader
    memory_used: int
    memory_limit: int | None    # what the cgroup enforces, if anything


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def root_pids(status: Mapping[str, Any]) -> list[int]:
    """The pod's pids as memory knows them: ``status.pids`` and each container's ``pid``.
    PID 0 and 1 are never a pod's: taking them would measure the whole host."""
    pids, containers = status.get("pids"), status.get("containers")
    found: list[Any] = list(pids) if isinstance(pids, list) else []
    if isinstance(containers, list):
        found += [_dict(c).get("pid") for c in containers]
    out: list[int] = []
    for pid in found:
        if isinstance(pid, int) and not isinstance(pid, bool) and pid > 1 and pid not in out:
            out.append(pid)
    return out


def process_tree(pids: Iterable[int]) -> list[psutil.Process]:
    """The live processes among ``pids`` and all their descendants, each once."""
    seen: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            family = [proc, *proc.children(recursive=True)]
        except _PROC_ERRORS:
            continue
        for p in family:
            seen.setdefault(p.pid, p)
    return list(seen.values())


def tree_cpu_seconds(procs: Iterable[psutil.Process]) -> float:
    """CPU time of the tree, counting children each process already reaped (those moved into
    its ``children_*`` times when they exited)."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except _PROC_ERRORS:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def tree_rss(procs: Iterable[psutil.Process]) -> int:
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except _PROC_ERRORS:
            continue
    return total


def _from_cgroup(record: Mapping[str, Any], relpath: str,
                 open_cgroup: CgroupOpener) -> PodSource | None:
    try:
        cg = open_cgroup(relpath)
        if cg is None or not cg.exists():
            return None
        first = cg.usage()
    except _CGROUP_ERRORS as exc:
        log.info("pod cgroup unreadable, using its processes",
                 extra={"pod": record.get("name"), "cgroup": relpath, "error": str(exc)})
        return None
    last_cpu = first.cpu_ns / 1e9

    def read_cpu() -> float:
        # A group removed mid-sample reads as "no progress" rather than failing the query.
        nonlocal last_cpu
        with contextlib.suppress(*_CGROUP_ERRORS):
            last_cpu = cg.usage().cpu_ns / 1e9
        return last_cpu

    uid = record.get("uid") or record.get("name")
    return PodSource(f"pod:{uid}:cgroup:{relpath}", read_cpu, int(first.memory_bytes),
                     first.memory_limit)


def measure(record: Mapping[str, Any], open_cgroup: CgroupOpener = open_cgroup_default) -> PodSource:
    """The pod's usage source: its own cgroup (``status.cgroup``) when that exists and reads,
    else the process tree under its pids. A pod with neither uses nothing."""
    status = _dict(record.get("status"))
    relpath = status.get("cgroup")
    # An empty path is the root group (the whole host) and ".." could leave the pods' tree.
    if isinstance(relpath, str) and relpath.strip("/") and ".." not in relpath.split("/"):
        src = _from_cgroup(record, relpath.strip("/"), open_cgroup)
        if src is not None:
            return src
    roots = root_pids(status)
    procs = process_tree(roots)
    uid = record.get("uid") or record.get("name")
    return PodSource(f"pod:{uid}:pids:{','.join(map(str, sorted(roots)))}",
                     lambda: tree_cpu_seconds(procs), tree_rss(procs), None)


@dataclass(frozen=True)
class ContainerUsage:
    pod: str
    container: str
    cpu_seconds: float          # cumulative, from the container's own cgroup
    memory_bytes: int           # working set
    memory_limit: int | None


def container_usages(records: Iterable[Mapping[str, Any]],
                     open_cgroup: CgroupOpener = open_cgroup_default) -> list[ContainerUsage]:
    """Per-container figures for pods whose containers have a cgroup of their own below the
    pod's (``<pod cgroup>/<container>``: both runtimes make them); others are left out."""
    out: list[ContainerUsage] = []
    for record in records:
        status = record.get("status") or {}
        base = status.get("cgroup")
        if not isinstance(base, str) or not base:
            continue
        for c in status.get("containers") or []:
            name = c.get("name") if isinstance(c, Mapping) else None
            if not isinstance(name, str) or c.get("state") != "running":
                continue
            with contextlib.suppress(*_CGROUP_ERRORS):
                group = open_cgroup(f"{base}/{name}")
                if group is None or not group.exists():
                    continue
                u = group.usage()
                out.append(ContainerUsage(str(record.get("name")), name, u.cpu_ns / 1e9,
                                          u.memory_bytes, u.memory_limit))
    return out
