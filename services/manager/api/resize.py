"""In-place resize through the API: a pod's new limits, and the check that a memory limit is
not set below what the container uses now (the kernel would have to reclaim or OOM-kill it:
refused with the figures instead, and nothing changes)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

from common.errors import InvalidArgument
from common.pod import Phase, phase_of
from common.units import parse_cpu, parse_memory

UsageOf = Callable[[str, str], int | None]   # (pod, container) -> working set bytes, None: unknown


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def resized_spec(record: Mapping[str, Any], container: str, cpu: str, memory: str) -> dict[str, Any]:
    """The pod's spec with one container's limits changed (``cpu``/``memory`` as rikletctl takes
    them: 0.5, 500m / 256m, 1Gi; empty: unchanged)."""
    if not cpu and not memory:
        raise InvalidArgument("give a new cpu or memory limit (or both)", "cpu")
    spec = copy.deepcopy(dict(record["spec"]))
    containers = spec.get("containers") or []
    names = [c["name"] for c in containers]
    if not container:
        if len(names) != 1:
            raise InvalidArgument(f"the pod has {len(names)} containers ({', '.join(names)}): name one",
                                  "container")
        container = names[0]
    if container not in names:
        raise InvalidArgument(f"no container {container!r} in pod {record['name']!r} "
                              f"(containers: {', '.join(names)})", "container")
    c = containers[names.index(container)]
    resources = dict(c.get("resources") or {"cpu_millis": None, "memory_bytes": None})
    if cpu:
        resources["cpu_millis"] = parse_cpu(cpu, "cpu")
    if memory:
        resources["memory_bytes"] = parse_memory(memory, "memory")
    c["resources"] = resources
    return spec


def check_memory(record: Mapping[str, Any] | None, spec: Mapping[str, Any], usage_of: UsageOf | None,
                 field: str = "spec.containers[{i}].resources.memory") -> None:
    """Refuse a memory limit below a running container's current use."""
    if record is None or usage_of is None or phase_of(record) is not Phase.RUNNING:
        return
    old = {c["name"]: (c.get("resources") or {}).get("memory_bytes")
           for c in (record.get("spec") or {}).get("containers") or ()}
    for i, c in enumerate(spec.get("containers") or ()):
        limit = (c.get("resources") or {}).get("memory_bytes")
        if limit is None or c["name"] not in old or old[c["name"]] == limit:
            continue
        used = usage_of(record["name"], c["name"])
        if used is not None and limit < used:
            raise InvalidArgument(
                f"memory limit {_mib(limit)} ({limit} bytes) is below what container {c['name']!r} "
                f"uses now, {_mib(used)} ({used} bytes): give at least that, or restart the pod "
                "with the lower limit", field.format(i=i))
