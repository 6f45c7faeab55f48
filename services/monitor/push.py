"""Metrics pushed to a RIK scheduler every ``monitoring.metric_resolution`` (seed 001).

Each tick sends one ``WorkerMetric`` (status RUNNING: the scheduler marks a worker Ready on the
first one) and one ``InstanceMetric`` per scheduler-made pod. Ticks are scheduled on a fixed
grid of monotonic time (start + k * resolution), not "resolution after the last push", so the
work of a tick does not stretch the period; a tick that overruns skips to the next slot.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from common.errors import RikletError
from common.pb import rik_common_pb2 as cpb
from common.rik import StatusSender, instance_id_of, status_of
from services.monitor import metrics
from services.monitor.service import Monitor

log = logging.getLogger(__name__)


def worker_metrics(node: metrics.RealtimeNode) -> dict[str, Any]:
    """The node's figures in the shape the RIK scheduler reads (``cpu.total`` cores as an int,
    ``cpu.free`` cores, ``memory.total/free`` bytes, ``disks[{disk_name, total, free}]``), with
    seed 001's richer fields beside them in the same objects."""
    cpu, mem = node["cpu"], node["memory"]
    total = int(cpu["totalCpu"])
    free_cores = round(total * (1 - cpu["currentUsage"] / 100), 3)
    return {
        "cpu": {"total": total, "free": max(0.0, free_cores), **cpu},
        "memory": {"total": mem["totalMemory"], "free": mem["freeMemory"], **mem},
        "disks": [{"disk_name": d["diskName"], "total": d["total"], "free": d["available"], **d}
                  for d in node["disks"]],
        "timestamp": node["timestamp"],
    }


def next_slot(start: float, resolution: float, now: float) -> float:
    """The first grid time start + k * resolution strictly after ``now``."""
    k = int((now - start) // resolution) + 1
    return start + k * resolution


class MetricPusher:
    def __init__(self, monitor: Monitor, sender: StatusSender, resolution: float,
                 list_pods: Callable[[], Sequence[Mapping[str, Any]]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.monitor = monitor
        self.sender = sender
        self.resolution = resolution
        self.list_pods = list_pods
        self.clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metric-push", daemon=True)

    def start(self) -> None:
        self.sender.start()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sender.stop()

    def tick(self) -> None:
        node = self.monitor.node_realtime()
        self.sender.send_worker(cpb.RUNNING, json.dumps(worker_metrics(node)))
        try:
            # Pods being deleted are the manager's to report: a metric sampled before the delete
            # could otherwise land after its TERMINATED and leave the scheduler on DESTROYING.
            pods = [p for p in self.list_pods() if instance_id_of(p) and p.get("desired") != "deleted"]
        except RikletError as exc:  # memory away: the node's figures still go out
            log.debug("no pod metrics this tick", extra={"error": str(exc)})
            return
        for record, figures in zip(pods, metrics.realtime_pods(
                pods, self.monitor.node_id, self.monitor.sampler), strict=True):
            self.sender.send_instance(str(instance_id_of(record)), status_of(record), json.dumps(figures))

    def _run(self) -> None:
        start = self.clock()
        slot = start
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # a bad sample must not end the pushes
                log.exception("metric push failed")
            slot = next_slot(start, self.resolution, max(self.clock(), slot))
            self._stop.wait(max(0.0, slot - self.clock()))
