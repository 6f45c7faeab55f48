"""The pods the monitor measures, learnt from memory's change stream (a
:class:`common.memclient.PodMirror` calls :meth:`PodTable.on_change`), never by listing them.

Each record is worked out once when it changes: where its usage is read from (its cgroup, its
containers' groups, its pids) and the figures its record fixes. Requests and sampling passes
then only look entries up.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from services.monitor.metrics import PodFacts, pod_facts
from services.monitor.pods import root_pids


@dataclass(frozen=True)
class PodEntry:
    name: str
    key: str                        # changes when the pod is replaced: its usage starts over
    record: Mapping[str, Any]       # as memory sent it; never changed in place
    facts: PodFacts
    cgroup: str | None              # relative cgroup path, None when it has none we may read
    pids: tuple[int, ...]
    containers: tuple[str, ...]     # running containers: each may have ``<cgroup>/<name>``

    # The CPU rate's key for each source: a pod that moves from one to the other starts over.
    @cached_property
    def cgroup_key(self) -> str:
        return f"{self.key}:cgroup:{self.cgroup}"

    @cached_property
    def pids_key(self) -> str:
        return f"{self.key}:pids:{','.join(map(str, sorted(self.pids)))}"


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def safe_relpath(value: Any) -> str | None:
    """A cgroup path below the root: not the root itself (the whole host), no ``..``."""
    if not isinstance(value, str):
        return None
    path = value.strip("/")
    parts = path.split("/")
    if not path or any(p in ("", ".", "..") for p in parts):
        return None
    return path


# What the monitor reads of a record (PodTable.entry, metrics.pod_facts, push): the mirror keeps
# only these (``kept``), not the whole spec and status, about 6 KiB a pod as decoded.
_TOP_KEYS = ("name", "uid", "version", "generation", "desired", "created_at")
_SPEC_KEYS = ("workload", "instance_id")
_SPEC_CONTAINER_KEYS = ("image", "resources")
_STATUS_KEYS = ("phase", "ready", "cgroup", "pids", "internalIp", "restartCount")
_STATUS_CONTAINER_KEYS = ("name", "state", "pid", "restartCount")


def _pick(value: Any, keys: tuple[str, ...]) -> Any:
    """``value``'s ``keys`` when it is an object; anything else as it is (the readers judge it)."""
    return {k: value[k] for k in keys if k in value} if isinstance(value, dict) else value


def _containers(value: Any, keys: tuple[str, ...], command: bool = False) -> Any:
    if not isinstance(value, list):
        return value
    out = []
    for c in value:
        one = _pick(c, keys)
        if command and isinstance(c, dict) and "command" in c:
            cmd = c["command"]
            one["command"] = cmd[:1] if isinstance(cmd, list) else cmd   # its program names an image-less pod
        out.append(one)
    return out


def kept(record: dict[str, Any]) -> dict[str, Any]:
    """What the monitor's mirror holds of a pod record (``PodMirror(keep=...)``): the fields its
    figures, its sampling and its pushes read, in the record's own shape."""
    out = _pick(record, _TOP_KEYS)
    spec, status = record.get("spec"), record.get("status")
    if spec is not None:
        out["spec"] = _pick(spec, _SPEC_KEYS)
        if isinstance(spec, dict) and "containers" in spec:
            out["spec"]["containers"] = _containers(spec["containers"], _SPEC_CONTAINER_KEYS, command=True)
    if status is not None:
        out["status"] = _pick(status, _STATUS_KEYS)
        if isinstance(status, dict) and "containers" in status:
            out["status"]["containers"] = _containers(status["containers"], _STATUS_CONTAINER_KEYS)
    return out


def entry(record: Mapping[str, Any]) -> PodEntry:
    status = _dict(record.get("status"))
    names = []
    for c in status.get("containers") or []:
        name = c.get("name") if isinstance(c, Mapping) else None
        if isinstance(name, str) and c.get("state") == "running" and safe_relpath(name) == name \
                and "/" not in name:
            names.append(name)
    uid = record.get("uid") or record.get("name")
    return PodEntry(str(record.get("name")), f"pod:{uid}", record, pod_facts(record),
                    safe_relpath(status.get("cgroup")), tuple(root_pids(status)), tuple(names))


class PodTable:
    """Thread-safe: the mirror's thread writes, the sampling and request threads read.
    ``on_new`` runs (on the mirror's thread) when a pod arrives, is replaced or moves to
    another cgroup or pids."""

    def __init__(self, synced: Callable[[float], bool] = lambda _timeout: True,
                 on_new: Callable[[], None] = lambda: None) -> None:
        self.is_synced = synced     # waits up to its argument, in seconds
        self.on_new = on_new
        self._ever_synced = False
        self._lock = threading.Lock()
        self._entries: dict[str, PodEntry] = {}

    def wait_synced(self, timeout: float) -> bool:
        """Memory was reached once (waiting up to ``timeout`` for it): from then on the pods
        last heard of are served, through a memory restart too."""
        if not self._ever_synced:
            self._ever_synced = self.is_synced(timeout)
        return self._ever_synced

    def on_change(self, name: str, record: Mapping[str, Any] | None) -> None:
        if record is None:
            with self._lock:
                self._entries.pop(name, None)
            return
        new = entry(record)
        with self._lock:
            old = self._entries.get(name)
            self._entries[name] = new
        if old is None or old.key != new.key or old.cgroup != new.cgroup or old.pids != new.pids:
            self.on_new()

    def get(self, name: str) -> PodEntry | None:
        with self._lock:
            return self._entries.get(name)

    def entries(self) -> list[PodEntry]:
        with self._lock:
            return list(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)
