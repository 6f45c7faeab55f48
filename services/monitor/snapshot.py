"""One sampling pass: the node's figures and every pod's usage, read once and kept in an
immutable :class:`Sample` that requests format without reading a file.

A pod is read from its cgroup when it has one (through :class:`GroupReader`'s kept files),
else from its process tree, as :func:`services.monitor.pods.measure` decides today. CPU usage
is the rate between a pod's reading in this pass and in the previous one; a pod seen for the
first time (or whose counter went back) is read again ``first_interval`` later, all such pods
sharing one wait, so its first figure is a real rate and not a zero.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from services.monitor import metrics
from services.monitor.cgroupfiles import GroupGone, GroupReader, GroupUsage
from services.monitor.pods import ContainerUsage, process_tree, tree_cpu_seconds, tree_rss
from services.monitor.podtable import PodEntry
from services.monitor.sampler import CpuSampler

log = logging.getLogger(__name__)

_READ_ERRORS = (OSError, ValueError)   # a malformed or vanished file


@dataclass(frozen=True)
class Sample:
    taken_at: float                                 # wall-clock time of the pass
    node: metrics.RealtimeNode
    resources: metrics.NodeResources
    pods: Mapping[str, metrics.PodUsage] = field(default_factory=dict)            # by PodEntry.key
    containers: Mapping[str, tuple[ContainerUsage, ...]] = field(default_factory=dict)


class _Reading(NamedTuple):
    cpu_key: str            # the rate's key: changes when the source does (cgroup or pids)
    at: float               # monotonic time of the reading
    cpu: float              # cumulative CPU seconds
    memory: int
    limit: int | None
    containers: tuple[ContainerUsage, ...]


class Snapshotter:
    """Takes samples; used by one thread (the sampling loop)."""

    def __init__(self, node_id: str, state_dir: str, reader: GroupReader, external_ip: str | None = None,
                 first_interval: float = 0.1, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.node_id = node_id
        self.state_dir = state_dir
        self.external_ip = external_ip
        self.reader = reader
        self.first_interval = first_interval
        self._clock = clock
        self._sleep = sleep
        self._node_cpu = CpuSampler(first_interval=first_interval, clock=clock, sleep=sleep)
        self._last: dict[str, tuple[float, float]] = {}     # cpu key -> (at, cumulative cpu)
        self._gone: dict[str, object] = {}                  # pod key -> the record whose group was gone
        self._groups: set[str] = set()                      # groups read in this pass

    def take(self, entries: Iterable[PodEntry]) -> Sample:
        """A full pass: the node and every pod in ``entries``."""
        entries = list(entries)
        node = metrics.realtime_node(self.node_id, self._node_cpu)
        resources = metrics.node_resources(self.node_id, self.state_dir, self.external_ip)
        self._groups = set()
        usages, containers = self._pods(entries, forget_others=True)
        self.reader.retain(self._groups)    # the groups of pods that went away are closed
        return Sample(time.time(), node, resources, usages, containers)

    def add(self, sample: Sample, entries: Iterable[PodEntry]) -> Sample:
        """``sample`` with the pods of ``entries`` it lacks measured now (pods that came since)."""
        new = [e for e in entries if e.key not in sample.pods]
        if not new:
            return sample
        usages, containers = self._pods(new, forget_others=False)
        return Sample(sample.taken_at, sample.node, sample.resources, {**sample.pods, **usages},
                      {**sample.containers, **containers})

    def _pods(self, entries: list[PodEntry], forget_others: bool
              ) -> tuple[dict[str, metrics.PodUsage], dict[str, tuple[ContainerUsage, ...]]]:
        readings = {e.key: self._read(e) for e in entries}
        first = {e.key: readings[e.key] for e in entries if self._is_first(readings[e.key])}
        if first:
            self._sleep(self.first_interval)
            for e in entries:
                if e.key in first:
                    readings[e.key] = self._read(e)
        usages: dict[str, metrics.PodUsage] = {}
        last = {} if forget_others else self._last
        for key, r in readings.items():
            start = first.get(key)
            at, cpu = (start.at, start.cpu) if start is not None else self._last[r.cpu_key]
            cores = max(0.0, (r.cpu - cpu) / (r.at - at)) if r.at > at else 0.0
            usages[key] = metrics.PodUsage(cores, r.memory, r.limit)
            last[r.cpu_key] = (r.at, r.cpu)
        self._last = last
        if forget_others:
            self._gone = {k: v for k, v in self._gone.items() if k in readings}
        return usages, {key: r.containers for key, r in readings.items()}

    def _is_first(self, r: _Reading) -> bool:
        prev = self._last.get(r.cpu_key)
        return prev is None or r.cpu < prev[1]

    def _read(self, e: PodEntry) -> _Reading:
        if e.cgroup is not None and self._gone.get(e.key) is not e.record:
            try:
                self._groups.add(e.cgroup)
                u = self.reader.usage(e.cgroup)
                return _Reading(e.cgroup_key, self._clock(), u.cpu_ns / 1e9, u.memory_bytes,
                                u.memory_limit, self._containers(e, e.cgroup, u))
            except GroupGone:
                self._gone[e.key] = e.record    # not tried again until memory changes the record
            except _READ_ERRORS as exc:
                self._gone[e.key] = e.record    # nor is an unreadable one: one log line, not one a pass
                log.info("pod cgroup unreadable, using its processes",
                         extra={"pod": e.name, "cgroup": e.cgroup, "error": str(exc)})
        procs = process_tree(e.pids)
        return _Reading(e.pids_key, self._clock(),
                        tree_cpu_seconds(procs), tree_rss(procs), None, ())

    def _containers(self, e: PodEntry, base: str, pod: GroupUsage) -> tuple[ContainerUsage, ...]:
        out = []
        for name in e.containers:
            relpath = f"{base}/{name}"
            self._groups.add(relpath)
            try:
                if len(e.containers) == 1 and self.reader.sole_child(base) == name:
                    # Its pod's group holds nothing else: the same figures, half the reads.
                    u = GroupUsage(pod.cpu_ns, pod.memory_bytes, self.reader.limit(relpath))
                else:
                    u = self.reader.usage(relpath)
            except (GroupGone, *_READ_ERRORS):
                continue    # a container without a group of its own
            out.append(ContainerUsage(e.name, name, u.cpu_ns / 1e9, u.memory_bytes, u.memory_limit))
        return tuple(out)
