"""The reconciler: makes what runs match what memory says should run.

Each pod is synced by one worker at a time; a pod that changes while its sync runs is synced
again afterwards (only the newest desired state matters: intermediate ones are skipped on
purpose). Every step is idempotent and never blocks on a workload: stopping sends the signal
and the next sync sees the result. A periodic tick catches what no event announces (a container
exiting, a shim dying).

Every write to memory is fenced by the uid and generation of the record the sync read: when the
pod was applied, stopped or deleted again meanwhile, memory refuses the write (Conflict) and the
newer record, already on its way through the mirror, is synced next. A delete finishing late can
therefore never remove or mislabel the pod applied after it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Mapping
from typing import Any

from common.errors import Conflict, NotFound, RikletError, Unavailable
from common.memclient import MemoryClient
from services.manager.reconcile.status import Phase, derive, same
from services.manager.runtime import Observed, PodRecord, Runtime, spec_hash

log = logging.getLogger(__name__)


URGENT, ROUTINE = 0, 1


class Reconciler:
    """Syncs pods on worker threads fed by a priority queue: a pod somebody just changed goes
    before the periodic pass over every pod, so a new pod never waits behind a hundred checks."""

    def __init__(self, memory: MemoryClient, runtimes: Mapping[str, Runtime],
                 pods: Any, interval: float = 0.5, workers: int = 8) -> None:
        self.memory = memory
        self.runtimes = runtimes
        self.pods = pods              # a PodMirror: .get(name), .names()
        self.interval = interval
        self._queue: queue.PriorityQueue[tuple[int, int, str]] = queue.PriorityQueue()
        self._order = itertools.count()
        self._lock = threading.Lock()
        self._queued: dict[str, int] = {}     # name -> best priority waiting in the queue
        self._running: set[str] = set()
        self._again: set[str] = set()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._tick, name="reconciler", daemon=True)]
        self._threads += [threading.Thread(target=self._work, name=f"sync-{i}", daemon=True)
                          for i in range(workers)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for _ in self._threads:
            self._queue.put((-1, 0, ""))
        for t in self._threads:
            t.join(timeout=5)

    def poke(self, name: str | None = None) -> None:
        """Something changed: sync ``name`` (or every pod) before the routine checks."""
        for n in ([name] if name is not None else self.pods.names()):
            self._submit(n, URGENT)

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            for name in self.pods.names():
                self._submit(name, ROUTINE)

    def _submit(self, name: str, priority: int) -> None:
        with self._lock:
            if name in self._running:
                self._again.add(name)
                return
            if self._queued.get(name, ROUTINE + 1) <= priority:
                return
            self._queued[name] = priority
        self._queue.put((priority, next(self._order), name))

    def _work(self) -> None:
        while not self._stop.is_set():
            priority, _, name = self._queue.get()
            with self._lock:
                if self._queued.get(name) != priority or name in self._running:
                    continue  # a stale entry: the pod was queued again with a better priority
                del self._queued[name]
                self._running.add(name)
            self._run(name)

    def _run(self, name: str) -> None:
        while True:
            record = self.pods.get(name)
            if record is not None:
                try:
                    self.sync(record)
                except Conflict as exc:  # memory has a newer record: its event brings it here
                    log.debug("sync acted on a stale record", extra={"pod": name, "error": str(exc)})
                except RikletError as exc:
                    log.warning("sync failed, will retry", extra={"pod": name, "error": str(exc)})
                except Exception:
                    log.exception("sync crashed, will retry", extra={"pod": name})
            with self._lock:
                if name not in self._again:
                    self._running.discard(name)
                    return
                self._again.discard(name)

    # -- one pod -----------------------------------------------------------------------------

    def runtime_of(self, record: PodRecord) -> Runtime:
        kinds = {c.get("runtime", "process") for c in record["spec"].get("containers", [])}
        kind = "containerd" if "containerd" in kinds else "process"
        runtime = self.runtimes.get(kind)
        if runtime is None:
            raise NotFound(f"no {kind} runtime is configured on this node", "spec.containers.runtime")
        return runtime

    def sync(self, record: PodRecord) -> None:
        desired = record.get("desired", "running")
        try:
            runtime = self.runtime_of(record)
        except NotFound as exc:
            self._publish(record, {"phase": Phase.ERROR.value, "reason": "RuntimeUnavailable",
                                   "message": exc.message, "containers": [], "endpoints": []})
            if desired == "deleted":
                self.memory.remove(record["name"], record["uid"], record["generation"])
            return
        obs = runtime.observe(record)
        if desired in ("deleted", "stopped"):
            self._sync_stop(record, runtime, obs, desired)
            return
        if obs is not None and obs.alive and obs.spec_hash != spec_hash(record["spec"]):
            log.info("spec changed: replacing containers", extra={"pod": record["name"]})
            self._publish(record, {**(record.get("status") or {}), "phase": Phase.TERMINATING.value})
            runtime.stop(record)
            return  # the next sync starts the new spec once the old one is gone
        if self._should_start(record, obs):
            if self._other_runtime_busy(record, runtime):
                return  # the pod moved between runtimes: the old one's containers stop first
            self._publish(record, {"phase": Phase.CREATING.value, "reason": None, "message": None,
                                   "containers": [], "endpoints": []})
            try:
                obs = runtime.start(record)
            except RikletError as exc:
                reason = "RuntimeUnavailable" if isinstance(exc, Unavailable) else "StartError"
                self._publish(self.pods.get(record["name"]) or record, {
                    "phase": Phase.ERROR.value, "reason": reason, "message": exc.message,
                    "containers": [], "endpoints": []})
                return
            log.info("pod started", extra={"pod": record["name"]})
        if obs is not None:
            self._publish(record, derive(obs, desired))

    def progress(self, record: PodRecord, message: str) -> None:
        """A runtime's word on a slow start (an image pull), shown while the pod is Creating."""
        current = self.pods.get(record["name"]) or record
        self._publish(current, {"phase": Phase.CREATING.value, "reason": "PullingImage",
                                "message": message})

    def _other_runtime_busy(self, record: PodRecord, runtime: Runtime) -> bool:
        for other in self.runtimes.values():
            if other is runtime:
                continue
            obs = other.observe(record)
            if obs is None:
                continue
            if obs.alive:
                other.stop(record)
                return True
            other.cleanup(record)
        return False

    def _should_start(self, record: PodRecord, obs: Observed | None) -> bool:
        if obs is None:
            return True
        if obs.alive:
            return False
        # Not alive: start again if it was lost, stopped by us earlier, or runs an older spec.
        return obs.lost or obs.stopped or obs.spec_hash != spec_hash(record["spec"])

    def _sync_stop(self, record: PodRecord, runtime: Runtime, obs: Observed | None, desired: str) -> None:
        if obs is not None and obs.alive:
            self._publish(record, {**derive(obs, desired), "phase": Phase.TERMINATING.value})
            runtime.stop(record)
            return
        if desired == "deleted":
            runtime.cleanup(record)
            with contextlib.suppress(NotFound):
                self.memory.remove(record["name"], record["uid"], record["generation"])
            log.info("pod deleted", extra={"pod": record["name"]})
            return
        if obs is not None and not obs.stopped:
            runtime.stop(record)  # marks it stopped so that a later apply starts it again
            obs = runtime.observe(record)
        status = derive(obs, desired) if obs is not None else {
            "phase": Phase.TERMINATED.value, "containers": [], "endpoints": []}
        self._publish(record, {**status, "phase": Phase.TERMINATED.value})

    def _publish(self, record: PodRecord, status: dict[str, Any]) -> None:
        old = record.get("status") or {}
        if same(old, status):
            return
        status = {**old, **status, "transitionAt": time.time()} if old.get("phase") != status.get(
            "phase") else {**old, **status}
        self.memory.set_status(record["name"], record["uid"], status, generation=record["generation"])
