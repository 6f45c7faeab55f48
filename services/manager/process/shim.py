"""Starting a pod's shim, the compiled ``riklet-shim`` (shim.c), which outlives the manager.

The manager calls :func:`spawn` with the pod's spec, which validates it, prepares the cgroups
and runs the shim with the spec on its stdin (``shim.spec``'s format); the shim reports through
``POD_DIR/status.json`` (formats in :mod:`.shimctl`) and stops the pod on SIGTERM
(:func:`stop`). Files and signals are the whole protocol, so either side can restart without
the other.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import subprocess
import threading
import time
from typing import Any

from common.cgroups import Cgroup, Layout, detect
from common.errors import RikletError, Unavailable
from services.manager.process import shimctl
from services.manager.process.shimctl import ContainerSpec, PodSpec, pid_alive, read_status, stop
from services.manager.process.shimspec import ContainerGroups, encode

__all__ = ["SPAWN_DEADLINE", "ShimServer", "pid_alive", "read_status", "spawn", "stop"]

SPAWN_DEADLINE = 5.0


class ShimServer:
    """``riklet-shim --serve``, started on first use: it forks each pod's shim, so that a pod
    costs a fork of a small process instead of a program start (exec, the dynamic loader,
    libc's start-up). Thread-safe; a server that died is started again on the next spawn. It
    ends when this object closes, or with this process: its shims go on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def request(self, pod_dir: str, spec_r: int, answer_w: int) -> None:
        """Hand a request to the server: the pod directory, the spec's pipe and the answer's."""
        message = os.fsencode(pod_dir)
        with self._lock:
            for attempt in (1, 2):
                sock = self._sock if self._proc is not None and self._proc.poll() is None else None
                if sock is None:
                    sock = self._start()
                try:
                    socket.send_fds(sock, [message], [spec_r, answer_w])
                    return
                except OSError as exc:
                    self._stop()
                    if attempt == 2:
                        raise Unavailable(f"the shim server refused a request: {exc.strerror}",
                                          "shim") from exc

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _start(self) -> socket.socket:
        from services.manager.process import build

        binary = build.ensure()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen([binary, "--serve"], stdin=theirs.fileno(),
                                          stdout=subprocess.DEVNULL, close_fds=True)
        except OSError as exc:
            ours.close()
            raise Unavailable(f"cannot run {binary}: {exc.strerror}", "shim") from exc
        finally:
            theirs.close()
        self._sock = ours
        return ours

    def _stop(self) -> None:
        if self._sock is not None:
            self._sock.close()   # the server reads the end of its socket and exits
            self._sock = None
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=SPAWN_DEADLINE)
            self._proc = None


def spawn(pod_dir: str, layout: Layout | None = None, spec: dict[str, Any] | None = None,
          driver: dict[str, Any] | None = None, server: ShimServer | None = None) -> int:
    """Start the shim for POD_DIR, detached (an orphan in its own session); its pid.

    ``spec``: the pod spec (:func:`shimctl.parse_spec`'s input); None reads POD_DIR/spec.json.
    The shim gets it, with the cgroups prepared here, on its stdin: no file is written for it
    (each file made and replaced costs an inode, which a busy node feels).

    Returns once every container has been started once (exec succeeded or failed) and the
    first status.json is written. One fork+exec of a small program (with ``server``, a fork of
    the server): safe from a threaded server, and nothing to poll. ``layout``: the cgroup
    hierarchies to use (default: detected).
    ``driver``: the caller's facts about the pod, kept by the shim in status.json's "driver".
    ``server``: fork the shim from this fork-server rather than run the program.
    """
    pod_dir = os.path.abspath(pod_dir)
    # a bad spec fails here, in the caller, not in a detached process
    parsed = shimctl.load_spec(pod_dir) if spec is None else shimctl.parse_spec(spec)
    # imported here: `python -m ...process.build` must not find itself imported by the package
    from services.manager.process import build

    binary = build.ensure()
    layout = detect() if layout is None else layout
    os.makedirs(parsed.log.dir, exist_ok=True)
    groups = [_prepare(parsed, c, layout) for c in parsed.containers]
    pod_dirs = Cgroup(parsed.cgroup_parent, layout).dirs() if layout.available else []
    path = os.environ.get("PATH", os.defpath)
    data = encode(parsed, groups, pod_dirs, path, driver)
    if server is not None:
        return _through(server, pod_dir, data)
    try:
        run = subprocess.run([binary, pod_dir], input=data,
                             capture_output=True, close_fds=True, timeout=SPAWN_DEADLINE, check=False)
    except subprocess.TimeoutExpired:
        # its spawner killed, the shim finds the pipe closed and stops the pod itself
        raise Unavailable(f"the shim did not start within {SPAWN_DEADLINE:g} s", "shim") from None
    except OSError as exc:
        raise Unavailable(f"cannot run {binary}: {exc.strerror}", "shim") from exc
    out = run.stdout.strip()
    if run.returncode != 0 or not out.isdigit():
        reason = run.stderr.decode(errors="replace").strip() or f"exit status {run.returncode}"
        raise Unavailable(f"could not start the shim: {reason}", "shim")
    return int(out)


