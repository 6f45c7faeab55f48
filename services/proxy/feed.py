"""The proxy's feed of memory's pods: one snapshot, then events, re-synchronised on any doubt
(the ordering rules are :mod:`common.podsync`'s). Unlike the manager's mirror it hands over the
whole set once per batch of events, since routes are computed from all pods at once. While
memory cannot be reached the last known pods stay in force: losing the control plane must not
cut traffic.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from common import ipc
from common.config import Config
from common.errors import BadFrame, RikletError
from common.podsync import Outcome, PodSequence
from common.zmqutil import RequestClient

log = logging.getLogger(__name__)

SNAPSHOT_TIMEOUT = 2.0
RETRY_INTERVAL = 0.5
POLL_MS = 200
MAX_BATCH = 1000     # events applied before on_pods is called once for all of them
SILENCE = 3.0        # no heartbeat for this long: say so (routes are kept regardless)


def _snapshot(client: RequestClient, mirror: PodSequence) -> bool:
    try:
        mirror.load(client.call("snapshot"))
    except RikletError as exc:
        log.debug("snapshot failed", extra={"error": str(exc)})
        return False
    log.info("pods loaded from memory", extra={"pods": len(mirror.pods), "seq": mirror.seq,
                                               "epoch": mirror.epoch})
    return True


def _pump(sub: zmq.Socket[Any], mirror: PodSequence) -> tuple[bool, bool]:
    """Apply the events that are waiting; returns (pods changed, anything received)."""
    if not sub.poll(POLL_MS, zmq.POLLIN):
        return False, False
    changed = False
    for _ in range(MAX_BATCH):
        try:
            frames = sub.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            break
        try:
            outcome = mirror.apply(ipc.decode_event(frames))
        except BadFrame as exc:
            log.warning("bad event from memory ignored", extra={"error": str(exc)})
            continue
        if outcome is Outcome.RESYNC:
            return False, True
        changed |= outcome is Outcome.CHANGED
    return changed, True


class _Health:
    """Says once when memory cannot be reached or goes quiet, and once when it is back."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.heard = time.monotonic()
        self.down = False

    def ok(self) -> None:
        if self.down:
            log.info("memory reachable again", extra={"endpoint": self.endpoint})
        self.heard, self.down = time.monotonic(), False

    def fail(self, what: str) -> None:
        if not self.down:
            log.warning(f"{what}; keeping the current routes", extra={"endpoint": self.endpoint})
        self.down = True

    def quiet(self) -> None:
        if time.monotonic() - self.heard > SILENCE:
            self.fail("no heartbeat from memory")


def watch_pods(cfg: Config, on_pods: Callable[[list[dict[str, Any]]], None], stop: threading.Event,
               *, context: zmq.Context[Any] | None = None) -> None:
    """Mirror memory's pods until ``stop`` is set, calling ``on_pods`` with the full current set
    after each change. Blocks: run it on a thread of its own."""
    ctx = context or zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(cfg.memory_events_endpoint)
    client = RequestClient(cfg.memory_endpoint, timeout=SNAPSHOT_TIMEOUT, retries=0, context=ctx)
    mirror, health = PodSequence(), _Health(cfg.memory_endpoint)
    try:
        while not stop.is_set():
            if not mirror.synced:
                if not _snapshot(client, mirror):
                    health.fail("memory unreachable")
                    stop.wait(RETRY_INTERVAL)
                    continue
                health.ok()
                on_pods(mirror.records())
            changed, received = _pump(sub, mirror)
            if received:
                health.ok()
            else:
                health.quiet()
            if changed:
                on_pods(mirror.records())
    finally:
        sub.close(linger=0)
        client.close()
