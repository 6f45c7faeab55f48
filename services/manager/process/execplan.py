"""``exec`` in a process pod: a command that joins the pod's main process where it lives.

Everything is read from the container's running process, so the command sees what it sees:
its namespaces (those that differ from the manager's own: net, mnt, and any other a pod gets),
its cgroup in each hierarchy riklet manages, its user and groups, its environment
(``/proc/PID/environ``), and its working directory (the spec's ``workingDir``, else the
process's). The namespace files are opened here and inherited by ``nsexec.py``, which joins
them and execs the command: no ``preexec_fn`` in the manager's threaded process.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
from collections.abc import Mapping
from typing import Any

from common import cgroups
from common.errors import Conflict

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nsexec.py")
# setns order: the user namespace first (it grants the rights to join the others), mnt last
NAMESPACES = ("user", "cgroup", "ipc", "uts", "net", "pid", "time", "mnt")


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def namespaces(pid: int) -> list[tuple[str, str]]:
    """The pod process's namespaces that are not the manager's own: (kind, /proc path)."""
    out = []
    for kind in NAMESPACES:
        theirs = f"/proc/{pid}/ns/{kind}"
        try:
            if os.readlink(theirs) != os.readlink(f"/proc/self/ns/{kind}"):
                out.append((kind, theirs))
        except FileNotFoundError:
            continue   # a kernel without this kind of namespace
    return out


def cgroup_procs(pid: int, layout: cgroups.Layout) -> list[str]:
    """The ``cgroup.procs`` of the process's group in each hierarchy riklet manages."""
    mounts = {os.path.realpath(m) for m in layout.mounts.values()}
    by_controller = {c: os.path.realpath(m) for c, m in layout.mounts.items()}
    out: list[str] = []
    for line in _read(f"/proc/{pid}/cgroup").decode().splitlines():
        _, controllers, path = line.split(":", 2)
        if layout.version == 2:
            mount = layout.root if controllers == "" else None
        else:
            mount = next((by_controller[c] for c in controllers.split(",") if c in by_controller), None)
        if mount in mounts and mount is not None:
            procs = os.path.join(mount, path.lstrip("/"), "cgroup.procs")
            if procs not in out:
                out.append(procs)
    return out


def identity(pid: int) -> tuple[int, int, list[int]]:
    """The process's real uid, gid and supplementary groups."""
    fields = dict(line.split(":", 1) for line in _read(f"/proc/{pid}/status").decode().splitlines()
                  if ":" in line)
    return (int(fields["Uid"].split()[0]), int(fields["Gid"].split()[0]),
            [int(g) for g in fields.get("Groups", "").split()])


def environment(pid: int, fallback: Mapping[str, str]) -> dict[str, str]:
    try:
        raw = _read(f"/proc/{pid}/environ")
    except OSError:
        return dict(fallback)
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.decode("utf-8", "surrogateescape").partition("=")
        if sep and key:
            env[key] = value
    return env


def with_term(env: dict[str, str], tty: bool) -> dict[str, str]:
    """A terminal's programs want TERM: ``xterm`` unless the container sets one (as Docker)."""
    return {**env, "TERM": env.get("TERM", "xterm")} if tty else env


def set_window(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class ProcessExec:
    """One command run in a process pod, with pipes (or a terminal) for its stdio."""

    def __init__(self, pid: int, container: Mapping[str, Any], argv: list[str], tty: bool,
                 stdin: bool, window: tuple[int, int], layout: cgroups.Layout) -> None:
        ns_fds: list[tuple[str, int]] = []
        slave = -1
        try:
            for kind, path in namespaces(pid):
                ns_fds.append((kind, os.open(path, os.O_RDONLY | os.O_CLOEXEC)))
            uid, gid, groups = identity(pid)
            plan = {"argv": argv, "tty": tty, "manager": os.getpid(),
                    "cgroup_procs": cgroup_procs(pid, layout), "namespaces": ns_fds,
                    "uid": uid, "gid": gid, "groups": groups,
                    "env": with_term(environment(pid, container.get("env") or {}), tty),
                    "cwd": container.get("workingDir") or os.readlink(f"/proc/{pid}/cwd")}
        except (FileNotFoundError, ProcessLookupError):
            for _, fd in ns_fds:
                os.close(fd)
            raise Conflict(f"the container's process {pid} has ended", "container") from None
        try:
            cmd = [sys.executable, "-I", HELPER, json.dumps(plan)]
            fds = [fd for _, fd in ns_fds]
            if tty:
                master, slave = pty.openpty()
                set_window(master, *window)
                self.proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, pass_fds=fds,
                                             start_new_session=True, env={})
                self.stdout: int = master
                self.stderr: int | None = None
                self.stdin: int | None = os.dup(master) if stdin else None
            else:
                self.proc = subprocess.Popen(
                    cmd, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=fds,
                    start_new_session=True, env={})
                assert self.proc.stdout is not None and self.proc.stderr is not None
                self.stdout = os.dup(self.proc.stdout.fileno())
                self.stderr = os.dup(self.proc.stderr.fileno())
                self.stdin = os.dup(self.proc.stdin.fileno()) if self.proc.stdin else None
                for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                    if f is not None:
                        f.close()
        finally:
            for _, fd in ns_fds:
                os.close(fd)
            if slave >= 0:
                os.close(slave)
        self.tty = tty

    def resize(self, cols: int, rows: int) -> None:
        if self.tty:
            with contextlib.suppress(OSError):
                set_window(self.stdout, cols, rows)

    def close_stdin(self) -> None:
        if self.stdin is not None:
            if self.tty:
                # a terminal has no half-close: end-of-file is the EOF character at a line start
                with contextlib.suppress(OSError):
                    os.write(self.stdin, b"\x04")
            with contextlib.suppress(OSError):
                os.close(self.stdin)
            self.stdin = None

    def wait(self) -> int:
        code = self.proc.wait()
        return 128 - code if code < 0 else code

    def kill(self) -> None:
        """The command and whatever it started in its session."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def release(self) -> None:
        self.close_stdin()
        for fd in (self.stdout, self.stderr):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
