"""What the manager and the monitor share to speak the RIK worker protocol.

- phase -> ``common.ResourceStatus`` mapping and instance ids of scheduler-made pods;
- :class:`Backoff`: jittered exponential back-off, so a scheduler that is down is not flooded;
- :class:`StatusSender`: one long-lived ``SendStatusUpdates`` stream that reconnects by itself
  and calls ``on_connect`` after every (re)connection, so the caller can re-send what it knows.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import random
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc

from common import pb

pb.ensure()
from common.pb import rik_common_pb2 as cpb  # noqa: E402
from common.pb import rik_worker_pb2_grpc as wpb_grpc  # noqa: E402

log = logging.getLogger(__name__)

PHASE_STATUS = {
    "Pending": cpb.PENDING, "Creating": cpb.CREATING, "Running": cpb.RUNNING, "Error": cpb.FAILED,
    "Terminating": cpb.DESTROYING, "Terminated": cpb.TERMINATED,
}
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def status_of(record: Mapping[str, Any]) -> int:
    """The ResourceStatus a pod record reports. A pod whose deletion is asked for is DESTROYING
    at once, not only when the reconciler next writes a phase: the scheduler hears about its
    DESTROY right away, and every reporter (manager, monitor) says the same thing."""
    if record.get("desired") == "deleted":
        return int(cpb.DESTROYING)
    phase = (record.get("status") or {}).get("phase", "Pending")
    return int(PHASE_STATUS.get(phase, cpb.UNKNOWN))


def instance_id_of(record: Mapping[str, Any]) -> str | None:
    """The scheduler's instance id of a pod it created (None for pods made on the node)."""
    value = (record.get("spec") or {}).get("instance_id")
    return value if isinstance(value, str) and value else None


def pod_name_for(instance_id: str) -> str:
    """A pod name (DNS label) for an instance id: the id itself when it is one, else a cleaned
    prefix plus a digest, so that two ids never share a pod."""
    if len(instance_id) <= 63 and _LABEL.fullmatch(instance_id):
        return instance_id
    cleaned = re.sub(r"[^a-z0-9-]+", "-", instance_id.lower()).strip("-")[:48].strip("-") or "instance"
    digest = hashlib.sha256(instance_id.encode()).hexdigest()[:10]
    return f"{cleaned}-{digest}"


class Backoff:
    """Delays of base * 2^n, capped, each drawn uniformly from [delay/2, delay] ("equal jitter")."""

    def __init__(self, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None) -> None:
        self.base, self.cap = base, cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        delay = min(self.cap, self.base * (2 ** self.attempt))
        self.attempt = min(self.attempt + 1, 32)
        return delay / 2 + self._rng.uniform(0, delay / 2)

    def reset(self) -> None:
        self.attempt = 0


