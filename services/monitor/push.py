"""Metrics pushed to a RIK scheduler every ``monitoring.metric_resolution`` (seed 001).

Each full sampling pass sends one ``WorkerMetric`` (status RUNNING: the scheduler marks a
worker Ready on the first one) and one ``InstanceMetric`` per scheduler-made pod. The passes
run on the sampling loop's fixed grid (:func:`next_slot`), so the pushes do too.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from common.pb import rik_common_pb2 as cpb
from common.pod import instance_id_of
from common.rik import StatusSender, status_of
from services.monitor import metrics
from services.monitor.loop import next_slot
from services.monitor.service import Monitor
from services.monitor.snapshot import Sample

__all__ = ["MetricPusher", "next_slot", "worker_metrics"]

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


class MetricPusher:
    """Pushes each full sample the sampling loop takes (register :meth:`on_sample` as its
    listener): the loop's grid is the push cadence."""

    def __init__(self, monitor: Monitor, sender: StatusSender) -> None:
        self.monitor = monitor
        self.sender = sender

    def start(self) -> None:
        self.sender.start()

    def stop(self) -> None:
        self.sender.stop()

    def on_sample(self, sample: Sample) -> None:
        self.sender.send_worker(cpb.RUNNING, json.dumps(worker_metrics(sample.node)))
        # Pods being deleted are the manager's to report: a metric sampled before the delete
        # could otherwise land after its TERMINATED and leave the scheduler on DESTROYING.
        for entry in self.monitor.table.entries():
            record = entry.record
            instance = instance_id_of(record)
            if instance and record.get("desired") != "deleted":
                figures = self.monitor.figures(entry, sample)
                self.sender.send_instance(instance, status_of(record), json.dumps(figures))
