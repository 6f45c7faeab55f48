"""A service under supervisord stops when supervisord dies, instead of living on as an orphan.

Orphans would hold the agent's locks, sockets and ports, and the next ``riklet run`` could not
start (services.takeover stops whatever is left anyway). The moment its supervisord dies, the
service gets SIGTERM and shuts down by the same path as ``supervisorctl stop``: workloads are
never touched, their shims do not depend on any service.

The watch is a thread blocked on a pidfd of the supervisord. Before it signals, it points the
service's stdout and stderr (supervisord's pipe, now without a reader) at the program's log
file, so that the shutdown is logged where the operator looks. Without pidfds (Linux < 5.3)
the kernel sends the SIGTERM itself (PR_SET_PDEATHSIG) and those last lines are lost.

Either way, a supervisord that died while the service was starting is caught by comparing the
parent pid with the supervisord ``riklet run`` exec'd (its pid, exported as
RIKLET_SUPERVISOR_PID, is the launcher's own).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import sys
import threading
from collections.abc import Mapping

log = logging.getLogger("riklet.parentwatch")

PR_SET_PDEATHSIG = 1
SUPERVISOR_PID_ENV = "RIKLET_SUPERVISOR_PID"
# "off": services outlive their supervisord as before (a test of services.takeover uses it to
# play a riklet that predates this module).
SWITCH_ENV = "RIKLET_PARENT_WATCH"


def expected_parent(environ: Mapping[str, str]) -> int | None:
    """The pid of the supervisord this service must die with, or None for no watch: a service
    started by hand (no SUPERVISOR_ENABLED) has no supervisor to follow."""
    if environ.get(SWITCH_ENV, "").lower() == "off" or not environ.get("SUPERVISOR_ENABLED"):
        return None
    given = environ.get(SUPERVISOR_PID_ENV, "")
    return int(given) if given.isdigit() else os.getppid()


def log_file(environ: Mapping[str, str]) -> str | None:
    """The program's log file: supervisord.conf's ``stdout_logfile`` of every program."""
    state, program = environ.get("RIKLET_STATE_DIR"), environ.get("SUPERVISOR_PROCESS_NAME")
    return os.path.join(state, "log", f"{program}.log") if state and program else None


def watch_parent(name: str, environ: Mapping[str, str] | None = None) -> None:
    """Arrange SIGTERM on the supervisord's death; exit at once (0) if it is already gone.

    Called first thing in a service's main(): until the service installs its own SIGTERM
    handler, the default action (exit) is just as right."""
    env = os.environ if environ is None else environ
    parent = expected_parent(env)
    if parent is None:
        return
    try:
        pidfd: int | None = os.pidfd_open(parent)
    except ProcessLookupError:
        pidfd = None                 # gone: caught just below
    except OSError:                  # no pidfds here: the kernel's parent-death signal
        pidfd = None
        _arm_pdeathsig(name)
    # After the pidfd: if our parent is still that pid, the pidfd is of our parent, not of a
    # process that reused the pid.
    if os.getppid() != parent:
        print(f"{name}: supervisord (pid {parent}) is gone; not starting", file=sys.stderr)
        sys.exit(0)
    if pidfd is not None:
        threading.Thread(target=_await_death, args=(pidfd, parent, log_file(env)),
                         name="parent-watch", daemon=True).start()


def _arm_pdeathsig(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        # Not fatal: the next start's takeover still stops this service if it is orphaned.
        print(f"{name}: prctl(PR_SET_PDEATHSIG): {os.strerror(ctypes.get_errno())}", file=sys.stderr)


def _await_death(pidfd: int, parent: int, logfile: str | None) -> None:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    while not poller.poll():            # readable once the process has exited
        pass
    os.close(pidfd)
    if logfile is not None:
        with contextlib.suppress(OSError):
            fd = os.open(logfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
    log.warning("supervisord gone: stopping", extra={"supervisord_pid": parent})
    os.kill(os.getpid(), signal.SIGTERM)