def _through(server: ShimServer, pod_dir: str, data: bytes) -> int:
    """Spawn through the fork-server: the spec goes down one pipe, the shim's word ("ok", or
    why it failed) comes up another; the pid is the one its first status.json records."""
    spec_r, spec_w = os.pipe2(os.O_CLOEXEC)
    answer_r, answer_w = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            server.request(pod_dir, spec_r, answer_w)
        finally:
            os.close(spec_r)
            os.close(answer_w)   # from here, the answer's end is the shim's alone
        _write_all(spec_w, data)
        os.close(spec_w)
        spec_w = -1
        word = _answer(answer_r, time.monotonic() + SPAWN_DEADLINE)
    finally:
        if spec_w >= 0:
            os.close(spec_w)
        os.close(answer_r)   # a shim that has not answered by now finds it closed and stops
    if word != b"ok":
        reason = word.decode(errors="replace").strip() or "the shim exited at start (see shim.log)"
        raise Unavailable(f"could not start the shim: {reason}", "shim")
    status = read_status(pod_dir) or {}
    return int(status.get("shim_pid") or 0)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    with contextlib.suppress(BrokenPipeError):   # a shim that died early says why in its answer
        while view:
            view = view[os.write(fd, view):]


def _answer(fd: int, deadline: float) -> bytes:
    """Everything written to fd until its writers close it, or Unavailable past the deadline."""
    got = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while len(got) < 4096:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise Unavailable(f"the shim did not start within {SPAWN_DEADLINE:g} s", "shim")
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            got += chunk
    return got


def _prepare(spec: PodSpec, c: ContainerSpec, layout: Layout) -> ContainerGroups:
    """The container's cgroups, made and limited; without a usable hierarchy, limits asked end
    the container as CgroupsUnavailable (and it is not restarted: it would meet the same
    machine)."""
    if not layout.available:
        if c.cpu_millis is not None or c.memory_bytes is not None:
            error = Unavailable("no writable cgroup hierarchy for the limits asked", "cgroup")
            return ContainerGroups(error=str(error))
        return ContainerGroups()
    group = Cgroup(f"{spec.cgroup_parent}/{c.name}", layout)
    try:
        # A group made now has no limit: writing "none" to each controller would only cost
        # a handful of cgroupfs writes per pod. One left by an earlier run is reset.
        if not group.create() or c.cpu_millis is not None or c.memory_bytes is not None:
            group.set_limits(c.cpu_millis, c.memory_bytes)
    except RikletError as exc:
        return ContainerGroups(group.relpath, error=str(exc))
    return ContainerGroups(group.relpath, tuple(group.dirs()), group.freezer_state(), group.oom_counter())
