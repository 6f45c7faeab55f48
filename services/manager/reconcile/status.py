"""Pod phases, derived from what a driver observes: pure functions.

Phases: Pending (accepted, not started), Creating, Running, Error (crashed or failed to start,
with reason and exit code), Terminating, Terminated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.blocked_ports import REASON as BLOCKED_REASON
from common.pod import Phase
from services.manager.runtime import Observed

__all__ = ["Phase", "derive", "readiness", "same"]


_CONTAINER_FIELDS = ("name", "state", "pid", "restartCount", "exitCode", "signal", "reason",
                     "message", "startedAt", "finishedAt", "nextRestartAt", "ready", "started")
# written only when known: most containers never have them (a status is written and read often)
_OPTIONAL_FIELDS = ("lastTerminationReason",)


def _failed(c: Mapping[str, Any]) -> bool:
    return c.get("reason") not in (None, "Completed") or (c.get("exitCode") or 0) != 0


def derive(obs: Observed, desired: str) -> dict[str, Any]:
    """The status a pod shows for an observation (phase, reason, exit code, containers...)."""
    containers = [{k: c.get(k) for k in _CONTAINER_FIELDS} for c in obs.containers]
    for c, seen in zip(containers, obs.containers, strict=True):
        c.update((k, seen[k]) for k in _OPTIONAL_FIELDS if seen.get(k) is not None)
    for c in containers:   # without probes, a running container is started and ready
        for key in ("ready", "started"):
            if c[key] is None:
                c[key] = c["state"] == "running"
    phase, reason, message, exit_code = _phase(obs, containers, desired)
    return readiness({
        "phase": phase.value, "reason": reason, "message": message, "exitCode": exit_code,
        "restartCount": sum(int(c.get("restartCount") or 0) for c in containers),
        "containers": containers,
        "endpoints": obs.endpoints if phase == Phase.RUNNING else [],
        "cgroup": obs.cgroup, "pids": obs.pids, "internalIp": obs.internal_ip,
        "startedAt": obs.started_at,
    })


def readiness(status: dict[str, Any]) -> dict[str, Any]:
    """``status`` with its pod-level readiness from its containers': ``ready`` and the Ready
    condition (Kubernetes' spelling), False with the containers not ready as the reason."""
    containers = status.get("containers") or []
    unready = [c["name"] for c in containers if not c.get("ready")]
    ready = status.get("phase") == Phase.RUNNING.value and bool(containers) and not unready
    condition: dict[str, Any] = {"type": "Ready", "status": "True" if ready else "False"}
    if not ready:
        condition["reason"] = "ContainersNotReady" if unready else "PodNotRunning"
        if unready:
            condition["message"] = f"containers with unready status: [{' '.join(unready)}]"
    status["ready"] = ready
    status["conditions"] = [condition]
    return status


def _phase(obs: Observed, containers: list[dict[str, Any]], desired: str
           ) -> tuple[Phase, str | None, str | None, int | None]:
    if desired != "running":
        return (Phase.TERMINATING if obs.alive else Phase.TERMINATED), None, None, None
    if obs.lost:
        return Phase.ERROR, "ShimLost", "the pod's shim died; it will be restarted", None
    if obs.blocked and obs.alive:
        # The proxy cannot hold a host port of the pod: its traffic would go elsewhere.
        return Phase.ERROR, BLOCKED_REASON, obs.blocked, None
    waiting = [c for c in containers if c["state"] == "waiting"]
    failed = [c for c in containers if c["state"] != "running" and _failed(c)]
    if failed:
        worst = failed[0]
        pending = worst["state"] == "waiting" and worst.get("nextRestartAt")
        reason = worst.get("reason") or "Error"
        message = worst.get("message") or (f"container {worst['name']} will be restarted"
                                            if pending else f"container {worst['name']} failed")
        return Phase.ERROR, reason, message, worst.get("exitCode")
    if any(c["state"] == "running" for c in containers):
        return Phase.RUNNING, None, None, None
    if waiting or not containers:
        return Phase.CREATING, None, None, None
    return Phase.TERMINATED, "Completed", None, 0


def same(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether writing ``new`` over ``old`` would change anything a user sees."""
    return old is not None and {k: old.get(k) for k in new} == dict(new)
