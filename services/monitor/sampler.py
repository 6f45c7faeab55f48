"""CPU usage as a rate: cumulative CPU time read twice, divided by the wall time between.

The kernel only exposes cumulative CPU time (``/proc/stat``, ``cpuacct.usage``, a process's
``utime + stime``). A usage figure needs two readings, so :class:`CpuSampler` remembers the
previous one per key (the node, each pod) with its monotonic time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

Reader = Callable[[], float]
"""Returns cumulative CPU time in seconds (summed over all CPUs)."""


@dataclass(frozen=True)
class _Reading:
    at: float           # monotonic seconds
    cpu: float          # cumulative CPU seconds
    cores: float        # rate computed when this reading became current


class CpuSampler:
    """Turns cumulative CPU readings into cores in use, per key.

    First reading of a key: there is nothing to compare with, so the sampler reads, waits
    ``first_interval`` (100 ms by default) and reads again. A caller about to measure many new
    keys calls :meth:`prime` first so that they share one wait instead of one each.

    Readings closer than ``min_interval`` to the stored one return the stored rate unchanged:
    two queries in the same millisecond would otherwise divide noise by almost nothing.
    A reading lower than the previous one means the counter was reset (a pod recreated, its
    pids replaced); the key then starts over as if new. Keys not read for ``forget_after``
    seconds are dropped, so pods that come and go do not grow the table.

    Thread-safe. The monitor's sampling loop uses one for the node's CPU; pods' rates are taken
    between sampling passes (:mod:`services.monitor.snapshot`).
    """

    def __init__(self, first_interval: float = 0.1, min_interval: float = 0.05,
                 forget_after: float = 600.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.first_interval = first_interval
        self.min_interval = min_interval
        self.forget_after = forget_after
        self._clock = clock
        self._sleep = sleep
        self._last: dict[str, _Reading] = {}
        self._lock = threading.Lock()

    def cores(self, key: str, read: Reader) -> float:
        """CPU-seconds per second used by ``key`` since its previous reading (>= 0)."""
        cpu, now = read(), self._clock()
        with self._lock:
            prev = self._last.get(key)
        if prev is None or cpu < prev.cpu:
            self._sleep(self.first_interval)
            prev = _Reading(now, cpu, 0.0)
            cpu, now = read(), self._clock()
        return self._store(key, prev, cpu, now)

    def percent(self, key: str, read: Reader, capacity: float) -> float:
        """Usage as a percentage of ``capacity`` cores, clamped to 0..100, two decimals."""
        return usage_percent(self.cores(key, read), capacity)

    def prime(self, reads: Mapping[str, Reader]) -> None:
        """Take a first reading of every key not seen yet, then wait once for all of them."""
        fresh: dict[str, _Reading] = {}
        with self._lock:
            unknown = [k for k in reads if k not in self._last]
        for key in unknown:
            fresh[key] = _Reading(self._clock(), reads[key](), 0.0)
        if not fresh:
            return
        with self._lock:
            for key, reading in fresh.items():
                self._last.setdefault(key, reading)
        self._sleep(self.first_interval)

    def _store(self, key: str, prev: _Reading, cpu: float, now: float) -> float:
        elapsed = now - prev.at
        with self._lock:
            if elapsed < self.min_interval and key in self._last:
                return self._last[key].cores
            rate = max(0.0, (cpu - prev.cpu) / elapsed) if elapsed > 0 else 0.0
            self._last[key] = _Reading(now, cpu, rate)
            self._forget(now)
        return rate

    def _forget(self, now: float) -> None:
        stale = [k for k, r in self._last.items() if now - r.at > self.forget_after]
        for key in stale:
            del self._last[key]


def usage_percent(cores: float, capacity: float) -> float:
    if capacity <= 0:
        return 0.0
    return round(min(100.0, max(0.0, 100.0 * cores / capacity)), 2)
