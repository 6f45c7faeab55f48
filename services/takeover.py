"""What ``riklet run`` does before it execs supervisord: make sure it is the only agent of its
run dir, and stop what a previous agent of that run dir left running.

A supervisord killed alone (kill -9, the OOM killer) leaves its services behind, holding
memory's lock, the sockets and the host ports: the new agent's services could not start. Its
services normally exit with it (common.parentwatch); these are the ones that did not (a riklet
from before that, a service stuck at the time) and the proxy worker still lingering.

Only processes provably ours are touched, never anything found by name alone: a process is a
leftover when its environment has SUPERVISOR_ENABLED (supervisord started it, or its keeper
did) and our RIKLET_RUN_DIR, and its command line is one of the four services or a proxy
worker. The pods' shims inherit the manager's environment but are none of these commands, so
they and their workloads are never signalled.

One agent per run dir: ``riklet run`` takes ``agent.lock`` there and keeps it through the exec,
so supervisord holds it for its life; a supervisord alive with our run dir (even one started
before this lock existed) makes a second start fail with a clear message rather than fight it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from common.errors import Unavailable

LOCK_FILE = "agent.lock"
SERVICES = ("memory", "manager", "monitor", "proxy")
GRACE = 10.0       # as supervisord.conf's stopwaitsecs: SIGTERM, then this long before SIGKILL
KILL_WAIT = 5.0    # after SIGKILL, for the kernel to finish them off
RESIGNAL = 0.5     # after the first SIGTERM, when the second goes out
POLL = 0.05


@dataclass(frozen=True)
class Proc:
    """A process as /proc shows it; ``start`` (boot ticks) tells a reused pid from the original."""

    pid: int
    start: int
    role: str


# --- /proc -------------------------------------------------------------------------------------

def _stat(pid: int, proc: str = "/proc") -> list[str] | None:
    """The fields after the command name (state first), or None for a process gone or dead."""
    try:
        with open(f"{proc}/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if not fields or fields[0] in ("Z", "X") else fields


def start_time(pid: int, proc: str = "/proc") -> int | None:
    fields = _stat(pid, proc)
    return int(fields[19]) if fields is not None and len(fields) > 19 else None


def _nul_list(pid: int, name: str, proc: str) -> list[str]:
    with open(f"{proc}/{pid}/{name}", "rb") as fh:
        return [v.decode(errors="replace") for v in fh.read().split(b"\0") if v]


def _read(pid: int, proc: str) -> tuple[list[str], dict[str, str]] | None:
    """Command line and environment, or None when unreadable (gone, or another user's)."""
    try:
        argv = _nul_list(pid, "cmdline", proc)
        env = dict(v.split("=", 1) for v in _nul_list(pid, "environ", proc) if "=" in v)
    except OSError:
        return None
    return argv, env


def role_of(argv: list[str], env: dict[str, str], run_dir: str) -> str | None:
    """``memory``... ``proxy``, ``proxy-worker``, ``supervisord``, or None: not an agent process
    of ``run_dir`` (another agent's, a shim, a workload, anything else)."""
    given = env.get("RIKLET_RUN_DIR")
    if not given or os.path.realpath(given) != os.path.realpath(run_dir):
        return None
    names = [os.path.basename(a) for a in argv[:2]]
    if "supervisord" in names:
        return "supervisord"
    if not env.get("SUPERVISOR_ENABLED"):
        return None
    for service in SERVICES:
        if f"riklet-{service}" in names:
            return service
    module = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else None
    if module == "services.proxy" and "--worker" in argv:
        return "proxy-worker"
    if module is not None and module.startswith("services.") and module[9:] in SERVICES:
        return module[9:]
    return None


def agent_processes(run_dir: str, proc: str = "/proc") -> Iterator[Proc]:
    """Every live process of an agent of ``run_dir`` (but this one)."""
    me = os.getpid()
    for entry in os.listdir(proc):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        start = start_time(pid, proc)
        seen = _read(pid, proc)
        # Read the start time again: a pid reused between the reads is not what we read.
        if start is None or seen is None or start_time(pid, proc) != start:
            continue
        role = role_of(*seen, run_dir)
        if role is not None:
            yield Proc(pid, start, role)


def lock_holders(paths: list[str], locks: str = "/proc/locks") -> dict[str, int]:
    """Which pid holds a flock on each of ``paths`` (those locked only), from /proc/locks."""
    wanted: dict[str, str] = {}
    for path in paths:
        with contextlib.suppress(OSError):
            st = os.stat(path)
            wanted[f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"] = path
    held: dict[str, int] = {}
    with contextlib.suppress(OSError), open(locks, encoding="ascii", errors="replace") as fh:
        for line in fh:
            fields = line.split()
            # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2148353 0 EOF"; "->" marks a waiter.
            if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] in wanted \
                    and fields[4].isdigit():
                held[wanted[fields[5]]] = int(fields[4])
    return held


# --- one agent per run dir -----------------------------------------------------------------------

def claim(run_dir: str, proc: str = "/proc") -> int:
    """Lock ``run_dir`` for this agent; the lock's fd, inheritable so that supervisord holds it
    after the exec. Unavailable, naming the live agent, when there is one."""
    path = os.path.join(run_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held = False
    except BlockingIOError:
        held = True
    except BaseException:
        os.close(fd)
        raise
    who = ", ".join(f"supervisord pid {p.pid}" for p in agent_processes(run_dir, proc)
                    if p.role == "supervisord")
    if held and not who:    # a `riklet run` that has not exec'd yet, or a supervisord we cannot read
        holder = lock_holders([path]).get(path)
        who = f"pid {holder} holds {LOCK_FILE}" if holder else f"{LOCK_FILE} is held"
    if who:
        os.close(fd)
        raise Unavailable(f"an agent is already running from {run_dir} ({who}): stop it first, "
                          "or give this one another RIKLET_RUN_DIR", "RIKLET_RUN_DIR")
    os.set_inheritable(fd, True)
    return fd


# --- stopping what a dead agent left -------------------------------------------------------------

def _alive(p: Proc) -> bool:
    return start_time(p.pid) == p.start


def _signal(p: Proc, sig: int) -> None:
    """Signal ``p`` itself, never a process that reused its pid: a pidfd is opened, then the
    start time checked again (the pidfd pins the process it was opened on)."""
    with contextlib.suppress(ProcessLookupError):
        try:
            fd = os.pidfd_open(p.pid)
        except OSError:      # an old kernel: the start time check alone
            if _alive(p):
                os.kill(p.pid, sig)
            return
        try:
            if _alive(p):
                signal.pidfd_send_signal(fd, sig)
        finally:
            os.close(fd)


def _wait_gone(procs: list[Proc], timeout: float) -> list[Proc]:
    deadline = time.monotonic() + timeout
    left = [p for p in procs if _alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(POLL)
        left = [p for p in left if _alive(p)]
    return left


def stop(procs: list[Proc], grace: float = GRACE, kill_wait: float = KILL_WAIT) -> list[Proc]:
    """SIGTERM (the path of ``supervisorctl stop``: workloads are left alone), then SIGKILL for
    those still there after ``grace``; returns those that needed SIGKILL. Unavailable if any
    outlives that too (stuck in the kernel)."""
    for p in procs:
        _signal(p, signal.SIGTERM)
    # A proxy worker serves on after SIGTERM for a successor that cannot come while we wait; a
    # second SIGTERM stops it at once (and is a no-op for the others).
    for p in _wait_gone(procs, min(RESIGNAL, grace)):
        _signal(p, signal.SIGTERM)
    stubborn = _wait_gone(procs, max(grace - RESIGNAL, 0.0))
    for p in stubborn:
        _signal(p, signal.SIGKILL)
    undying = _wait_gone(stubborn, kill_wait)
    if undying:
        raise Unavailable("processes of the previous agent survived SIGKILL: "
                          + ", ".join(f"{p.role} pid {p.pid}" for p in undying), "RIKLET_RUN_DIR")
    return stubborn


def take_over(run_dir: str, report: Callable[[str], None], grace: float = GRACE) -> list[Proc]:
    """Stop every leftover service of ``run_dir``; call :func:`claim` first (no agent may be
    alive). Returns what was stopped."""
    left = [p for p in agent_processes(run_dir) if p.role != "supervisord"]
    if not left:
        return []
    report(f"stopping {len(left)} processes left by a previous run in {run_dir}: "
           + ", ".join(f"{p.role} (pid {p.pid})" for p in left))
    started = time.monotonic()
    killed = stop(left, grace)
    report(f"previous run's processes stopped in {time.monotonic() - started:.1f} s"
           + (f"; SIGKILL needed for {', '.join(f'{p.role} (pid {p.pid})' for p in killed)}"
              if killed else ""))
    return left

