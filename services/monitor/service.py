"""The monitor's request handling: the op table behind its ROUTER socket, and the scrape
behind ``/metrics``. Every answer is formatted from the sampling loop's last sample
(:mod:`services.monitor.loop`) and the pods memory's change stream told about
(:mod:`services.monitor.podtable`); only the proxy's and manager's counters are asked per scrape.

Ops (requests and replies in the :mod:`common.ipc` envelope)::

    node.resources {}        -> NodeResources
    node.realtime  {}        -> RealtimeNode
    pod.realtime   {name}    -> RealtimePod          NotFound (field args.name) if memory has no such pod
    pods.realtime  {}        -> {"pods": [RealtimePod, ...]}
    proxy.stats    {}        -> {"up": bool, ...the proxy's ``stats`` answer (its mode, counters)}

Pod ops answer ``Unavailable`` until memory has been reached once (after that, the pods last
heard of); node ops never need memory. A pod that arrived after the last full pass is
measured within ~0.1 s (a catch-up pass); until then it shows no usage.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

from common import ipc
from common.errors import InvalidArgument, NotFound, RikletError, Unavailable
from common.zmqutil import RequestClient, ipc_path
from services.monitor import metrics, procstats, prom
from services.monitor.loop import SampleLoop
from services.monitor.podtable import PodEntry, PodTable
from services.monitor.snapshot import Sample

log = logging.getLogger(__name__)

MAX_NAME = 253
# How long a pod query waits for memory's first snapshot (the mirror asks every 0.5 s), about
# what asking memory directly took before the monitor kept a mirror.
SYNC_WAIT = 1.0


ProxyStats = Callable[[], Mapping[str, Any] | None]


def proxy_stats_reader(client: RequestClient, service: str = "proxy") -> ProxyStats:
    """Ask a service (the proxy, the manager) for its counters. None when its socket file is
    absent (not running: nothing to report, not an error); Unavailable when the file is there
    but nobody answers."""
    path = ipc_path(client.endpoint)

    def read() -> Mapping[str, Any] | None:
        if path is not None and not os.path.exists(path):
            return None
        try:
            result = client.call("stats")
        except RikletError as exc:
            raise Unavailable(f"{service} at {client.endpoint} did not answer: {exc}", service) from exc
        if not isinstance(result, Mapping):
            raise Unavailable(f"{service} answered stats with {type(result).__name__}", service)
        return result
    return read


def _pod_name(args: Mapping[str, Any]) -> str:
    name = args.get("name")
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        raise InvalidArgument(f"expected a pod name (1-{MAX_NAME} characters)", "args.name")
    return name


class Monitor:
    """Answers from the sampling loop's last sample and the pod table: formatting only, no
    file read and no call to memory on the request path."""

    def __init__(self, node_id: str, table: PodTable, loop: SampleLoop,
                 proxy_stats: ProxyStats | None = None, manager_stats: ProxyStats | None = None,
                 service_pids: Callable[[], Mapping[str, int | None] | None] = lambda: None) -> None:
        self.node_id = node_id
        self.table = table
        self.loop = loop
        self._proxy_stats = proxy_stats
        self._manager_stats = manager_stats
        self._service_pids = service_pids
        self._scrape_errors = 0
        # by PodEntry.key: (facts, (usage, container rows, node totals), the pod's rendered series)
        self._series: dict[str, tuple[metrics.PodFacts, tuple[Any, ...], prom.PodSeries]] = {}
        self._errors_lock = threading.Lock()
        self._ops: dict[str, tuple[frozenset[str], Callable[[Mapping[str, Any]], Any]]] = {
            "node.resources": (frozenset(), lambda _: self.node_resources()),
            "node.realtime": (frozenset(), lambda _: self.node_realtime()),
            "pod.realtime": (frozenset({"name"}), lambda a: self.pod_realtime(_pod_name(a))),
            "pods.realtime": (frozenset(), lambda _: {"pods": self.pods_realtime()}),
            "proxy.stats": (frozenset(), lambda _: self.proxy_stats()),
        }

    def handle(self, req: ipc.Request) -> Any:
        """The ROUTER handler: validate the op and its args, then answer."""
        entry = self._ops.get(req.op)
        if entry is None:
            raise InvalidArgument(f"unknown op {req.op!r} (known: {', '.join(sorted(self._ops))})", "op")
        allowed, fn = entry
        for key in req.args:
            if key not in allowed:
                raise InvalidArgument(f"unknown argument for {req.op}", f"args.{key}")
        return fn(req.args)

    def sample(self) -> Sample:
        sample = self.loop.latest()
        if sample is None:
            raise Unavailable("the monitor has not taken its first sample yet", "monitor")
        return sample

    def node_resources(self) -> metrics.NodeResources:
        return self.sample().resources

    def node_realtime(self) -> metrics.RealtimeNode:
        return self.sample().node

    def _entries(self) -> list[PodEntry]:
        self._check_synced()
        return self.table.entries()

    def _check_synced(self) -> None:
        if not self.table.wait_synced(SYNC_WAIT):
            raise Unavailable("memory has not been reached yet: its pods are unknown", "memory")

    def figures(self, entry: PodEntry, sample: Sample) -> metrics.RealtimePod:
        node = sample.node
        return metrics.pod_figures(entry.facts, sample.pods.get(entry.key), self.node_id,
                                   int(node["cpu"]["totalCpu"]), node["memory"]["totalMemory"])

    def pod_realtime(self, name: str) -> metrics.RealtimePod:
        self._check_synced()
        entry = self.table.get(name)
        if entry is None:
            raise NotFound(f"memory knows no pod named {name!r}", "args.name")
        return self.figures(entry, self.sample())

    def pods_realtime(self) -> list[metrics.RealtimePod]:
        entries, sample = self._entries(), self.sample()
        return [self.figures(e, sample) for e in entries]

    def proxy_stats(self) -> dict[str, Any]:
        """The proxy's own ``stats`` (for ``rikletctl node``); ``up`` False when it is not
        running or does not answer."""
        if self._proxy_stats is None:
            return {"up": False}
        try:
            stats = self._proxy_stats()
        except Unavailable as exc:
            return {"up": False, "error": exc.message}
        return {"up": False} if stats is None else {**stats, "up": True}

    @property
    def scrape_errors(self) -> int:
        return self._scrape_errors

    def _scrape_error(self) -> None:
        with self._errors_lock:
            self._scrape_errors += 1

    def scrape(self, accept: str = "") -> tuple[bytes, str]:
        """The ``/metrics`` body and its content type (OpenMetrics when ``accept`` asks)."""
        return prom.exposition(self.families(), accept)

    def families(self) -> list[Any]:
        """Every family of a scrape. Memory (or the proxy) being down costs the pod (or proxy)
        series, not the node's."""
        sample = self.sample()
        try:
            series = self._pod_series(self._entries(), sample)
        except Unavailable as exc:
            log.warning("scrape without pods", extra={"error": str(exc)})
            self._scrape_error()
            series = []
        proxy: Mapping[str, Any] | None = None
        if self._proxy_stats is not None:
            try:
                proxy = self._proxy_stats()
            except Unavailable as exc:
                log.warning("scrape without proxy stats", extra={"error": str(exc)})
                self._scrape_error()
        chas: Mapping[str, Any] | None = None
        if self._manager_stats is not None:
            try:
                chas = self._manager_stats()
            except Unavailable as exc:
                log.warning("scrape without the manager's stats", extra={"error": str(exc)})
                self._scrape_error()
        return (prom.all_families(sample.node, [], self._scrape_errors, proxy,
                                  with_proxy=self._proxy_stats is not None, manager=chas, series=series)
                + procstats.agent_families(self._service_pids))

    def _pod_series(self, entries: list[PodEntry], sample: Sample) -> list[prom.PodSeries]:
        """Each pod's rendered series; a pod whose record, usage and node are those of the
        last scrape (every idle pod) reuses its lines instead of being rendered again."""
        node = sample.node
        totals = (node["cpu"]["totalCpu"], node["memory"]["totalMemory"])
        last, kept = self._series, {}
        out = []
        for e in entries:
            usage, rows = sample.pods.get(e.key), sample.containers.get(e.key, ())
            hit = last.get(e.key)
            if hit is not None and hit[0] is e.facts and hit[1] == (usage, rows, totals):
                one = hit[2]
            else:
                one = prom.pod_series(self.figures(e, sample), rows)
            kept[e.key] = (e.facts, (usage, rows, totals), one)
            out.append(one)
        self._series = kept   # one assignment: a concurrent scrape sees the old or the new
        return out
