"""riklet-proxy's keeper: the process supervisord runs as program ``proxy``.

It starts the worker (``python -m services.proxy --worker``, the data path) and starts another
the moment it exits, without waiting for supervisord's next poll; only when workers keep dying
within 10 s of their start (a crash loop) does it wait between them, 0.1 s doubling up to 5 s.
On SIGTERM or SIGINT it passes SIGTERM to its worker and exits at once, without waiting: the
worker serves on for a few seconds so that the next keeper's worker can take its listening
sockets over (services.proxy.handoff) and restarts lose no connection.

Only the standard library and riklet's config and logging are imported here, so the keeper
starts fast; the worker imports the rest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType

log = logging.getLogger("services.proxy.keeper")

BACKOFF_INITIAL = 0.1
BACKOFF_MAX = 5.0
HEALTHY_AFTER = 10.0


class Backoff:
    """The delay before the next worker. The first exit after a healthy run (or the first
    ever) restarts at once; further quick exits (a crash loop: each worker ran less than
    ``healthy_after``) wait ``initial``, doubling up to ``maximum``."""

    def __init__(self, initial: float = BACKOFF_INITIAL, maximum: float = BACKOFF_MAX,
                 healthy_after: float = HEALTHY_AFTER) -> None:
        self.initial, self.maximum, self.healthy_after = initial, maximum, healthy_after
        self._next = 0.0

    def after(self, ran: float) -> float:
        """The delay after a worker that ran ``ran`` seconds."""
        if ran >= self.healthy_after:
            self._next = 0.0
        delay = self._next
        self._next = min(self._next * 2, self.maximum) if self._next else self.initial
        return delay


def worker_command(argv: Sequence[str], keeper_pid: int) -> list[str]:
    return [sys.executable, "-m", "services.proxy", "--worker", "--keeper-pid", str(keeper_pid),
            *argv]


class Keeper:
    def __init__(self, command: list[str], backoff: Backoff | None = None,
                 spawn: Callable[[list[str]], subprocess.Popen[bytes]] | None = None) -> None:
        self.command = command
        self.backoff = backoff or Backoff()
        self._spawn = spawn or (lambda cmd: subprocess.Popen(cmd))
        self.worker: subprocess.Popen[bytes] | None = None
        self.stopping: str | None = None     # the signal that asked us to stop
        self._wake_r = self._wake_w = -1

    def run(self) -> int:
        """Keep a worker running until SIGTERM or SIGINT; returns the exit status (0)."""
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            while self.stopping is None:
                started = time.monotonic()
                try:
                    self.worker = self._spawn(self.command)
                except OSError as exc:
                    log.error("cannot start the worker", extra={"error": str(exc)})
                    self._pause(self.backoff.after(0.0))
                    continue
                log.info("worker started", extra={"worker_pid": self.worker.pid})
                status = self._wait(self.worker)
                if status is None:    # asked to stop
                    break
                ran = time.monotonic() - started
                delay = self.backoff.after(ran)
                log.warning("worker exited; starting another", extra={
                    "worker_pid": self.worker.pid, "status": status, "ran_s": round(ran, 3),
                    "delay_s": delay})
                self.worker = None
                self._pause(delay)
        finally:
            signal.set_wakeup_fd(-1)
        self._stop_worker()
        return 0

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self.stopping = signal.Signals(sig).name

    def _stop_worker(self) -> None:
        worker = self.worker
        if worker is not None and worker.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                worker.send_signal(signal.SIGTERM)
            log.info("keeper stopping; worker told to stop", extra={
                "signal": self.stopping, "worker_pid": worker.pid})
        else:
            log.info("keeper stopping", extra={"signal": self.stopping})

    def _wait(self, proc: subprocess.Popen[bytes]) -> int | None:
        """The worker's exit status, or None once we are asked to stop (it still runs)."""
        try:
            pidfd: int | None = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):    # an old kernel: poll instead
            pidfd = None
        try:
            while self.stopping is None:
                status = proc.poll()
                if status is not None:
                    return status
                watched = [self._wake_r] if pidfd is None else [self._wake_r, pidfd]
                ready, _, _ = select.select(watched, [], [], None if pidfd is not None else 0.05)
                if self._wake_r in ready:
                    self._drain_wakeups()
            return None
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def _pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.stopping is None and (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self._wake_r], [], [], left)
            if ready:
                self._drain_wakeups()

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            os.set_blocking(self._wake_r, False)
            os.read(self._wake_r, 512)


def main(argv: Sequence[str]) -> int:
    """``argv``: the keeper's own arguments, passed on to every worker."""
    log.info("keeper started", extra={"python": sys.executable})
    return Keeper(worker_command(argv, os.getpid())).run()
