"""riklet-shim: the per-pod process that holds one pod's containers and outlives the manager.

The manager writes ``POD_DIR/spec.json`` and calls :func:`spawn`; the shim reports through
``POD_DIR/status.json`` (formats in :mod:`services.manager.shimctl`) and stops the pod on
SIGTERM. Files and signals are the whole protocol, so either side can restart without the other.

The shim is a child subreaper: every process of the pod stays its descendant and is reaped by
it, which is how it knows when the pod is really gone.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

from common import log
from common.cgroups import Cgroup, Layout, detect
from common.errors import RikletError, Unavailable
from common.rotlog import RotatingWriter
from services.manager import procs, shimctl
from services.manager.shimctl import ContainerSpec, PodSpec, Reason, Termination, pid_alive, read_status, stop

__all__ = ["SPAWN_DEADLINE", "Shim", "main", "pid_alive", "read_status", "spawn", "stop"]

_LOG = logging.getLogger("riklet.shim")
_READ_CHUNK = 64 * 1024
_READS_PER_TURN = 16  # bounded so that one chatty container cannot starve the others
_KILL_SWEEP = 0.5  # once the grace period is over, how often leftovers get SIGKILL again
SPAWN_DEADLINE = 5.0


def spawn(pod_dir: str, python: str = sys.executable) -> int:
    """Start the shim for POD_DIR, detached (an orphan in its own session); its pid.

    The caller may be a threaded gRPC server, where forking and then running Python is unsafe:
    subprocess forks and execs at once, and the fresh interpreter does the detaching fork itself
    (``--detach``), reporting the shim's pid on stdout before its parent exits.
    """
    shimctl.load_spec(pod_dir)  # a bad spec fails here, in the caller, not in a detached process
    with open(os.path.join(pod_dir, shimctl.SHIM_LOG), "ab") as err:
        middle = subprocess.Popen(
            [python, "-m", "services.manager.shim", "--detach", pod_dir], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=err, start_new_session=True, close_fds=True)
    try:
        out, _ = middle.communicate(timeout=SPAWN_DEADLINE)
    except subprocess.TimeoutExpired:
        middle.kill()
        middle.wait()
        raise Unavailable(f"the shim launcher hung: {_last_line(pod_dir)}", "shim") from None
    pid = int(out.strip() or b"0") if out.strip().isdigit() else 0
    if not pid:
        raise Unavailable(f"could not start the shim: {_last_line(pod_dir)}", "shim")
    _await_status(pod_dir, pid)
    return pid


def _detach() -> None:
    """In the launcher: fork; the parent reports the child's pid and exits, the child goes on as
    the shim, an orphan from the start (re-parented to the nearest subreaper)."""
    pid = os.fork()
    if pid:
        os.write(1, f"{pid}\n".encode())
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)


def _await_status(pod_dir: str, pid: int) -> None:
    deadline = time.monotonic() + SPAWN_DEADLINE
    while time.monotonic() < deadline:
        status = shimctl.read_status(pod_dir)
        if status is not None and status["shim_pid"] == pid:
            return
        fields = shimctl.proc_stat(pid)
        if fields is None or fields[0] == "Z":
            raise Unavailable(f"shim exited at start: {_last_line(pod_dir)}", "shim")
        time.sleep(0.01)  # a detached process offers nothing to wait on
    os.kill(pid, signal.SIGTERM)  # a shim the caller believes failed must not hold a pod
    raise Unavailable(f"shim {pid} wrote no status within {SPAWN_DEADLINE:g} s", "shim")


def _last_line(pod_dir: str) -> str:
    try:
        with open(os.path.join(pod_dir, shimctl.SHIM_LOG), "rb") as f:
            lines = f.read()[-4096:].decode(errors="replace").strip().splitlines()
    except OSError:
        return "no shim.log"
    return lines[-1] if lines else "shim.log is empty"


@dataclass
class _Container:
    """One container's observed state across its runs."""

    spec: ContainerSpec
    cgroup: Cgroup | None
    writer: RotatingWriter
    state: str = "waiting"
    pid: int | None = None
    pid_start: int | None = None
    starts: int = 0
    started_at: float | None = None
    started_mono: float = 0.0
    end: Termination | None = None  # how the last run ended, until the next one starts
    last: Termination | None = None  # the most recent termination, kept across restarts
    finished_at: float | None = None
    delay: float | None = None  # the back-off delay used last
    restart_due: float | None = None  # monotonic
    next_restart_at: float | None = None  # wall clock, for the status
    oom_before: int = 0
    start_error: Termination | None = None
    last_started: float | None = None
    out: int | None = None  # read end of the current run's output pipe
    log_broken: bool = False

    def to_json(self) -> dict[str, Any]:
        end = self.end
        return {
            "name": self.spec.name,
            "state": self.state,
            "pid": self.pid,
            "pid_start": self.pid_start,
            "restartCount": max(0, self.starts - 1),
            "exitCode": end.exit_code if end else None,
            "signal": end.signal if end else None,
            "reason": end.reason.value if end else None,
            "message": end.message if end else None,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at if end else None,
            "nextRestartAt": self.next_restart_at,
            "cgroup": self.cgroup.relpath if self.cgroup else None,
            "lastTermination": self._last_json(),
        }

    def _last_json(self) -> dict[str, Any] | None:
        if self.last is None:
            return None
        return {**self.last.to_json(self.finished_at or 0.0), "startedAt": self.last_started}


