"""The manager's pod event recorder: ``record()`` never blocks its caller; a background thread
writes what was recorded to memory in batches (one IPC round trip for every event waiting),
then hands each stored event, with memory's sequence number, to the live followers.

Bounds, so that neither a memory outage nor a slow client grows the manager without limit:
- at most ``max_queue`` events wait for memory; beyond that the oldest waiting are dropped
  (counted in ``dropped`` and logged);
- each follower has a queue of ``follower_queue`` events; a follower that falls that far behind
  is dropped: its stream ends with an error saying so (it lost nothing silently), and the
  client may follow again from the last sequence number it saw.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from common.errors import RikletError, Unavailable
from common.podevent import NORMAL, PodEvent, make

log = logging.getLogger(__name__)

MAX_QUEUE = 20000
MAX_BATCH = 500
FOLLOWER_QUEUE = 1000
LINGER = 0.1      # seconds the writer waits for more events before a write
RETRY_AFTER = 1.0      # seconds between writes while memory is unreachable


class Records(Protocol):
    """What the reconciler, the API and the runtimes need: somewhere to say what happened."""

    def record(self, pod: str, reason: str, message: str, *, type: str = NORMAL,
               uid: str | None = None, container: str | None = None, at: float | None = None) -> None:
        ...


class NullRecorder:
    """Records nothing: the default where no recorder is given (unit tests, tools)."""

    def record(self, pod: str, reason: str, message: str, *, type: str = NORMAL,
               uid: str | None = None, container: str | None = None, at: float | None = None) -> None:
        return None


class Follower:
    """One live stream's view of new events: :meth:`get` returns the next stored event, None
    once closed. ``overflowed`` says it was dropped for falling behind."""

    def __init__(self, pod: str | None, size: int) -> None:
        self.pod = pod
        self.overflowed = False
        self._queue: queue.Queue[PodEvent | None] = queue.Queue(maxsize=size)
        self._closed = False

    def offer(self, event: PodEvent) -> bool:
        """False when this follower is done (closed or just dropped for falling behind)."""
        if self._closed:
            return False
        if self.pod is not None and event.pod != self.pod:
            return True
        try:
            self._queue.put_nowait(event)
            return True
        except queue.Full:
            self.overflowed = True
            self._end()
            return False

    def get(self, timeout: float | None = None) -> PodEvent | None:
        """The next event; None when closed; raises queue.Empty after ``timeout``."""
        return self._queue.get(timeout=timeout)

    def close(self) -> None:
        self._end()

    def _end(self) -> None:
        self._closed = True
        while True:  # make room for the end mark: whatever was waiting is moot now
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put_nowait(None)


class Recorder:
    """Queues events and writes them to memory from one thread (:meth:`start`)."""

    def __init__(self, write: Callable[[list[dict[str, Any]]], list[int]], *,
                 clock: Callable[[], float] = time.time, max_queue: int = MAX_QUEUE,
                 max_batch: int = MAX_BATCH, follower_queue: int = FOLLOWER_QUEUE) -> None:
        self._write = write            # MemoryClient.add_events
        self._clock = clock
        self._max_queue, self._max_batch, self._follower_queue = max_queue, max_batch, follower_queue
        self._pending: collections.deque[PodEvent] = collections.deque()
        self._cond = threading.Condition()
        self._followers: list[Follower] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="podevents", daemon=True)
        self.dropped = 0
        self.written = 0

    def record(self, pod: str, reason: str, message: str, *, type: str = NORMAL,
               uid: str | None = None, container: str | None = None, at: float | None = None) -> None:
        event = make(pod, reason, message, self._clock() if at is None else at, type=type, uid=uid,
                     container=container)
        with self._cond:
            self._pending.append(event)
            if len(self._pending) > self._max_queue:
                self._pending.popleft()
                self.dropped += 1
            if len(self._pending) == 1:   # the writer waits only on an empty queue
                self._cond.notify()

    def follow(self, pod: str | None = None) -> Follower:
        """A follower of the events stored from now on (of ``pod``, or all); close it when done."""
        follower = Follower(pod, self._follower_queue)
        with self._cond:
            self._followers.append(follower)
        return follower

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        """Write what is waiting (for up to ``timeout``), then end every follower."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._cond:
            followers, self._followers = self._followers, []
        for f in followers:
            f.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    return
                stopping = self._stopping
            if not stopping:
                # Let the events of a burst (a bulk apply: two per pod) join one write instead
                # of a memory round trip and a commit each. Events are a record, not an
                # acknowledgement: a tenth of a second later costs nobody.
                time.sleep(LINGER)
            with self._cond:
                batch = [self._pending[i] for i in range(min(len(self._pending), self._max_batch))]
            if not self._flush(batch):
                retry_at = time.monotonic() + RETRY_AFTER
                with self._cond:   # new events wake the wait: only a stop or the time ends it
                    while not self._stopping and (left := retry_at - time.monotonic()) > 0:
                        self._cond.wait(left)
                    if self._stopping:
                        return

    def _flush(self, batch: list[PodEvent]) -> bool:
        """One write; False when memory could not be reached (the batch stays queued)."""
        try:
            seqs = self._write([e.to_dict() for e in batch])
        except Unavailable as exc:
            log.warning("pod events not written yet: memory unreachable", extra={
                "events": len(batch), "error": exc.message})
            return False
        except RikletError as exc:   # refused: a bug here; retrying would refuse it again
            log.error("pod events refused by memory", extra={"events": len(batch), "error": str(exc)})
            seqs = []
        with self._cond:
            for e in batch:  # still first in line, unless an overflow dropped them meanwhile
                if self._pending and self._pending[0] is e:
                    self._pending.popleft()
            followers = list(self._followers)
        self.written += len(seqs)
        stored = [e.stored(seq) for e, seq in zip(batch, seqs, strict=False)]
        gone = [f for f in followers if not all([f.offer(e) for e in stored])]
        if gone:
            with self._cond:
                self._followers = [f for f in self._followers if f not in gone]
        return True
