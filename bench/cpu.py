"""Machine-wide CPU accounting for the proxy benchmark, from /proc/stat.

A proxy's own CPU time (/proc/PID/stat) misses the kernel work done for its sockets in softirq
and kworkers, which is not charged to it; a kernel data path (nftables DNAT) has no process at
all. So the benchmark counts the whole machine's busy time:

- busy: the aggregate ``cpu`` line's user + nice + system + irq + softirq (all CPUs; guest
  time is already inside user; idle and iowait are not busy, nor is steal, time the hypervisor
  gave to another machine), in seconds, minus the user and system time of processes outside
  the benchmark's network namespace (whatever else the machine runs meanwhile: their own time
  and that of the children they reaped; kernel threads are never subtracted, and softirq and
  irq time are in no process's time);
- idle rate: busy seconds per wall second while nothing is offered (the agents' timers),
  measured before a round of runs;
- net cost of a run per unit of work: (busy - idle rate x the run's wall time) / units;
- added over direct: a proxy's net cost per unit minus the direct run's (client straight to
  the backend), which carries the client's and the backend's own work.

Pure functions, apart from ``sample`` and ``foreign_ticks``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")
# /proc/stat "cpu" columns: user nice system idle iowait irq softirq steal guest guest_nice
_BUSY_COLUMNS = (0, 1, 2, 5, 6)
PF_KTHREAD = 0x00200000


@dataclass(frozen=True)
class Sample:
    busy_ticks: int     # the machine's
    foreign_ticks: int  # processes outside our network namespace, children they reaped included
    at: float           # time.monotonic() when read


@dataclass(frozen=True)
class Window:
    busy_s: float       # CPU-seconds busy, all CPUs together
    wall_s: float


def busy_ticks(stat_text: str) -> int:
    """Busy clock ticks of all CPUs together, from the text of /proc/stat."""
    for line in stat_text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            values = [int(v) for v in fields[1:]]
            if len(values) < 8:
                raise ValueError(f"/proc/stat cpu line has {len(values)} columns, expected 8 or more")
            return sum(values[i] for i in _BUSY_COLUMNS)
    raise ValueError("/proc/stat has no aggregate 'cpu' line")


def process_ticks(proc_stat: str) -> int | None:
    """utime + stime + cutime + cstime from the text of /proc/PID/stat; None for a kernel
    thread (its work, ksoftirqd or a kworker, may well be ours)."""
    fields = proc_stat.rsplit(")", 1)[1].split()
    if int(fields[6]) & PF_KTHREAD:
        return None
    return sum(int(v) for v in fields[11:15])


def foreign_ticks(own_netns: str) -> int:
    """CPU ticks of every user process not in the network namespace ``own_netns`` (a
    ``net:[inode]`` link). A process that exits between two samples drops out of the sum while
    its time moves into its parent's cutime/cstime, so a difference of two sums counts it once."""
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{name}/ns/net") == own_netns:
                continue
            with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as fh:
                ticks = process_ticks(fh.read())
        except (OSError, IndexError, ValueError):   # gone meanwhile, or no namespace to read
            continue
        total += ticks or 0
    return total


def sample() -> Sample:
    own = os.readlink("/proc/self/ns/net")
    foreign = foreign_ticks(own)
    with open("/proc/stat", encoding="ascii") as fh:
        text = fh.read()
    return Sample(busy_ticks(text), foreign, time.monotonic())


def window(before: Sample, after: Sample, hz: int = CLK_TCK) -> Window:
    """Busy CPU-seconds between two samples, less what processes outside the benchmark used."""
    if after.at <= before.at or after.busy_ticks < before.busy_ticks:
        raise ValueError("samples out of order")
    ours = (after.busy_ticks - before.busy_ticks) - max(0, after.foreign_ticks - before.foreign_ticks)
    return Window(ours / hz, after.at - before.at)


def idle_rate(idle: Window) -> float:
    """Busy CPU-seconds per wall second of a window with no load offered."""
    return idle.busy_s / idle.wall_s


def net_per_unit(run: Window, idle_cpus: float, units: float) -> float:
    """CPU-seconds per unit of work a run cost above the machine's idle level."""
    if units <= 0:
        raise ValueError("a run that did no work has no cost per unit")
    return (run.busy_s - idle_cpus * run.wall_s) / units


def added_over_direct(proxy_net: float, direct_net: float) -> float:
    """CPU-seconds per unit a proxy adds to the same work done without it."""
    return proxy_net - direct_net
