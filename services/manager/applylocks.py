"""Applies that cannot meet run side by side; those that could meet take turns.

An apply reads what it must check (the pods it names, the pods of its workload, the holders
of the host ports it asks for) and then writes; two applies must not interleave there when
one could change what the other checked. They can only meet through a pod name, a workload
or a host port, so an apply holds one lock per pod it names, one for its workload, and, when
it asks for host ports or picks them (the CHaS API allocates from a range), the one lock of
the node's host ports. Applies of different port-less workloads, the bulk of a dense node,
no longer queue behind one another while each waits for memory.

A named volume it claims is a key too, which volume create and remove hold.

Locks are taken in one order (sorted keys), so two applies never wait for each other.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from common.model import Workload
from common.ports import wanted_ports
from common.volumes import claims

Key = tuple[str, str]
PORTS: Key = ("ports", "")


class ApplyLocks:
    """Locks by key, made when first wanted and dropped when nobody holds or waits for them."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[Key, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, workload: Workload, picks_ports: bool = False) -> Iterator[None]:
        """Hold what an apply of ``workload`` needs; ``picks_ports``: it may choose host ports."""
        keys = {("pod", name) for name, _ in workload.pods} | {("workload", workload.name)}
        # a claimed named volume: its create/remove cannot slip between this check and write
        keys |= {("volume", claim) for _, spec in workload.pods for claim in claims(spec)}
        if picks_ports or wanted_ports(workload):
            keys.add(PORTS)
        with self.keys(keys):
            yield

    @contextmanager
    def keys(self, keys: Iterable[Key]) -> Iterator[None]:
        ordered = sorted(set(keys))
        held: list[Key] = []
        try:
            for key in ordered:
                lock = self._take(key)
                try:
                    lock.acquire()
                except BaseException:
                    self._give(key, release=False)
                    raise
                held.append(key)
            yield
        finally:
            for key in reversed(held):
                self._give(key)

    @property
    def in_use(self) -> int:
        """Keys held or waited for now (a seam for tests: 0 once every apply is done)."""
        with self._guard:
            return len(self._locks)

    def _take(self, key: Key) -> threading.Lock:
        with self._guard:
            lock, users = self._locks.get(key, (None, 0))
            if lock is None:
                lock = threading.Lock()
            self._locks[key] = (lock, users + 1)
            return lock

    def _give(self, key: Key, release: bool = True) -> None:
        with self._guard:
            lock, users = self._locks[key]
            if release:
                lock.release()
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
