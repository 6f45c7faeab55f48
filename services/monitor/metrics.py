"""The monitor's figures, in the JSON shapes the seeds fix (field names are a contract).

- :func:`node_resources`: seed 000 "Node resources" (static facts).
- :func:`realtime_node`: seed 000 "Realtime node resources" merged with seed 001's node metrics.
- :func:`pod_figures`: seed 000 "Realtime app resources" merged with seed 001's pod metrics,
  from what a pod's record fixes (:func:`pod_facts`) and its sampled usage
  (:mod:`services.monitor.snapshot`); the host's totals serve only as the capacity of a pod
  without limits.

Percentages are floats rounded to two decimals; byte counts and timestamps are ints.
"""

from __future__ import annotations

import logging
import platform
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, TypedDict

import psutil

from services.monitor import host
from services.monitor.sampler import CpuSampler, usage_percent

log = logging.getLogger(__name__)

NODE_CPU_KEY = "node"


class Networking(TypedDict):
    hostname: str
    internalip: str
    externalip: str


class NodeResources(TypedDict):
    id: str
    cpu: int
    memory: int
    disksize: int
    distrib: str
    version: int | str
    type: str
    arch: str
    kernelVersion: str
    networking: Networking


class CpuFigures(TypedDict):
    totalCpu: float
    currentUsage: float


class NodeMemory(TypedDict):
    totalMemory: int
    currentUsage: float
    freeMemory: int
    freeMemoryAmount: float


class DiskFigures(TypedDict):
    diskName: str
    total: int
    used: int
    available: int


class RealtimeNode(TypedDict):
    id: str
    state: str
    timestamp: int
    cpu: CpuFigures
    memory: NodeMemory
    disks: list[DiskFigures]


class PodMemory(TypedDict):
    totalMemory: int
    freeMemory: int
    freeMemoryAmount: float


class Deployment(TypedDict):
    app: str
    repository: str
    version: str


class RealtimePod(TypedDict):
    appId: str
    state: str
    createdAt: int
    restartCount: int
    internalIp: str
    runsOn: str
    deployment: Deployment
    cpu: CpuFigures
    memory: PodMemory


def logical_cores() -> int:
    return psutil.cpu_count(logical=True) or 1


def node_resources(node_id: str, state_dir: str = ".", external_ip: str | None = None) -> NodeResources:
    """Static facts about the node. ``disksize`` is the size of the filesystem that holds
    ``state_dir`` (where pods' data lives); ``externalip`` is ``external_ip`` when configured,
    else the internal address: nothing outside the node is asked."""
    distrib, version = host.distribution()
    internal = host.internal_ip()
    return {
        "id": node_id,
        "cpu": logical_cores(),
        "memory": psutil.virtual_memory().total,
        "disksize": psutil.disk_usage(host.existing_ancestor(state_dir)).total,
        "distrib": distrib,
        "version": version,
        "type": platform.system().lower(),
        "arch": host.go_arch(),
        "kernelVersion": platform.release(),
        "networking": {"hostname": socket.gethostname(), "internalip": internal,
                       "externalip": external_ip or internal},
    }


