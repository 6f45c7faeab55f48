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
    """The ResourceStatus a pod record reports."""
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


class StatusSender:
    """A client stream of WorkerStatus to the scheduler that survives scheduler restarts.

    ``send`` never blocks on the network: messages queue (bounded; the oldest are dropped when
    the scheduler is away, since ``on_connect`` re-sends the current state anyway).
    """

    def __init__(self, address: str, identifier: str, on_connect: Callable[[], None] | None = None,
                 maxsize: int = 10000) -> None:
        self.address = address
        self.identifier = identifier
        self.on_connect = on_connect
        self._queue: queue.Queue[cpb.WorkerStatus | None] = queue.Queue(maxsize=maxsize)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rik-status", daemon=True)
        self.connected = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._put(None)
        self._thread.join(timeout=5)

    def send_instance(self, instance_id: str, status: int, metrics: str = "{}") -> None:
        self._put(cpb.WorkerStatus(identifier=self.identifier, instance=cpb.InstanceMetric(
            status=cpb.ResourceStatus.Name(status), metrics=metrics, instance_id=instance_id)))

    def send_worker(self, status: int, metrics: str) -> None:
        self._put(cpb.WorkerStatus(identifier=self.identifier,
                                   worker=cpb.WorkerMetric(status=cpb.ResourceStatus.Name(status),
                                                           metrics=metrics)))

    def _put(self, item: cpb.WorkerStatus | None) -> None:
        while True:
            try:
                self._queue.put_nowait(item)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()  # drop the oldest: current state is re-sent on connect
                except queue.Empty:
                    pass

    def _messages(self, broken: threading.Event) -> Iterator[cpb.WorkerStatus]:
        while not self._stop.is_set() and not broken.is_set():
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None:
                return
            yield item

    def _run(self) -> None:
        backoff = Backoff()
        down_logged = False
        while not self._stop.is_set():
            channel = grpc.insecure_channel(self.address)
            broken = threading.Event()
            try:
                grpc.channel_ready_future(channel).result(timeout=5)
                stub = wpb_grpc.WorkerStub(channel)
                call = stub.SendStatusUpdates.future(self._messages(broken))
                self.connected.set()
                if down_logged:
                    log.info("status stream to the scheduler is back", extra={"scheduler": self.address})
                down_logged = False
                backoff.reset()
                if self.on_connect is not None:
                    self.on_connect()
                call.result()  # returns when the scheduler ends the stream or it breaks
            except (grpc.RpcError, grpc.FutureTimeoutError) as exc:
                if not down_logged:
                    log.warning("scheduler unreachable for status updates; retrying",
                                extra={"scheduler": self.address, "error": str(exc)[:200]})
                    down_logged = True
            finally:
                broken.set()
                self.connected.clear()
                channel.close()
            self._stop.wait(backoff.next())