class Shim:
    def __init__(self, pod_dir: str, spec: PodSpec, layout: Layout) -> None:
        self.pod_dir = pod_dir
        self.spec = spec
        self.layout = layout
        self.state = "running"
        self.start_time = shimctl.proc_start_time(os.getpid())
        os.makedirs(spec.log.dir, exist_ok=True)
        self.containers = [self._container(c) for c in spec.containers]
        self.by_pid: dict[int, _Container] = {}
        self.sel = selectors.DefaultSelector()
        self.signals: set[int] = set()
        self.kill_at: float | None = None
        self.children = False  # whether a child may still be left to reap
        self.events = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if spec.notify else None

    def run(self) -> int:
        self._install_signals()
        self._write_status()
        for c in self.containers:
            self._start(c)
        while self.state == "running" or self.children:
            self._turn()
        self._finish()
        return 0

    def _container(self, spec: ContainerSpec) -> _Container:
        path = os.path.join(self.spec.log.dir, f"{spec.name}.log")
        writer = RotatingWriter(path, self.spec.log.max_size, self.spec.log.max_files)
        relpath = f"{self.spec.cgroup_parent}/{spec.name}"
        return _Container(spec, Cgroup(relpath, self.layout) if self.layout.available else None, writer)

    def _install_signals(self) -> None:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        self.sel.register(wake_r, selectors.EVENT_READ, None)
        watched = (*procs.STOP_SIGNALS, signal.SIGCHLD)
        for sig in watched:
            signal.signal(sig, lambda signum, _frame: self.signals.add(signum))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, watched)  # the spawner may have blocked them

    def _turn(self) -> None:
        for key, _events in self.sel.select(self._timeout()):
            if key.data is None:
                procs.drain_nonblocking(key.fd)
            else:
                self._pump(key.fd, key.data)
        if self.state == "running" and self.signals & set(procs.STOP_SIGNALS):
            self._begin_stop()
        self.signals.clear()
        self._reap()
        now = time.monotonic()
        for c in self.containers:
            if c.restart_due is not None and c.restart_due <= now:
                self._start(c)
        if self.kill_at is not None and self.kill_at <= now:
            self.kill_at = now + _KILL_SWEEP
            self._kill_everything()

    def _timeout(self) -> float | None:
        dues = [c.restart_due for c in self.containers if c.restart_due is not None]
        if self.kill_at is not None:
            dues.append(self.kill_at)
        return max(0.0, min(dues) - time.monotonic()) if dues else None

    def _start(self, c: _Container) -> None:
        c.restart_due = c.next_restart_at = None
        try:
            self._prepare_cgroup(c)
        except RikletError as exc:
            self._ended(c, Termination(None, None, Reason.CGROUPS_UNAVAILABLE, str(exc)))
            return
        self.children = True
        c.starts += 1
        c.started_mono, c.started_at = time.monotonic(), None
        try:
            pid, out, c.start_error = procs.launch(c.spec, c.cgroup)
        except (OSError, RikletError) as exc:
            self._ended(c, Termination(128, None, Reason.START_ERROR, str(exc)))
            return
        self.sel.register(out, selectors.EVENT_READ, c)
        self.by_pid[pid] = c
        c.pid, c.pid_start, c.out = pid, shimctl.proc_start_time(pid), out
        if c.start_error is None:
            c.state, c.end, c.started_at = "running", None, time.time()
            self._write_status()

    def _prepare_cgroup(self, c: _Container) -> None:
        if c.cgroup is None:
            if c.spec.cpu_millis is not None or c.spec.memory_bytes is not None:
                raise Unavailable("no writable cgroup hierarchy for the limits asked", "cgroup")
            return
        c.cgroup.create()
        c.cgroup.set_limits(c.spec.cpu_millis, c.spec.memory_bytes)
        c.oom_before = c.cgroup.usage().oom_kills

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children = False
                return
            if pid == 0:
                return
            c = self.by_pid.pop(pid, None)
            if c is not None:
                self._exited(c, pid, status)

    def _exited(self, c: _Container, pid: int, status: int) -> None:
        oom = False
        if c.cgroup is not None:
            with _logged("reading oom_kill"):
                oom = c.cgroup.usage().oom_kills > c.oom_before
        end = c.start_error or shimctl.classify(status, oom)
        if c.out is not None and c.out in self.sel.get_map():
            # what the process wrote before it died is in the pipe (at most _PIPE_SIZE, one
            # pump's worth): log it before reporting the exit
            self._pump(c.out, c)
        # the container is over with its main process, as in a pid namespace: no leftovers
        procs.kill_group(pid, signal.SIGKILL)
        if c.cgroup is not None:
            with _logged("killing leftovers"):
                c.cgroup.kill_all(signal.SIGKILL)
        self._ended(c, end)

    def _ended(self, c: _Container, end: Termination) -> None:
        c.state, c.end, c.last, c.pid, c.pid_start = "terminated", end, end, None, None
        c.last_started = c.started_at
        c.finished_at = time.time()
        if self.state == "running" and shimctl.should_restart(c.spec.restart_policy, end):
            ran_for = time.monotonic() - c.started_mono
            c.delay = shimctl.next_delay(c.delay, ran_for, self.spec.backoff)
            c.restart_due = time.monotonic() + c.delay
            c.next_restart_at = c.finished_at + c.delay
            c.state = "waiting"  # end stays: a back-off shows why it is waiting
        self._write_status()

    def _begin_stop(self) -> None:
        _LOG.info("stopping pod", extra={"pod": self.spec.pod, "grace": self.spec.grace_period})
        self.state = "stopping"
        for c in self.containers:
            c.restart_due = c.next_restart_at = None
            if c.pid is not None:
                procs.kill_group(c.pid, signal.SIGTERM)
            elif c.state == "waiting" and c.end is not None:
                c.state = "terminated"
        self.kill_at = time.monotonic() + self.spec.grace_period
        self._write_status()

    def _kill_everything(self) -> None:
        for c in self.containers:
            if c.pid is not None:
                procs.kill_group(c.pid, signal.SIGKILL)
            if c.cgroup is not None:
                with _logged("killing the cgroup"):
                    c.cgroup.kill_all(signal.SIGKILL)
        # without cgroups, a process that left its group is still the shim's descendant
        for pid in procs.descendants(os.getpid()):
            procs.kill_pid(pid)

    def _pump(self, fd: int, c: _Container) -> bool:
        """Copy output to the log; False once the pipe is at EOF (and closed) or empty for now."""
        for _ in range(_READS_PER_TURN):
            try:
                data = os.read(fd, _READ_CHUNK)
            except BlockingIOError:
                return False
            if not data:
                self.sel.unregister(fd)
                os.close(fd)
                if c.out == fd:
                    c.out = None  # the number may soon name another pipe
                return False
            try:
                c.writer.write(data)
            except Unavailable as exc:
                if not c.log_broken:  # once: a full disk would otherwise flood shim.log
                    _LOG.error("container log lost", extra={"container": c.spec.name, "error": str(exc)})
                c.log_broken = True
        return True

    def _drain_log(self, fd: int, c: _Container) -> None:
        while self._pump(fd, c):
            pass
        if fd in self.sel.get_map():  # a writer outside the pod still holds the pipe: give up on it
            self.sel.unregister(fd)
            os.close(fd)
            c.out = None if c.out == fd else c.out

    def _finish(self) -> None:
        for key in list(self.sel.get_map().values()):
            if key.data is not None:
                self._drain_log(key.fd, key.data)
        for c in self.containers:
            c.writer.close()
        self._remove_cgroups()
        self.state = "exited"
        self._write_status()
        _LOG.info("pod stopped", extra={"pod": self.spec.pod})

    def _remove_cgroups(self) -> None:
        if not self.layout.available:
            return
        with _logged("removing cgroups"):
            for c in self.containers:
                if c.cgroup is not None:
                    c.cgroup.remove()
            Cgroup(self.spec.cgroup_parent, self.layout).remove()

    def _write_status(self) -> None:
        status = {
            "shim_pid": os.getpid(),
            "shim_start": self.start_time,
            "pod": self.spec.pod,
            "uid": self.spec.uid,
            "state": self.state,
            "updated_at": time.time(),
            "containers": [c.to_json() for c in self.containers],
        }
        try:
            shimctl.write_json(os.path.join(self.pod_dir, shimctl.STATUS_FILE), status)
        except OSError as exc:
            _LOG.error("cannot write status", extra={"error": str(exc)})
        if self.events is not None and self.spec.notify:
            # never waits: a manager that is away or behind learns it from the file later
            with suppress(OSError):
                self.events.sendto(self.spec.pod.encode(), socket.MSG_DONTWAIT, self.spec.notify)


