"""What the reconciler needs from a runtime driver, whatever runs the containers."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from common import blocked_ports, cgroups
from common.errors import RikletError

PodRecord = Mapping[str, Any]


def legacy_spec_hash(spec: Mapping[str, Any]) -> str:
    """The digest drivers recorded before in-place resize: the whole spec, resources included."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def spec_hash(spec: Mapping[str, Any]) -> str:
    """A stable digest of a pod spec without its containers' resources: when it changes, the
    pod's containers are replaced; a change of resources alone is applied in place."""
    shape = {**spec, "containers": [{k: v for k, v in c.items() if k != "resources"}
                                    for c in spec.get("containers") or ()]}
    return "s" + hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def same_spec(recorded: str, spec: Mapping[str, Any]) -> bool:
    """Whether a driver's recorded digest is of ``spec`` (a pod started before in-place resize
    recorded the whole spec's: one whose resources changed since is replaced, as then)."""
    return recorded == spec_hash(spec) or recorded == legacy_spec_hash(spec)


Limits = tuple[tuple[str, int | None, int | None], ...]


def limits_of(spec: Mapping[str, Any]) -> Limits:
    """Each container's (name, cpu millis, memory bytes) limits."""
    return tuple((c["name"], (c.get("resources") or {}).get("cpu_millis"),
                  (c.get("resources") or {}).get("memory_bytes")) for c in spec.get("containers") or ())


@dataclass(frozen=True)
class Observed:
    """What a driver sees of one pod right now."""

    alive: bool                       # the holder (shim, task) is running
    spec_hash: str                    # the spec it was started with
    stopped: bool                     # the agent stopped it on purpose (stop or delete)
    lost: bool                        # the holder died without finishing its containers
    containers: list[dict[str, Any]] = field(default_factory=list)
    endpoints: list[dict[str, Any]] = field(default_factory=list)
    cgroup: str | None = None
    pids: list[int] = field(default_factory=list)
    internal_ip: str = "127.0.0.1"
    started_at: float | None = None
    blocked: str | None = None        # a host port of the pod the proxy cannot hold: why
    # (pid, start time) of a live holder whose exit the reconciler learns through a pidfd
    holder: tuple[int, int] | None = None
    # seconds after which the reconciler observes the pod again unasked: for drivers whose
    # changes announce themselves by no event (containerd); None: events suffice
    recheck_after: float | None = None


class PodLayout:
    """Where a driver keeps a pod's files (``<state>/pods/<name>``, logs under ``logs/``, the
    same for every runtime so that logs read alike) and its cgroups: keyed by the state dir, so
    agents side by side on one machine never share a group."""

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.root = os.path.join(state_dir, "pods")
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        self.agent_id = hashlib.sha256(os.path.abspath(state_dir).encode()).hexdigest()[:8]
        self.blocked_ports = blocked_ports.Reader(blocked_ports.path_in(state_dir))

    def pod_dir(self, name: str) -> str:
        return os.path.join(self.root, name)

    def log_path(self, pod_name: str, container: str) -> str:
        return os.path.join(self.pod_dir(pod_name), "logs", f"{container}.log")

    def cgroup_parent(self, name: str) -> str:
        return f"riklet/{self.agent_id}/{name}"

    def resize(self, pod: PodRecord) -> None:
        """Set every container's cgroup limits to the spec's, in place (the same processes go
        on); the same for both drivers, whose containers' groups are ``<pod group>/<name>``."""
        layout = getattr(self, "layout", None)
        for name, cpu, memory in limits_of(pod["spec"]):
            cgroups.Cgroup(f"{self.cgroup_parent(pod['name'])}/{name}", layout).set_limits(cpu, memory)

    def memory_usage(self, pod_name: str, container: str) -> int | None:
        """A container's working set now (bytes), None when it has no group."""
        group = cgroups.Cgroup(f"{self.cgroup_parent(pod_name)}/{container}", getattr(self, "layout", None))
        try:
            return group.usage().memory_bytes if group.exists() else None
        except RikletError:
            return None

    def agent_cgroup(self) -> str:
        """The parent of every pod group of this agent (``riklet/`` itself is shared)."""
        return f"riklet/{self.agent_id}"


class Runtime(Protocol):
    name: str
    # Starts take milliseconds (no image to pull): the pod goes from Pending to its first
    # observed phase, with no Creating written in between.
    quick_start: bool

    def observe(self, pod: PodRecord) -> Observed | None:
        """The pod as it runs now; None if this driver holds nothing for it."""

    def start(self, pod: PodRecord) -> Observed:
        """Start the pod's containers (the pod holds nothing alive when this is called)."""

    def stop(self, pod: PodRecord) -> None:
        """Ask the pod's containers to stop (grace period, then kill); returns at once."""

    def cleanup(self, pod: PodRecord) -> None:
        """Forget everything held for a stopped pod (files, cgroups)."""

    def log_path(self, pod_name: str, container: str) -> str:
        """Where a container's current log file is."""
