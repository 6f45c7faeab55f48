"""What the scale benchmark reads from /proc and the cgroup trees: CPU ticks, PSS, which
processes are the agent's services, its pods' shims and their workloads, and what is left over.

The parsers (:func:`parse_stat`, :func:`pss_kib`, :func:`cpu_seconds`, :func:`descendants`)
are pure; the rest reads the live system and treats a process that exits meanwhile as absent.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")


def parse_machine_busy(proc_stat: str) -> int:
    """Clock ticks the machine's CPUs spent busy (all but idle and iowait), from the ``cpu``
    line of /proc/stat."""
    fields = [int(x) for x in proc_stat.split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)


def machine_busy() -> int:
    with open("/proc/stat", encoding="ascii") as fh:
        return parse_machine_busy(fh.read())


@dataclass(frozen=True)
class Stat:
    """The fields of /proc/PID/stat the benchmark uses."""

    pid: int
    state: str
    ppid: int
    session: int
    ticks: int       # utime + stime, this process's own (all its threads)
    child_ticks: int  # cutime + cstime: of the children it reaped
    start: int       # starttime in clock ticks since boot: a pid plus this names one process


Key = tuple[int, int]  # (pid, starttime): a pid alone may be reused by another process


def parse_stat(pid: int, text: str) -> Stat:
    """The text of /proc/PID/stat; the command name may hold spaces and parentheses."""
    fields = text.rsplit(")", 1)[1].split()
    if len(fields) < 20:
        raise ValueError(f"/proc/{pid}/stat has {len(fields) + 2} fields, expected 22 or more")
    return Stat(pid, fields[0], int(fields[1]), int(fields[3]), int(fields[11]) + int(fields[12]),
                int(fields[13]) + int(fields[14]), int(fields[19]))


def pss_kib(smaps_rollup: str) -> int:
    """The ``Pss:`` figure (KiB) of the text of /proc/PID/smaps_rollup."""
    for line in smaps_rollup.splitlines():
        if line.startswith("Pss:"):
            parts = line.split()
            if len(parts) != 3 or parts[2] != "kB":
                raise ValueError(f"unexpected smaps_rollup line {line!r}")
            return int(parts[1])
    raise ValueError("smaps_rollup has no Pss line")


def cpu_seconds(before: Mapping[Key, int], after: Mapping[Key, int], hz: int = CLK_TCK) -> float:
    """CPU-seconds the processes of ``after`` used since ``before`` (both: key -> ticks). A
    process born in between counts all its ticks; one that died in between is not counted (its
    time cannot be read any more), nor is a pid reused by another process counted twice."""
    return sum(ticks - before.get(key, 0) for key, ticks in after.items()) / hz


def descendants(roots: Iterable[int], parents: Mapping[int, int]) -> set[int]:
    """Every process below ``roots`` (not the roots), from pid -> ppid."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


# -- the live system -------------------------------------------------------------------------

def read_stat(pid: int) -> Stat | None:
    """The process's stat, None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            st = parse_stat(pid, fh.read())
    except (OSError, ValueError, IndexError):
        return None
    return None if st.state in ("Z", "X") else st


def all_stats() -> dict[int, Stat]:
    """Every live process."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := read_stat(int(name))) is not None:
            out[st.pid] = st
    return out


def ticks_of(pids: Iterable[int], reaped: bool = False) -> dict[Key, int]:
    """CPU ticks of each process; with ``reaped``, plus those of the children it reaped (the
    agent's short-lived helpers, nft or a CNI plugin, are its work; a shim's children are the
    workloads, which are not)."""
    out = {}
    for pid in pids:
        if (st := read_stat(pid)) is not None:
            out[(pid, st.start)] = st.ticks + (st.child_ticks if reaped else 0)
    return out


def pss_total_kib(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError), \
                open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as fh:
            total += pss_kib(fh.read())
    return total


def alive(keys: Iterable[Key]) -> list[Key]:
    """The processes of ``keys`` still running (same pid and start time, not a zombie)."""
    return [key for key in keys if (st := read_stat(key[0])) is not None and st.start == key[1]]


def any_alive(keys: Iterable[Key]) -> bool:
    """Whether one of ``keys`` still runs; stops at the first (cheap to poll over thousands)."""
    return any((st := read_stat(pid)) is not None and st.start == start for pid, start in keys)


def session_pids(sid: int, stats: Mapping[int, Stat]) -> list[int]:
    """The agent: supervisord leads its own session, which its services and the proxy's
    workers share; shims and workloads each have their own session."""
    return sorted(pid for pid, st in stats.items() if st.session == sid)


def shim_pids(pods_root: str, stats: Mapping[int, Stat]) -> set[int]:
    """The pods' holders: a process whose command line names a pod directory of this agent
    (``riklet-shim POD_DIR``, ``python -m services.manager.shim --detach POD_DIR``), plus the
    ``shim_pid`` each pod's status.json records (a holder forked without such an argument)."""
    root = os.path.abspath(pods_root).encode()
    found = set()
    for pid in stats:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        if any(os.path.dirname(arg.rstrip(b"/")) == root for arg in argv if arg.startswith(root)):
            found.add(pid)
    for status in pod_statuses(pods_root):
        recorded = status.get("shim_pid")
        if isinstance(recorded, int) and recorded in stats:
            found.add(recorded)
    return found


def pod_statuses(pods_root: str) -> list[dict[str, object]]:
    out = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(pods_root):
            with contextlib.suppress(OSError, ValueError), \
                    open(os.path.join(pods_root, name, "status.json"), encoding="utf-8") as fh:
                status = json.load(fh)
                if isinstance(status, dict):
                    out.append(status)
    return out


def recorded(pods_root: str) -> tuple[set[Key], set[Key]]:
    """(shims, workloads) as the pods' status.json files name them, pid with start time: a
    workload whose shim died is no shim's descendant any more, but is still the pod's."""
    shims, workloads = set(), set()
    for status in pod_statuses(pods_root):
        shims |= _keys([(status.get("shim_pid"), status.get("shim_start"))])
        containers = status.get("containers")
        if isinstance(containers, list):
            workloads |= _keys((c.get("pid"), c.get("pid_start")) for c in containers if isinstance(c, dict))
    return shims, workloads


def _keys(pairs: Iterable[tuple[object, object]]) -> set[Key]:
    return {(pid, start) for pid, start in pairs if isinstance(pid, int) and isinstance(start, int)}


def pod_dirs(pods_root: str) -> list[str]:
    with contextlib.suppress(FileNotFoundError):
        return sorted(n for n in os.listdir(pods_root) if os.path.isdir(os.path.join(pods_root, n)))
    return []


def cgroup_dirs(relpath: str, hierarchies: Iterable[str]) -> list[str]:
    """Directories below ``relpath`` (the agent's group, itself not counted) in every hierarchy."""
    out: list[str] = []
    for top in hierarchies:
        for path, subdirs, _files in os.walk(os.path.join(top, relpath)):
            out.extend(os.path.join(path, d) for d in subdirs)
    return out


def fd_usage(pid: int) -> tuple[int, int] | None:
    """(open fds, soft RLIMIT_NOFILE) of a process, None if it cannot be read."""
    try:
        count = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/limits", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Max open files"):
                    return count, int(line.split()[3])
    except (OSError, ValueError, IndexError):
        return None
    return None
