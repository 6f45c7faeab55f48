"""What the manager and the monitor share to speak the RIK worker protocol.

- phase -> ``common.ResourceStatus`` mapping and instance ids of scheduler-made pods;
- :class:`Backoff`: jittered exponential back-off, so a scheduler that is down is not flooded;
- :class:`StatusSender`: one long-lived ``SendStatusUpdates`` stream that reconnects by itself
  and calls ``on_connect`` after every (re)connection, so the caller can re-send what it knows.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import grpc

from common import pb
from common.pod import Desired, Phase, desired_of, phase_of, ready_of

pb.ensure()
from common.pb import rik_common_pb2 as cpb  # noqa: E402
from common.pb import rik_worker_pb2_grpc as wpb_grpc  # noqa: E402

log = logging.getLogger(__name__)

# A pod this worker holds but has not seen run yet is being created, as far as the scheduler
# is concerned: quick runtimes go from Pending straight to their first observed phase.
PHASE_STATUS = {
    Phase.PENDING: cpb.CREATING, Phase.CREATING: cpb.CREATING, Phase.RUNNING: cpb.RUNNING,
    Phase.ERROR: cpb.FAILED, Phase.TERMINATING: cpb.DESTROYING, Phase.TERMINATED: cpb.TERMINATED,
}
# A scheduler that vanishes without closing the connection (host down, network cut) is noticed
# by keepalive pings: 5.5 min apart, because gRPC C-core servers count pings closer than 5 min on
# a quiet stream as abuse and close the connection (which would drop the registration).
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 330_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.max_pings_without_data", 0),  # the Register stream never sends data after its request
)
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def status_of(record: Mapping[str, Any]) -> int:
    """The ResourceStatus a pod record reports. A pod whose deletion is asked for is DESTROYING
    at once, not only when the reconciler next writes a phase: the scheduler hears about its
    DESTROY right away, and every reporter (manager, monitor) says the same thing."""
    if desired_of(record) is Desired.DELETED:
        return int(cpb.DESTROYING)
    phase = phase_of(record)
    if phase is Phase.RUNNING and not ready_of(record):
        return int(cpb.CREATING)   # running but not ready (its probes): not serving yet
    return int(PHASE_STATUS[phase])


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


def describe(exc: Exception) -> str:
    """One line for a log: the status code and details of a failed call."""
    if isinstance(exc, grpc.Call):
        return f"{exc.code().name}: {exc.details() or ''}"[:200]
    return (str(exc) or type(exc).__name__)[:200]


def _status(value: int) -> cpb.ResourceStatus:
    # The generated stubs type enum fields as the enum class; its values are plain ints.
    return cast("cpb.ResourceStatus", value)


class StatusSender:
    """A client stream of WorkerStatus to the scheduler that survives scheduler restarts.

    ``send_*`` never block on the network. While the stream is up, messages queue (bounded; the
    oldest are dropped if the scheduler stops reading). While it is down, only the newest message
    per subject is kept (the node's metric, each instance's state): a scheduler coming back gets
    the current picture, not a burst of every tick it missed. ``on_connect`` runs after every
    (re)connection, so the owner can re-send what it knows.
    """

    def __init__(self, address: str, identifier: str, on_connect: Callable[[], None] | None = None,
                 maxsize: int = 10000, settle: float = 10.0) -> None:
        self.address = address
        self.identifier = identifier
        self.on_connect = on_connect
        self.settle = settle          # a stream that lived this long resets the back-off
        self._queue: queue.Queue[cpb.WorkerStatus | None] = queue.Queue(maxsize=maxsize)
        self._lock = threading.Lock()  # orders the switch between queueing and coalescing
        self._up = False
        self._pending: dict[str, cpb.WorkerStatus] = {}
        self._call: grpc.Future | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rik-status", daemon=True)
        self.connected = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._put(None)  # ends the client stream after what is queued, so the call returns
        self._thread.join(timeout=3)
        call = self._call
        if self._thread.is_alive() and call is not None:
            call.cancel()  # a scheduler that does not answer the half-close
            self._thread.join(timeout=2)

    def send_instance(self, instance_id: str, status: int, metrics: str = "{}") -> None:
        self._send(f"instance/{instance_id}", cpb.WorkerStatus(
            identifier=self.identifier,
            instance=cpb.InstanceMetric(status=_status(status), metrics=metrics, instance_id=instance_id)))

    def send_worker(self, status: int, metrics: str) -> None:
        self._send("worker", cpb.WorkerStatus(
            identifier=self.identifier, worker=cpb.WorkerMetric(status=_status(status), metrics=metrics)))

    def _send(self, subject: str, message: cpb.WorkerStatus) -> None:
        with self._lock:
            if self._up:
                self._put(message)
                return
            self._pending.pop(subject, None)  # re-inserted last: pending keeps arrival order
            self._pending[subject] = message

    def _put(self, item: cpb.WorkerStatus | None) -> None:
        while True:
            try:
                self._queue.put_nowait(item)
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._queue.get_nowait()  # drop the oldest: current state is re-sent on connect

    def _messages(self, broken: threading.Event) -> Iterator[cpb.WorkerStatus]:
        # A message taken just as the stream breaks is lost with it; on_connect covers that.
        while not self._stop.is_set() and not broken.is_set():
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None:
                return
            yield item

    def _go_up(self) -> None:
        with self._lock:
            self._up = True
            for message in self._pending.values():
                self._put(message)
            self._pending.clear()
        self.connected.set()
        if self.on_connect is not None:
            try:
                self.on_connect()
            except Exception:  # the owner's bug must not end the status stream for good
                log.exception("on_connect failed")

    def _run(self) -> None:
        backoff = Backoff()
        down_logged = False
        while not self._stop.is_set():
            channel = grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
            broken = threading.Event()
            began: float | None = None
            try:
                grpc.channel_ready_future(channel).result(timeout=5)
                stub = wpb_grpc.WorkerStub(channel)
                call = self._call = stub.SendStatusUpdates.future(self._messages(broken))
                began = time.monotonic()
                if down_logged:
                    log.info("status stream to the scheduler is back", extra={"scheduler": self.address})
                down_logged = False
                self._go_up()
                call.result()  # returns when the scheduler ends the stream or it breaks
            except (grpc.RpcError, grpc.FutureTimeoutError, grpc.FutureCancelledError) as exc:
                if not down_logged and not self._stop.is_set():
                    log.warning("scheduler unreachable for status updates; retrying",
                                extra={"scheduler": self.address, "error": describe(exc)})
                    down_logged = True
            finally:
                broken.set()
                with self._lock:
                    self._up = False
                self.connected.clear()
                channel.close()
            # Only a stream that held resets the back-off: one the scheduler accepts and drops
            # at once must not turn into a reconnect loop at the base delay.
            if began is not None and time.monotonic() - began >= self.settle:
                backoff.reset()
            self._stop.wait(backoff.next())
