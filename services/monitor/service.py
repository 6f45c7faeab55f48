"""The monitor's request handling: the op table behind its ROUTER socket, and the scrape
behind ``/metrics``. Pods come from the memory service; everything else is measured here.

Ops (requests and replies in the :mod:`common.ipc` envelope)::

    node.resources {}        -> NodeResources
    node.realtime  {}        -> RealtimeNode
    pod.realtime   {name}    -> RealtimePod          NotFound (field args.name) if memory has no such pod
    pods.realtime  {}        -> {"pods": [RealtimePod, ...]}
    proxy.stats    {}        -> {"up": bool, ...the proxy's ``stats`` answer (its mode, counters)}

Pod ops answer ``Unavailable`` when memory cannot be reached; node ops never ask memory.
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
from services.monitor import metrics, prom
from services.monitor.pods import CgroupOpener, ContainerUsage, container_usages, open_cgroup_default
from services.monitor.sampler import CpuSampler

log = logging.getLogger(__name__)

Record = Mapping[str, Any]
PodLister = Callable[[], list[Record]]

MAX_NAME = 253


def parse_pod_list(result: Any) -> list[Record]:
    """memory's ``pod.list`` answer: a list of records or ``{"pods": [...]}``."""
    if isinstance(result, Mapping):
        result = result.get("pods")
    if not isinstance(result, list):
        raise Unavailable(f"memory answered pod.list with {type(result).__name__}, not a list", "memory")
    return [r for r in result if isinstance(r, Mapping)]


def memory_pod_lister(client: RequestClient) -> PodLister:
    def list_pods() -> list[Record]:
        try:
            result = client.call("pod.list")
        except RikletError as exc:
            raise Unavailable(f"memory service at {client.endpoint} did not answer: {exc}",
                              "memory") from exc
        return parse_pod_list(result)
    return list_pods


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
    def __init__(self, node_id: str, state_dir: str, list_pods: PodLister,
                 sampler: CpuSampler | None = None, open_cgroup: CgroupOpener = open_cgroup_default,
                 external_ip: str | None = None, proxy_stats: ProxyStats | None = None,
                 manager_stats: ProxyStats | None = None) -> None:
        self.node_id = node_id
        self.state_dir = state_dir
        self.external_ip = external_ip
        self.sampler = sampler or CpuSampler()
        self._list_pods = list_pods
        self._open_cgroup = open_cgroup
        self._proxy_stats = proxy_stats
        self._manager_stats = manager_stats
        self._scrape_errors = 0
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

    def node_resources(self) -> metrics.NodeResources:
        return metrics.node_resources(self.node_id, self.state_dir, self.external_ip)

    def node_realtime(self) -> metrics.RealtimeNode:
        return metrics.realtime_node(self.node_id, self.sampler)

    def pod_realtime(self, name: str) -> metrics.RealtimePod:
        for record in self._list_pods():
            if record.get("name") == name:
                return metrics.realtime_pod(record, self.node_id, self.sampler, self._open_cgroup)
        raise NotFound(f"memory knows no pod named {name!r}", "args.name")

    def pods_realtime(self) -> list[metrics.RealtimePod]:
        return metrics.realtime_pods(self._list_pods(), self.node_id, self.sampler, self._open_cgroup)

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

    def scrape(self) -> str:
        """The ``/metrics`` body. Memory (or the proxy) being down costs the pod (or proxy)
        series, not the node's."""
        node = self.node_realtime()
        containers: list[ContainerUsage] = []
        try:
            records = self._list_pods()
            pods = metrics.realtime_pods(records, self.node_id, self.sampler, self._open_cgroup)
            containers = container_usages(records, self._open_cgroup)
        except Unavailable as exc:
            log.warning("scrape without pods", extra={"error": str(exc)})
            self._scrape_error()
            pods = []
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
        return prom.render(node, pods, self._scrape_errors, proxy, with_proxy=self._proxy_stats is not None,
                           containers=containers, chas=chas)
