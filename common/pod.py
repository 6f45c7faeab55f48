"""The pod as every service sees it: its record in memory, its status and its phase, typed and
spelled once.

A record travels between services as JSON (memory's store, its change stream, IPC replies): the
field names below are that wire format, camelCase inside ``status`` as the Node API shows it.
:meth:`PodRecord.from_json` is the boundary: what comes in is checked once there and used typed
afterwards. Services that only need one fact of a record on a hot path (the proxy's route table,
a report) use :func:`phase_of` / :func:`desired_of`, which apply the same defaults without
building the whole record.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from common.errors import BadFrame


class Phase(StrEnum):
    """Where a pod is in its life. Pending: accepted, not started; Creating; Running; Error:
    crashed or failed to start (with reason and exit code); Terminating; Terminated."""

    PENDING = "Pending"
    CREATING = "Creating"
    RUNNING = "Running"
    ERROR = "Error"
    TERMINATING = "Terminating"
    TERMINATED = "Terminated"


class Desired(StrEnum):
    """What a pod is wanted to be: running, stopped (kept, not running) or deleted (going)."""

    RUNNING = "running"
    STOPPED = "stopped"
    DELETED = "deleted"


class ContainerState(StrEnum):
    WAITING = "waiting"
    RUNNING = "running"
    TERMINATED = "terminated"


def phase_of(record: Mapping[str, Any]) -> Phase:
    """A record's phase; Pending when it has none yet (or one this version does not know)."""
    status = record.get("status")
    raw = status.get("phase") if isinstance(status, Mapping) else None
    try:
        return Phase(raw) if raw else Phase.PENDING
    except ValueError:
        return Phase.PENDING


def desired_of(record: Mapping[str, Any]) -> Desired:
    """A record's desired state; running when it does not say."""
    try:
        return Desired(record.get("desired") or Desired.RUNNING)
    except ValueError:
        return Desired.RUNNING


def instance_id_of(record: Mapping[str, Any]) -> str | None:
    """The RIK scheduler's instance id of a pod it created (None for pods made on the node)."""
    value = (record.get("spec") or {}).get("instance_id")
    return value if isinstance(value, str) and value else None


def ready_of(record: Mapping[str, Any]) -> bool:
    """Whether a pod is ready: its readiness probes pass (status ``ready``). A status written
    before readiness existed says nothing, and a pod that says nothing counts as ready."""
    status = record.get("status")
    return not isinstance(status, Mapping) or status.get("ready") is not False


def serving(record: Mapping[str, Any]) -> bool:
    """Whether a pod should receive traffic: wanted running, running and ready."""
    return (desired_of(record) is Desired.RUNNING and phase_of(record) is Phase.RUNNING
            and ready_of(record))


@dataclass(frozen=True, slots=True)
class ContainerStatus:
    name: str
    state: ContainerState
    pid: int | None = None
    restart_count: int = 0
    exit_code: int | None = None
    signal: str | None = None
    reason: str | None = None
    message: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    next_restart_at: float | None = None
    ready: bool | None = None             # readiness: running and its readiness probe passes
    started: bool | None = None           # its startup probe passed (or it has none)
    last_termination_reason: str | None = None   # why its previous run ended, when riklet knows

    _WIRE = (("pid", "pid"), ("restart_count", "restartCount"), ("exit_code", "exitCode"),
             ("signal", "signal"), ("reason", "reason"), ("message", "message"),
             ("started_at", "startedAt"), ("finished_at", "finishedAt"),
             ("next_restart_at", "nextRestartAt"), ("ready", "ready"), ("started", "started"),
             ("last_termination_reason", "lastTerminationReason"))

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "containers") -> ContainerStatus:
        name = data.get("name")
        if not isinstance(name, str):
            raise BadFrame("must be a string", f"{where}.name")
        try:
            state = ContainerState(data.get("state") or ContainerState.WAITING)
        except ValueError:
            raise BadFrame(f"unknown state {str(data.get('state'))[:32]!r}", f"{where}.state") from None
        values: dict[str, Any] = {attr: data.get(key) for attr, key in cls._WIRE}
        values["restart_count"] = int(values["restart_count"] or 0)
        return cls(name=name, state=state, **values)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "state": self.state.value}
        out.update((key, getattr(self, attr)) for attr, key in self._WIRE)
        return out


