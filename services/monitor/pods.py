"""A pod's usage from its process tree, and the per-container figures' row.

A pod's cgroup is the better source (:mod:`services.monitor.cgroupfiles`): it counts every
process the pod ever forked, including the ones that already exited, and the memory the kernel
charges it (its working set, active page cache included). The process tree is the fallback for
a pod whose cgroup is missing or unreadable (no cgroup support, a runtime that made none, a
monitor without access): it sees only live processes and sums their RSS, which counts shared
pages once per process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import psutil

log = logging.getLogger(__name__)

_PROC_ERRORS = (psutil.NoSuchProcess, psutil.AccessDenied)


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


class ContainerUsage(NamedTuple):
    pod: str
    container: str
    cpu_seconds: float          # cumulative, from the container's own cgroup
    memory_bytes: int           # working set
    memory_limit: int | None
