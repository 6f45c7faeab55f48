"""The sampling thread: one full pass every ``monitoring.metric_resolution`` on a fixed grid of
monotonic time (start + k * resolution, so a pass's own duration does not stretch the period;
a pass that overruns skips to the next slot), and a short catch-up pass for pods that arrive
in between, so a new pod is measured within about ``first_interval`` rather than a period.

Requests read :meth:`SampleLoop.latest`, an immutable :class:`Sample` swapped in whole.
Listeners (the RIK push) run on this thread after each full pass.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from services.monitor.podtable import PodTable
from services.monitor.snapshot import Sample, Snapshotter

log = logging.getLogger(__name__)

Listener = Callable[[Sample], None]


def next_slot(start: float, resolution: float, now: float) -> float:
    """The first grid time start + k * resolution strictly after ``now``."""
    k = int((now - start) // resolution) + 1
    return start + k * resolution


class SampleLoop:
    def __init__(self, snapshotter: Snapshotter, table: PodTable, resolution: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.snapshotter = snapshotter
        self.table = table
        self.resolution = resolution
        self.clock = clock
        self.listeners: list[Listener] = []
        self.passes = 0
        self._latest: Sample | None = None
        self._ready = threading.Event()
        self._wake = threading.Event()      # new pods to catch up with
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="monitor-sample", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self.snapshotter.reader.close()

    def pods_arrived(self) -> None:
        """Called (from the mirror's thread) when a pod arrives: measure it soon."""
        self._wake.set()

    def latest(self, timeout: float = 10.0) -> Sample | None:
        """The last sample; before the first one, wait up to ``timeout`` for it."""
        sample = self._latest
        if sample is None and self._ready.wait(timeout):
            sample = self._latest
        return sample

    def sample_now(self) -> Sample:
        """Take a full pass on the caller's thread (tests; the loop thread does it otherwise)."""
        sample = self.snapshotter.take(self.table.entries())
        self._publish(sample)
        self.passes += 1
        for listener in self.listeners:
            try:
                listener(sample)
            except Exception:  # one listener's bug must not stop the sampling
                log.exception("sample listener failed")
        return sample

    def catch_up(self) -> None:
        sample = self._latest
        if sample is not None:
            self._publish(self.snapshotter.add(sample, self.table.entries()))

    def _publish(self, sample: Sample) -> None:
        self._latest = sample
        self._ready.set()

    def _run(self) -> None:
        start = self.clock()
        slot = start
        while not self._stop.is_set():
            try:
                self.sample_now()
            except Exception:  # a bad pass must not end the sampling
                log.exception("sampling pass failed")
            slot = next_slot(start, self.resolution, max(self.clock(), slot))
            self._wait_for(slot)

    def _wait_for(self, slot: float) -> None:
        while not self._stop.is_set():
            left = slot - self.clock()
            if left <= 0:
                return
            if self._wake.wait(left):
                self._wake.clear()
                if self._stop.is_set():
                    return
                try:
                    self.catch_up()
                except Exception:
                    log.exception("catch-up pass failed")
