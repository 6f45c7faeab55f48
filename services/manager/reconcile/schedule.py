"""When the reconciler looks at a pod without being told to: per-pod rechecks (a due-time heap)
and the slow full resync (a pacer spreading every pod evenly over the interval).

Both are driven by one housekeeping thread that sleeps until the earliest due time: an idle
agent whose pods need no recheck wakes once a second, whatever the number of pods.
"""

from __future__ import annotations

import heapq
import math
import threading
from collections.abc import Callable, Sequence

Clock = Callable[[], float]


class Timers:
    """Pods to sync again at a given (monotonic) time; one pending time per pod, the earliest."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}
        self._cond = threading.Condition()
        self._sooner = False   # a time earlier than the last reported was scheduled since

    def schedule(self, name: str, at: float) -> None:
        with self._cond:
            current = self._due.get(name)
            if current is not None and current <= at:
                return  # an earlier check is already due: it sees the later state too
            self._due[name] = at
            heapq.heappush(self._heap, (at, name))
            if self._heap[0] == (at, name):
                self._sooner = True
                self._cond.notify()  # the sleeper may be waiting for a later time

    def cancel(self, name: str) -> None:
        with self._cond:
            self._due.pop(name, None)  # its heap entry is skipped when it comes up

    def has(self, name: str) -> bool:
        with self._cond:
            return name in self._due

    def pending(self) -> int:
        with self._cond:
            return len(self._due)

    def pop_due(self, now: float) -> tuple[list[str], float | None]:
        """The pods due by ``now`` (each removed) and the next due time after them, if any."""
        due: list[str] = []
        with self._cond:
            self._sooner = False
            while self._heap and self._heap[0][0] <= now:
                at, name = heapq.heappop(self._heap)
                if self._due.get(name) == at:
                    del self._due[name]
                    due.append(name)
            while self._heap and self._due.get(self._heap[0][1]) != self._heap[0][0]:
                heapq.heappop(self._heap)  # cancelled or superseded: drop before reporting
            return due, (self._heap[0][0] if self._heap else None)

    def wait(self, timeout: float) -> None:
        """Sleep up to ``timeout``, less when an earlier check is scheduled meanwhile."""
        with self._cond:
            if not self._sooner:   # else one came between pop_due and now: no sleeping past it
                self._cond.wait(max(0.0, timeout))

    def wake(self) -> None:
        with self._cond:
            self._sooner = True
            self._cond.notify_all()


class Pacer:
    """The safety-net resync: every pod once per ``interval``, spread evenly. Each call hands out
    the share of pods the time since the last call earns (N x elapsed / interval, fractions
    carried over), walking a snapshot of the names that is renewed once it has been walked."""

    def __init__(self, interval: float, now: float) -> None:
        if not interval > 0 or math.isinf(interval):
            raise ValueError("the resync interval must be a positive, finite number of seconds")
        self.interval = interval
        self._last = now
        self._credit = 0.0
        self._order: list[str] = []
        self._cursor = 0

    def take(self, now: float, names: Callable[[], Sequence[str]]) -> list[str]:
        elapsed, self._last = max(0.0, now - self._last), now
        if self._cursor >= len(self._order):
            self._order, self._cursor = sorted(names()), 0
        if not self._order:
            self._credit = 0.0
            return []
        # never more than one full pass per call: a stalled clock does not make a burst of N
        self._credit = min(self._credit + len(self._order) * elapsed / self.interval,
                           float(len(self._order)))
        count = int(self._credit)
        self._credit -= count
        out = self._order[self._cursor:self._cursor + count]
        self._cursor += len(out)
        return out