@contextmanager
def _logged(what: str) -> Iterator[None]:
    """Log and swallow a riklet error in a best-effort step: the shim must go on."""
    try:
        yield
    except RikletError as exc:
        _LOG.warning(what + " failed", extra={"error": str(exc)})


def _private_shm(spec: PodSpec) -> None:
    """The pod's own /dev/shm, as large as its memory limit (tmpfs pages count against the
    writer's memory cgroup anyway); without one (not root), the host's, and a warning."""
    limits = [c.memory_bytes for c in spec.containers]
    size = sum(x for x in limits if x) if all(limits) else None
    try:
        procs.private_shm(size)
    except RikletError as exc:
        _LOG.warning("no private /dev/shm: the pod shares the host's", extra={"error": str(exc)})


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    detach = args[:1] == ["--detach"]
    args = args[1:] if detach else args
    if len(args) != 1:
        print("usage: riklet-shim [--detach] POD_DIR", file=sys.stderr)
        return 2
    pod_dir = os.path.abspath(args[0])
    log.setup("riklet-shim")
    try:
        spec = shimctl.load_spec(pod_dir)
    except RikletError as exc:
        print(f"riklet-shim: bad spec in {pod_dir}: {exc}", file=sys.stderr)
        return 2
    if detach:
        _detach()
    try:
        procs.become_subreaper()
        _private_shm(spec)
        return Shim(pod_dir, spec, detect()).run()
    except RikletError as exc:
        _LOG.error("shim failed", extra={"error": str(exc)})
        return 1


if __name__ == "__main__":
    sys.exit(main())
