"""A pod event: what happened to a pod, when and why (Kubernetes' Event, kept small).

Spelled once here for every service: the manager records them, memory keeps them (a bounded
history per pod, see ``services/memory/eventlog.py``), the Node API and ``rikletctl events``
show them. ``seq`` is memory's number for the event (0 until memory has stored it); events of a
node are ordered by it.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace
from typing import Any

from common.errors import InvalidArgument, bounded

NORMAL, WARNING = "Normal", "Warning"
TYPES = (NORMAL, WARNING)
MAX_MESSAGE = 1024          # UTF-8 bytes of a message; longer ones are cut by :func:`make`
MAX_REASON = 64
MAX_UID = 128

_REASON_RE = re.compile(r"[A-Z][A-Za-z0-9]*")
_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


@dataclass(frozen=True)
class PodEvent:
    pod: str
    reason: str                 # CamelCase: Scheduled, Started, BackOff, OOMKilled, Deleted...
    message: str
    time: float                 # unix seconds
    type: str = NORMAL          # Normal or Warning
    uid: str = ""
    container: str = ""         # "" when the event is about the whole pod
    count: int = 1
    seq: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def stored(self, seq: int) -> PodEvent:
        return replace(self, seq=seq)


def make(pod: str, reason: str, message: str, time: float, *, type: str = NORMAL,
         uid: str | None = None, container: str | None = None) -> PodEvent:
    """An event from the manager's own code: the message is cut to :data:`MAX_MESSAGE`."""
    return PodEvent(pod=pod, reason=reason, message=bounded(message, MAX_MESSAGE), time=time,
                    type=type, uid=uid or "", container=container or "")


def _text(value: object, field: str, limit: int, pattern: re.Pattern[str] | None = None,
          empty: bool = False) -> str:
    if not isinstance(value, str) or len(value.encode()) > limit or (not value and not empty) or (
            value and pattern is not None and not pattern.fullmatch(value)):
        what = "a DNS label" if pattern is _NAME_RE else "CamelCase" if pattern is _REASON_RE else "a string"
        raise InvalidArgument(f"must be {what} of at most {limit} bytes", field)
    return value


def check_pod(value: object, field: str) -> str:
    """A pod name as events name it (a DNS label)."""
    return _text(value, field, 63, _NAME_RE)


def parse(data: object, field: str) -> PodEvent:
    """An event from outside (an IPC frame): every field checked, the first bad one named."""
    if not isinstance(data, dict):
        raise InvalidArgument("must be an object", field)
    known = {"pod", "reason", "message", "time", "type", "uid", "container", "count", "seq"}
    for key in data:
        if key not in known:
            raise InvalidArgument("unknown field", f"{field}.{str(key)[:32]}")
    at = data.get("time")
    if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at) or at < 0:
        raise InvalidArgument("must be a time in unix seconds", f"{field}.time")
    count = data.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or not 0 < count < 2**31:
        raise InvalidArgument("must be a positive integer", f"{field}.count")
    kind = data.get("type", NORMAL)
    if kind not in TYPES:
        raise InvalidArgument(f"must be one of {', '.join(TYPES)}", f"{field}.type")
    return PodEvent(
        pod=_text(data.get("pod"), f"{field}.pod", 63, _NAME_RE),
        reason=_text(data.get("reason"), f"{field}.reason", MAX_REASON, _REASON_RE),
        message=_text(data.get("message", ""), f"{field}.message", MAX_MESSAGE, empty=True),
        time=float(at), type=str(kind),
        uid=_text(data.get("uid", ""), f"{field}.uid", MAX_UID, empty=True),
        container=_text(data.get("container", ""), f"{field}.container", 63, _NAME_RE, empty=True),
        count=count)
