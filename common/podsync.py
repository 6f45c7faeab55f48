"""The ordering rules of a mirror of memory's pods, with no I/O.

Memory publishes ``pod.<name>.<kind>`` events numbered by ``seq`` and a ``hb`` heartbeat
``{"seq", "epoch"}`` every 2 s. A mirror subscribes first and snapshots second, so no event
falls between the two; events up to the snapshot's ``seq`` are then skipped. A gap in the
numbering, a heartbeat ahead of what was applied or a new epoch (memory restarted) means
something was missed: take a new snapshot. Both the manager's mirror
(:class:`common.memclient.PodMirror`) and the proxy's feed (``services.proxy.feed``) follow
these rules through :class:`PodSequence`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any

from common import ipc
from common.errors import BadFrame

log = logging.getLogger(__name__)


_SHORT = 16   # string values up to this length are interned too (phases, states, names)


def compact(value: Any) -> Any:
    """``value`` with its dict keys and short strings interned: a mirror holds thousands of
    records that spell the same ~50 keys and a few values, and JSON decoding gives every
    record its own copy of each (about 40 % of a decoded record's memory)."""
    if isinstance(value, dict):
        return {sys.intern(k) if type(k) is str else k: compact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [compact(v) for v in value]
    if type(value) is str and len(value) <= _SHORT:
        return sys.intern(value)
    return value


class Outcome(Enum):
    IGNORED = "ignored"
    CHANGED = "changed"
    RESYNC = "resync"


class PodSequence:
    """The pods as of sequence number ``seq``; pure, so the ordering rules are tested directly.
    After an ``apply`` that returns CHANGED, ``last_change`` is (name, new record or None,
    the record it replaced or None)."""

    def __init__(self, keep: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        # What of each record is kept (default: all of it): a subscriber that needs only some
        # pods keeps the others as stubs, and changes to a stub that leave it equal are ignored.
        self._keep = keep
        self.pods: dict[str, dict[str, Any]] = {}
        self.seq = -1
        self.epoch: str | None = None
        self.synced = False
        self.last_change: tuple[str, dict[str, Any] | None, dict[str, Any] | None] | None = None

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
            by_name[pod["name"]] = self._kept(pod)
        self.pods, self.seq, self.epoch, self.synced = by_name, seq, epoch, True

    def apply(self, ev: ipc.Event) -> Outcome:
        if not self.synced:
            return Outcome.IGNORED
        if ev.topic == "hb":
            seq, epoch = ev.data.get("seq"), ev.data.get("epoch")
            if isinstance(seq, bool) or not isinstance(seq, int) or not isinstance(epoch, str):
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
            self.last_change = (current["name"], None, current)
            return Outcome.CHANGED
        pod = data.get("pod")
        if kind not in ("applied", "status", "desired") or not isinstance(pod, dict) \
                or not isinstance(pod.get("name"), str):
            log.warning("pod event not understood, ignored", extra={"kind": kind})
            return Outcome.IGNORED
        before = self.pods.get(pod["name"])
        pod = self._kept(pod)
        if before == pod:
            return Outcome.IGNORED
        self.pods[pod["name"]] = pod
        self.last_change = (pod["name"], pod, before)
        return Outcome.CHANGED

    def _kept(self, pod: dict[str, Any]) -> dict[str, Any]:
        kept: dict[str, Any] = compact(pod if self._keep is None else self._keep(pod))
        return kept

    def _resync(self, why: str) -> Outcome:
        log.info("re-synchronising with memory", extra={"reason": why, "seq": self.seq})
        self.synced = False
        return Outcome.RESYNC
