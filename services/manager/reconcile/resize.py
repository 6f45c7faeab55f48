"""In-place resize: a running pod whose containers' resources changed (and nothing else) gets
its cgroup limits set anew, with the same processes and restart counts.

The reconciler asks :meth:`Sizer.check` on each sync of a live pod; it acts only when the
limits wanted differ from the last ones applied by this manager. After a manager restart it
does not know what was applied, so a pod with limits has them set once more (idempotent: the
kernel keeps the same values), which also finishes a resize acknowledged just before a crash.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from common.errors import RikletError
from services.manager.runtime import Limits, PodRecord, limits_of

log = logging.getLogger(__name__)


class Sizer:
    def __init__(self, recorder: Any = None) -> None:
        self._lock = threading.Lock()
        self._applied: dict[str, tuple[str, Limits]] = {}   # pod -> (uid, limits set)
        self.recorder = recorder      # pod events: Resized, ResizeFailed

    def started(self, record: PodRecord) -> None:
        """The pod was just started with its spec's limits."""
        with self._lock:
            self._applied[record["name"]] = (record["uid"], limits_of(record["spec"]))

    def forget(self, name: str) -> None:
        with self._lock:
            self._applied.pop(name, None)

    def check(self, record: PodRecord, runtime: Any) -> str | None:
        """Set the limits if they changed; the error when the kernel refused them."""
        name, want = record["name"], limits_of(record["spec"])
        with self._lock:
            before = self._applied.get(name)
        if before is not None and before == (record["uid"], want):
            return None
        if before is None and all(cpu is None and mem is None for _, cpu, mem in want):
            self.started(record)   # nothing to set: no limit asked, none set at start
            return None
        resize = getattr(runtime, "resize", None)
        if resize is None:
            return None
        try:
            resize(record)
        except RikletError as exc:
            log.warning("resize refused", extra={"pod": name, "error": str(exc)})
            if self.recorder is not None:
                self.recorder.record(name, "ResizeFailed", f"the kernel refused the new limits: {exc}",
                                     type="Warning", uid=record["uid"])
            self.started(record)   # not tried again until the limits change once more
            return str(exc)
        self.started(record)
        if before is not None and before[0] == record["uid"]:
            changed = [c for (c, *old), (_, *new) in zip(before[1], want, strict=False) if old != new]
            log.info("resized in place", extra={"pod": name, "containers": changed})
            for c, cpu, mem in want:
                if c in changed and self.recorder is not None:
                    self.recorder.record(name, "Resized", f"limits set in place: cpu {_cores(cpu)}, "
                                         f"memory {_bytes(mem)}", uid=record["uid"], container=c)
        return None

    def annotate(self, record: PodRecord, status: dict[str, Any]) -> dict[str, Any]:
        """``status`` with each container's limits in effect (``resources``), for a pod whose
        limits this manager set (at start or by a resize)."""
        with self._lock:
            applied = self._applied.get(record["name"])
        if applied is None or applied[0] != record["uid"]:
            return status
        limits = {name: {"cpu_millis": cpu, "memory_bytes": mem} for name, cpu, mem in applied[1]
                  if cpu is not None or mem is not None}
        if limits:
            for c in status.get("containers") or ():
                if c.get("name") in limits:
                    c["resources"] = limits[c["name"]]
        return status


def _cores(millis: int | None) -> str:
    return "unlimited" if millis is None else f"{millis}m"


def _bytes(n: int | None) -> str:
    return "unlimited" if n is None else f"{n / (1 << 20):g}Mi"
