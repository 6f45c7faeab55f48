"""Evicting pods whose disk emptyDir outgrows its ``sizeLimit``, as kubelet does (reason
``EmptyDirSizeLimit``): the pod is stopped, kept, and shows the reason until it is applied
again or deleted.

Only pods that have a disk emptyDir with a sizeLimit are watched: the set is kept from memory's
change stream (:meth:`SizeWatch.changed`), so a node of 1,000 pods without limits costs
nothing. Each check walks the limited directories (``os.scandir``, no process spawned) and
stops a walk as soon as it passes the limit, so one check of a pod costs at most the walk of
its limit's worth of files. Memory emptyDirs need no watch: their tmpfs has the size.

The stop is ``desired: stopped`` fenced to the generation that was checked; the reason goes in
the status first (``status.evicted``, naming the generation the stop makes), where the
reconciler finds it when it writes the pod Terminated.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

from common.errors import Conflict, NotFound, RikletError
from common.memclient import MemoryClient
from services.manager.volumes.layout import EMPTY_DIRS

log = logging.getLogger(__name__)

REASON = "EmptyDirSizeLimit"
_Watched = tuple[str, int, list[tuple[str, int]]]   # uid, generation, [(volume, limit)]


def disk_limits(spec: Mapping[str, Any]) -> list[tuple[str, int]]:
    """(volume name, sizeLimit) of each disk emptyDir with a limit in a normalized pod spec."""
    out = []
    for v in spec.get("volumes") or ():
        ed = v.get("emptyDir")
        if ed is not None and ed.get("medium") != "Memory" and ed.get("sizeLimit"):
            out.append((str(v["name"]), int(ed["sizeLimit"])))
    return out


def usage_over(path: str, limit: int) -> int | None:
    """Bytes the files under ``path`` take (allocated blocks), once that is over ``limit``;
    None while it is not (the walk stops as soon as it is)."""
    total, seen, stack = 0, set(), [path]
    while stack:
        with contextlib.suppress(OSError), os.scandir(stack.pop()) as it:
            for entry in it:
                with contextlib.suppress(OSError):
                    st = entry.stat(follow_symlinks=False)
                    if st.st_nlink > 1:
                        if (st.st_dev, st.st_ino) in seen:
                            continue
                        seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
                    if total > limit:
                        return total
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
    return None


class SizeWatch:
    def __init__(self, memory: MemoryClient, pod_dir: Callable[[str], str], interval: float) -> None:
        self.memory = memory
        self.pod_dir = pod_dir
        self.interval = interval
        self.recorder: Any = None     # pod events: Evicted (set by main)
        self._lock = threading.Lock()
        self._watched: dict[str, _Watched] = {}

    def changed(self, name: str, record: Mapping[str, Any] | None, before: Mapping[str, Any] | None) -> None:
        """A pod changed in memory (the mirror's callback): watch it while it is wanted running
        with a limited disk emptyDir."""
        running = record is not None and record.get("desired") == "running"
        limits = disk_limits(record.get("spec") or {}) if record is not None and running else []
        with self._lock:
            if limits and record is not None:
                self._watched[name] = (str(record["uid"]), int(record["generation"]), limits)
            else:
                self._watched.pop(name, None)

    @property
    def watched(self) -> int:
        with self._lock:
            return len(self._watched)

    def check(self) -> list[str]:
        """One pass over the watched pods; the names of those evicted."""
        with self._lock:
            pods = list(self._watched.items())
        evicted = []
        for name, (uid, generation, limits) in pods:
            for volume, limit in limits:
                used = usage_over(os.path.join(self.pod_dir(name), EMPTY_DIRS, volume), limit)
                if used is not None and self._evict(name, uid, generation, volume, used, limit):
                    evicted.append(name)
                    break
        return evicted

    def _evict(self, name: str, uid: str, generation: int, volume: str, used: int, limit: int) -> bool:
        message = (f"Usage of EmptyDir volume {volume!r} exceeds the limit: {used} bytes, "
                   f"sizeLimit {limit}")
        try:
            record = self.memory.get(name)
            status = {**(record.get("status") or {}),
                      "evicted": {"reason": REASON, "message": message, "generation": generation + 1}}
            self.memory.set_status(name, uid, status, generation=generation)
            self.memory.set_desired(name, "stopped", uid=uid, generation=generation)
        except (Conflict, NotFound):
            return False   # changed meanwhile: its new record is watched (or not) afresh
        log.warning("pod evicted", extra={"pod": name, "reason": REASON, "volume": volume,
                                          "used": used, "limit": limit})
        if self.recorder is not None:
            self.recorder.record(name, "Evicted", f"{REASON}: {message}", type="Warning", uid=uid)
        with self._lock:
            self._watched.pop(name, None)
        return True

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            try:
                self.check()
            except RikletError as exc:   # memory away for a moment: the next pass retries
                log.warning("emptyDir size check failed", extra={"error": str(exc)})


def evicted_reason(record: Mapping[str, Any]) -> dict[str, Any]:
    """The reason and message a stopped pod shows when :class:`SizeWatch` stopped it (for the
    generation it is at), else nothing."""
    ev = (record.get("status") or {}).get("evicted")
    if isinstance(ev, Mapping) and ev.get("generation") == record.get("generation"):
        return {"reason": ev.get("reason"), "message": ev.get("message")}
    return {}
