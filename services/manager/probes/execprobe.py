"""Exec probes: the probe's command run exactly as ``rikletctl exec`` runs one (the container's
namespaces, cgroup, user and environment; containerd's exec for an image pod), without stdin or
a terminal, bounded by the probe's timeout. Blocking: the prober runs it on a worker thread."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

from common.errors import RikletError, Timeout

MAX_OUTPUT = 10 * 1024     # of the command's output kept for the probe's message


class _Proc(Protocol):
    stdout: int
    stderr: int | None

    def kill(self) -> None: ...
    def release(self) -> None: ...


def _drain(fds: list[int], out: bytearray) -> None:
    for fd in fds:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except (BlockingIOError, OSError):
                break
            if not chunk:
                break
            if len(out) < MAX_OUTPUT:
                out.extend(chunk[:MAX_OUTPUT - len(out)])


def run(start: Callable[[], Any], wait: Callable[[Any, float], int | None],
        timeout: float) -> tuple[int, bytes]:
    """Start the command (``start()``), wait for it at most ``timeout`` seconds (``wait(proc,
    seconds)`` gives its exit code, or None when it is still running), kill it beyond."""
    deadline = time.monotonic() + timeout
    proc: _Proc = start()
    out = bytearray()
    try:
        fds = [fd for fd in (proc.stdout, proc.stderr) if fd is not None]
        for fd in fds:
            os.set_blocking(fd, False)
        code = wait(proc, max(0.0, deadline - time.monotonic()))
        _drain(fds, out)
        if code is None:
            proc.kill()
            raise Timeout(f"timed out after {timeout:g}s", "exec")
        return code, bytes(out)
    finally:
        with contextlib.suppress(OSError, RikletError):
            proc.release()


def wait_popen(proc: Any, seconds: float) -> int | None:
    """A process pod's exec (a Popen underneath)."""
    import subprocess
    try:
        code = int(proc.proc.wait(timeout=seconds))
    except subprocess.TimeoutExpired:
        return None
    return 128 - code if code < 0 else code


def wait_containerd(proc: Any, seconds: float) -> int | None:
    """A containerd exec: its Wait, bounded."""
    try:
        return int(proc.wait(timeout=max(seconds, 0.05)))
    except RikletError:
        return None
