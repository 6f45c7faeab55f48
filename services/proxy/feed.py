"""A mirror of memory's pods for the proxy: one snapshot, then events, re-synchronised on any doubt.

Memory publishes ``pod.<name>.<kind>`` events numbered by ``seq`` and a ``hb`` heartbeat
``{"seq", "epoch"}`` every second. The mirror subscribes first and snapshots second, so no
event falls between the two; events up to the snapshot's ``seq`` are then skipped. A gap in the
numbering, a heartbeat ahead of what was applied or a new epoch (memory restarted) means
something was missed: take a new snapshot. While memory cannot be reached the last known pods
stay in force: losing the control plane must not cut traffic.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any

import zmq

from common import ipc
from common.config import Config
from common.errors import BadFrame, RikletError
from common.zmqutil import RequestClient

log = logging.getLogger(__name__)

SNAPSHOT_TIMEOUT = 2.0
RETRY_INTERVAL = 0.5
POLL_MS = 200
MAX_BATCH = 1000     # events applied before on_pods is called once for all of them
SILENCE = 3.0        # no heartbeat for this long: say so (routes are kept regardless)


class Outcome(Enum):
    IGNORED = "ignored"
    CHANGED = "changed"
    RESYNC = "resync"


class PodMirror:
    """The pods as of sequence number ``seq``; pure, so the ordering rules are tested directly."""

    def __init__(self) -> None:
        self.pods: dict[str, dict[str, Any]] = {}
        self.seq = -1
        self.epoch: str | None = None
        self.synced = False

    def records(self) -> list[dict[str, Any]]:
        return list(self.pods.values())

    def load(self, snapshot: object) -> None:
        """Replace everything with a ``snapshot`` reply; raises BadFrame if it is malformed."""
        if not isinstance(snapshot, Mapping):
            raise BadFrame("snapshot is not an object", "result")
        seq, epoch, pods = snapshot.get("seq"), snapshot.get("epoch"), snapshot.get("pods")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise BadFrame("must be a non-negative integer", "result.seq")
        if not isinstance(epoch, str):
            raise BadFrame("must be a string", "result.epoch")
        if not isinstance(pods, list):
            raise BadFrame("must be a list", "result.pods")
        by_name: dict[str, dict[str, Any]] = {}
        for i, pod in enumerate(pods):
            if not isinstance(pod, dict) or not isinstance(pod.get("name"), str):
                raise BadFrame("must be a pod record with a name", f"result.pods[{i}]")
            by_name[pod["name"]] = pod
        self.pods, self.seq, self.epoch, self.synced = by_name, seq, epoch, True

    def apply(self, ev: ipc.Event) -> Outcome:
        if not self.synced:
            return Outcome.IGNORED
        if ev.topic == "hb":
            seq, epoch = ev.data.get("seq"), ev.data.get("epoch")
            if not isinstance(seq, int) or not isinstance(epoch, str):
                log.warning("malformed heartbeat ignored", extra={"data": ev.data})
                return Outcome.IGNORED
            # A heartbeat behind us is legal (it may predate the snapshot); ahead is a loss.
            if epoch != self.epoch or seq > self.seq:
                return self._resync("heartbeat ahead" if epoch == self.epoch else "new epoch")
            return Outcome.IGNORED
        if ev.seq <= self.seq:
            return Outcome.IGNORED   # already part of the snapshot
        if ev.seq > self.seq + 1:
            return self._resync("gap in event numbers")
        self.seq = ev.seq
        if not ev.topic.startswith("pod."):
            return Outcome.IGNORED
        return self._apply_pod(ev.data)

    def _apply_pod(self, data: Mapping[str, Any]) -> Outcome:
        kind = data.get("kind")
        if kind == "removed":
            name, uid = data.get("name"), data.get("uid")
            current = self.pods.get(name) if isinstance(name, str) else None
            # A removal names the uid it removes: a newer pod of the same name stays.
            if current is None or (uid is not None and current.get("uid") not in (None, uid)):
                return Outcome.IGNORED
            del self.pods[current["name"]]
            return Outcome.CHANGED
        pod = data.get("pod")
        if kind not in ("applied", "status", "desired") or not isinstance(pod, dict) \
                or not isinstance(pod.get("name"), str):
            log.warning("pod event not understood, ignored", extra={"kind": kind})
            return Outcome.IGNORED
        if self.pods.get(pod["name"]) == pod:
            return Outcome.IGNORED
        self.pods[pod["name"]] = pod
        return Outcome.CHANGED

    def _resync(self, why: str) -> Outcome:
        log.info("re-synchronising with memory", extra={"reason": why, "seq": self.seq})
        self.synced = False
        return Outcome.RESYNC


def _snapshot(client: RequestClient, mirror: PodMirror) -> bool:
    try:
        mirror.load(client.call("snapshot"))
    except RikletError as exc:
        log.debug("snapshot failed", extra={"error": str(exc)})
        return False
    log.info("pods loaded from memory", extra={"pods": len(mirror.pods), "seq": mirror.seq,
                                               "epoch": mirror.epoch})
    return True


def _pump(sub: zmq.Socket[Any], mirror: PodMirror) -> tuple[bool, bool]:
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
    mirror, health = PodMirror(), _Health(cfg.memory_endpoint)
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
