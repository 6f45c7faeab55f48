"""A service under supervisord stops when supervisord dies, instead of living on as an orphan.

Orphans would hold the agent's locks, sockets and ports, and the next ``riklet run`` could not
start (services.takeover stops whatever is left anyway). The kernel sends the service SIGTERM
the moment its parent dies (PR_SET_PDEATHSIG), so the service shuts down by the same path as
``supervisorctl stop``: workloads are never touched, their shims do not depend on any service.

The signal only comes for a death *after* the prctl: a supervisord that died while the service
was starting is caught by comparing the parent pid with the supervisord ``riklet run`` exec'd
(its pid, exported as RIKLET_SUPERVISOR_PID, is the launcher's own).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Mapping

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


def watch_parent(name: str, environ: Mapping[str, str] | None = None) -> None:
    """Arm SIGTERM on the parent's death; exit at once (0) if the parent is already gone.

    Called first thing in a service's main(): until the service installs its own SIGTERM
    handler, the default action (exit) is just as right."""
    parent = expected_parent(os.environ if environ is None else environ)
    if parent is None:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        # Not fatal: the next start's takeover still stops this service if it is orphaned.
        print(f"{name}: prctl(PR_SET_PDEATHSIG): {os.strerror(ctypes.get_errno())}", file=sys.stderr)
    if os.getppid() != parent:
        print(f"{name}: supervisord (pid {parent}) is gone; not starting", file=sys.stderr)
        sys.exit(0)
