"""Operating-system calls of the shim, in one place: fork and exec a workload into its cgroup,
signal process groups, find descendants, become a child subreaper, give the pod a /dev/shm of
its own."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
from contextlib import suppress
from typing import NoReturn

from common.cgroups import Cgroup
from common.errors import Unavailable
from services.manager.process import shimctl
from services.manager.process.shimctl import ContainerSpec, Reason, Termination

_PR_SET_CHILD_SUBREAPER = 36
_CLONE_NEWNS = 0x00020000
_MS_NOSUID, _MS_NODEV, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x4000, 0x40000
SHM = "/dev/shm"
PIPE_SIZE = 1 << 20  # a burst of output fits in the pipe while the shim is busy elsewhere
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def launch(spec: ContainerSpec, cgroup: Cgroup | None) -> tuple[int, int, Termination | None]:
    """Fork the workload into its own process group and cgroup, then exec it.

    The child waits on a pipe until the parent has placed it in the cgroup, so none of the
    workload runs outside its limits. Returns the pid, the read end of its output pipe, and the
    reason exec did not happen, if it did not.
    """
    env = dict(spec.env)
    env.setdefault("PATH", os.environ.get("PATH", os.defpath))
    out_r, out_w = os.pipe()
    go_r, go_w = os.pipe()
    err_r, err_w = os.pipe()
    with suppress(OSError):  # a bigger pipe only absorbs bursts; the default still works
        fcntl.fcntl(out_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    try:
        pid = os.fork()
        if pid == 0:
            _exec_child(spec, env, out_w, go_r, err_w)
    except OSError:
        for fd in (out_r, go_w, err_r):
            os.close(fd)
        raise
    finally:
        for fd in (out_w, go_r, err_w):
            os.close(fd)
    try:
        try:
            os.setpgid(pid, pid)  # the child does it too; whoever runs first, the group exists now
            if cgroup is not None:
                cgroup.add(pid)
            os.write(go_w, b"g")
        finally:
            os.close(go_w)  # without the go byte, the child exits at once
        report = read_all(err_r)  # EOF without a word: exec closed the pipe
    except BaseException:
        os.close(out_r)
        raise
    finally:
        os.close(err_r)
    os.set_blocking(out_r, False)
    if not report:
        return pid, out_r, None
    code, _, message = report.decode(errors="replace").partition(" ")
    return pid, out_r, Termination(int(code), None, Reason.START_ERROR, message)


def _exec_child(spec: ContainerSpec, env: dict[str, str], out: int, go: int, err: int) -> NoReturn:
    stage = spec.command[0]
    try:
        if os.read(go, 1) != b"g":
            os._exit(1)  # the parent gave up on this start
        os.setpgid(0, 0)
        signal.set_wakeup_fd(-1)
        for sig in (*STOP_SIGNALS, signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)  # ignored signals would stay ignored across exec
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        if spec.user is not None and os.getuid() == 0 and spec.user != (0, 0):
            stage = f"user {spec.user[0]}:{spec.user[1]}"
            os.setgroups([])
            os.setgid(spec.user[1])
            os.setuid(spec.user[0])
        if spec.working_dir:
            stage = f"working_dir {spec.working_dir}"
            os.chdir(spec.working_dir)
        stage = spec.command[0]
        os.execvpe(spec.command[0], list(spec.command), env)
    except OSError as exc:
        code = 127 if exc.errno == errno.ENOENT else 126
        os.write(err, f"{code} {stage}: {exc.strerror}".encode())
        os._exit(code)
    finally:
        os._exit(1)


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks)


def drain_nonblocking(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        return


def kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return  # the group is already empty


def kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        fields = shimctl.proc_stat(int(name)) if name.isdigit() else None
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def private_shm(size_bytes: int | None) -> None:
    """Move this process into a mount namespace of its own with a fresh tmpfs on /dev/shm
    (``size_bytes``: its size; None: the kernel's default, half the memory). The workloads
    forked after this share it; it goes away with the last of them and the shim, so what a pod
    leaves in /dev/shm never outlives it. Must run before any thread is started."""
    libc = ctypes.CDLL(None, use_errno=True)
    _check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    # Private first: otherwise the tmpfs would propagate back to the host's /dev/shm.
    _check(libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate /")
    options = "mode=1777" + (f",size={size_bytes}" if size_bytes else "")
    _check(libc.mount(b"shm", SHM.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, options.encode()),
           f"mount tmpfs on {SHM}")


def _check(result: int, what: str) -> None:
    if result != 0:
        raise Unavailable(f"{what}: {os.strerror(ctypes.get_errno())}", "shim")


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise Unavailable(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}", "shim")
