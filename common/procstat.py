"""A process named by pid and start time, from /proc: a pid alone names nothing once the process
is gone (pids are reused), so liveness always pairs it with its start time."""

from __future__ import annotations


def proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (state first), or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # the command name may hold spaces and parentheses; it ends at the last ')'
    return raw[raw.rfind(b")") + 2 :].decode().split()


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: start time in clock ticks since boot."""
    fields = proc_stat(pid)
    return int(fields[19]) if fields else None


def pid_alive(pid: int, start: int) -> bool:
    """Whether pid still names the process that started at start; zombies count as dead."""
    fields = proc_stat(pid)
    return fields is not None and fields[0] not in ("Z", "X", "x") and int(fields[19]) == start