@dataclass(frozen=True, slots=True)
class PodStatus:
    phase: Phase = Phase.PENDING
    reason: str | None = None
    message: str | None = None
    exit_code: int | None = None
    restart_count: int = 0
    containers: tuple[ContainerStatus, ...] = ()
    endpoints: tuple[Mapping[str, Any], ...] = ()
    cgroup: str | None = None
    pids: tuple[int, ...] = ()
    internal_ip: str | None = None
    started_at: float | None = None
    transition_at: float | None = None
    ready: bool | None = None
    conditions: tuple[Mapping[str, Any], ...] = ()

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> PodStatus:
        data = data or {}
        containers = data.get("containers")
        containers = [] if containers is None else containers
        if not isinstance(containers, list):
            raise BadFrame("must be a list", "status.containers")
        return cls(
            phase=phase_of({"status": data}), reason=data.get("reason"), message=data.get("message"),
            exit_code=data.get("exitCode"), restart_count=int(data.get("restartCount") or 0),
            containers=tuple(ContainerStatus.from_json(c, f"status.containers[{i}]")
                             for i, c in enumerate(containers)),
            endpoints=tuple(data.get("endpoints") or ()), cgroup=data.get("cgroup"),
            pids=tuple(int(p) for p in data.get("pids") or ()), internal_ip=data.get("internalIp"),
            started_at=data.get("startedAt"), transition_at=data.get("transitionAt"),
            ready=data.get("ready"), conditions=tuple(data.get("conditions") or ()))

    def to_json(self) -> dict[str, Any]:
        return {
            "phase": self.phase.value, "reason": self.reason, "message": self.message,
            "exitCode": self.exit_code, "restartCount": self.restart_count,
            "containers": [c.to_json() for c in self.containers],
            "endpoints": [dict(e) for e in self.endpoints], "cgroup": self.cgroup,
            "pids": list(self.pids), "internalIp": self.internal_ip, "startedAt": self.started_at,
            "transitionAt": self.transition_at, "ready": self.ready,
            "conditions": [dict(c) for c in self.conditions],
        }

    @property
    def ready_containers(self) -> int:
        """Containers ready (running, readiness passing); a status from before readiness
        existed counts the running ones."""
        return sum(1 for c in self.containers if c.ready or (c.ready is None and c.state is
                                                              ContainerState.RUNNING))


@dataclass(frozen=True, slots=True)
class PodRecord:
    """One pod as memory keeps it: identity (name, uid), the fence (generation), what is wanted
    (desired, spec) and what was last seen (status)."""

    name: str
    uid: str
    generation: int
    desired: Desired
    spec: Mapping[str, Any]
    status: PodStatus = field(default_factory=PodStatus)
    created_at: float | None = None
    updated_at: float | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PodRecord:
        for key, kind in (("name", str), ("uid", str), ("generation", int), ("spec", Mapping)):
            value = data.get(key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise BadFrame(f"must be a {kind.__name__}", key)
        return cls(name=data["name"], uid=data["uid"], generation=data["generation"],
                   desired=desired_of(data), spec=data["spec"],
                   status=PodStatus.from_json(data.get("status")),
                   created_at=data.get("created_at"), updated_at=data.get("updated_at"))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "uid": self.uid, "generation": self.generation,
                "desired": self.desired.value, "spec": dict(self.spec), "status": self.status.to_json(),
                "created_at": self.created_at, "updated_at": self.updated_at}

    @property
    def workload(self) -> str | None:
        value = self.spec.get("workload")
        return value if isinstance(value, str) else None