def node_busy_seconds() -> float:
    """Cumulative non-idle CPU time of the whole node. Guest time is already inside user and
    nice on Linux, and steal is time the hypervisor took from us, so neither is added."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))


def _percent(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 2) if whole > 0 else 0.0


def realtime_node(node_id: str, cpu_sampler: CpuSampler) -> RealtimeNode:
    """Node usage now. ``freeMemory`` is what the kernel could hand out without swapping
    (MemAvailable: free plus reclaimable cache), which is what a scheduler can place."""
    cores = logical_cores()
    mem = psutil.virtual_memory()
    available = int(mem.available)
    return {
        "id": node_id,
        "state": "RUNNING",
        "timestamp": int(time.time()),
        "cpu": {"totalCpu": cores,
                "currentUsage": cpu_sampler.percent(NODE_CPU_KEY, node_busy_seconds, cores)},
        "memory": {"totalMemory": int(mem.total),
                   "currentUsage": _percent(int(mem.total) - available, int(mem.total)),
                   "freeMemory": available,
                   "freeMemoryAmount": _percent(available, int(mem.total))},
        "disks": [{"diskName": d.name, "total": d.total, "used": d.used, "available": d.available}
                  for d in host.disks()],
    }


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    return int(value)


def split_image(image: str) -> tuple[str, str]:
    """``repo:tag`` or ``repo@digest`` into (repository, version). A port in the registry
    host (``reg:5000/app``) is not a tag: a tag comes after the last '/'."""
    if "@" in image:
        repo, _, digest = image.partition("@")
        return repo, digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon + 1:]
    return image, ""


def deployment(record: Mapping[str, Any]) -> Deployment:
    spec = _dict(record.get("spec"))
    containers = [_dict(c) for c in _list(spec.get("containers"))]
    first = containers[0] if containers else {}
    image = first.get("image")
    if isinstance(image, str) and image:
        repository, version = split_image(image)
    else:
        command = _list(first.get("command"))
        repository, version = (str(command[0]) if command else ""), ""
    app = spec.get("workload") or record.get("name") or ""
    return {"app": str(app), "repository": repository, "version": version}


def restart_count(status: Mapping[str, Any]) -> int:
    containers = [_dict(c) for c in _list(status.get("containers"))]
    if containers:
        return sum(_int(c.get("restartCount")) for c in containers)
    return _int(status.get("restartCount"))


def _spec_limit(record: Mapping[str, Any], key: str) -> int | None:
    """Sum of a per-container limit, or None when any container is unlimited (then so is the
    pod)."""
    containers = [_dict(c) for c in _list(_dict(record.get("spec")).get("containers"))]
    values = [_dict(c.get("resources")).get(key) for c in containers]
    limits = [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    if not values or len(limits) != len(values):
        return None
    return sum(limits)


def _capacity(millis: int | None, spec_memory: int | None, cgroup_limit: int | None,
              node_cores: int, node_memory: int) -> tuple[float, int]:
    """(cores, bytes) the pod may use: the tightest of its spec, its cgroup and the node."""
    cores = min(float(node_cores), millis / 1000.0) if millis else float(node_cores)
    limits = [x for x in (cgroup_limit, spec_memory) if x and x > 0]
    return cores, min([node_memory, *limits])


@dataclass(frozen=True)
class PodFacts:
    """What a pod's figures take from its record, worked out once per change of the record."""

    app_id: str
    state: str
    created_at: int
    restart_count: int
    internal_ip: str
    deployment: Deployment
    cpu_millis: int | None          # the spec's limits, None when unlimited
    memory_bytes: int | None


class PodUsage(NamedTuple):
    """One pod's usage in a sampling pass."""

    cores: float                    # CPU in use, in cores, since the previous reading
    memory_used: int
    memory_limit: int | None        # what its cgroup enforces, if anything


def pod_facts(record: Mapping[str, Any]) -> PodFacts:
    status = _dict(record.get("status"))
    phase = status.get("phase")
    state = phase.upper() if isinstance(phase, str) and phase else "UNKNOWN"
    return PodFacts(str(record.get("name", "")), state, _int(record.get("created_at")), restart_count(status),
                    str(status.get("internalIp") or ""), deployment(record),
                    _spec_limit(record, "cpu_millis"), _spec_limit(record, "memory_bytes"))


def pod_figures(facts: PodFacts, usage: PodUsage | None, node_id: str, node_cores: int,
                node_memory: int) -> RealtimePod:
    """A pod's figures from its facts and its last sampled usage; a pod not sampled yet (it
    came after the last pass) shows none used."""
    cores, memory = _capacity(facts.cpu_millis, facts.memory_bytes, usage.memory_limit if usage else None,
                              node_cores, node_memory)
    free = max(0, memory - (usage.memory_used if usage else 0))
    return {
        "appId": facts.app_id, "state": facts.state, "createdAt": facts.created_at,
        "restartCount": facts.restart_count, "internalIp": facts.internal_ip, "runsOn": node_id,
        "deployment": facts.deployment,
        "cpu": {"totalCpu": cores, "currentUsage": usage_percent(usage.cores if usage else 0.0, cores)},
        "memory": {"totalMemory": memory, "freeMemory": free, "freeMemoryAmount": _percent(free, memory)},
    }
