"""Run one command inside a process pod: join its cgroups, then its namespaces, take its user
and working directory, and exec.

Started by the manager (``python -I nsexec.py PLAN_JSON``, see :mod:`.execplan`) with the
pod's namespace files already open on inherited descriptors, so that nothing here races the
pod's main process. Standard library only: it starts quickly and imports nothing of riklet.
Python 3.11 has no ``os.setns``: setns(2) is called through ctypes. Exit codes as a shell's:
126 when the command could not be entered or run, 127 when it was not found; otherwise the
command's own (it replaces this process, or, in a pod with its own pid namespace, a child that
this process waits for).
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import sys
import termios
from typing import Any

PR_SET_PDEATHSIG = 1


def _setns(fd: int, kind: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"joining the pod's {kind} namespace: {os.strerror(err)}")


def enter(plan: dict[str, Any]) -> None:
    """Everything but the exec, in the order the kernel needs: the cgroups while the host's
    /sys/fs/cgroup is still visible, the mount namespace last (it changes what paths mean)."""
    if plan.get("tty"):
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)   # the terminal on stdin becomes ours
    for path in plan["cgroup_procs"]:
        with open(path, "w", encoding="ascii") as fh:
            fh.write("0")    # "0": the writing process itself
    for kind, fd in plan["namespaces"]:
        _setns(fd, kind)
        os.close(fd)
    uid, gid = plan["uid"], plan["gid"]
    if os.getuid() == 0 and (uid, gid, plan["groups"]) != (0, 0, []):
        os.setgroups(plan["groups"])
        os.setgid(gid)
        os.setuid(uid)
    die_with(plan["manager"])   # after setuid, which clears it
    os.chdir(plan["cwd"] or "/")


def die_with(parent: int | None) -> None:
    """SIGKILL when the parent (the manager, whose stream feeds this exec; or this helper,
    in a pod's pid namespace where its pid is not visible) ends: nobody would read the output
    or end the command any more."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl: {os.strerror(err)}")
    if parent is not None and os.getppid() != parent:   # it ended before the signal was asked for
        os.kill(os.getpid(), signal.SIGKILL)


def _child_status(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def main(argv: list[str]) -> int:
    plan = json.loads(argv[1])
    command: list[str] = plan["argv"]
    try:
        enter(plan)
    except OSError as exc:
        print(f"riklet exec: {exc.strerror or exc}", file=sys.stderr, flush=True)
        return 126
    if any(kind == "pid" for kind, _ in plan["namespaces"]):
        # setns(CLONE_NEWPID) places only children in the pod's pid namespace
        pid = os.fork()
        if pid:
            return _child_status(os.waitpid(pid, 0)[1])
        die_with(None)   # same process group as the helper: a kill of one reaches both
    try:
        os.execvpe(command[0], command, plan["env"])
    except OSError as exc:
        print(f"riklet exec: {command[0]}: {exc.strerror}", file=sys.stderr, flush=True)
        return 127 if isinstance(exc, FileNotFoundError) else 126
    return 126  # unreachable: exec replaced this process


if __name__ == "__main__":
    sys.exit(main(sys.argv))
