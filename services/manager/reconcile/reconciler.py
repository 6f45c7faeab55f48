"""The reconciler: makes what runs match what memory says should run.

Each pod is synced by one worker at a time; a pod that changes while its sync runs is synced
again afterwards (only the newest desired state matters: intermediate ones are skipped on
purpose). Every step is idempotent and never blocks on a workload: stopping sends the signal
and the next sync sees the result.

Nothing polls every pod. A pod is synced when something says it changed: memory (an apply, a
stop, a delete; not the echo of a status this reconciler wrote), its shim (a datagram after each
status write, see :mod:`.events`), its shim's exit (a pidfd, :mod:`.pidwatch`, which also
catches a SIGKILL), or the proxy's blocked-ports file (looked at once a second). A driver whose
changes announce themselves by no event asks for a recheck (``Observed.recheck_after``:
containerd pods), a sync that failed is retried after ``interval``, and a slow resync looks at
every other pod once per ``resync_interval``, spread evenly, as a safety net (:mod:`.schedule`).

Every write to memory is fenced by the uid and generation of the record the sync read: when the
pod was applied, stopped or deleted again meanwhile, memory refuses the write (Conflict) and the
newer record, already on its way through the mirror, is synced next. A delete finishing late can
therefore never remove or mislabel the pod applied after it.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Mapping
from typing import Any

from common import blocked_ports
from common.errors import Conflict, NotFound, RikletError, Unavailable
from common.memclient import MemoryClient
from services.manager.podevents import NullRecorder, Records, StatusEvents
from services.manager.probes import Prober
from services.manager.reconcile.pidwatch import PidWatch
from services.manager.reconcile.resize import Sizer
from services.manager.reconcile.schedule import Clock, Pacer, Timers
from services.manager.reconcile.status import Phase, derive, same
from services.manager.runtime import Observed, PodRecord, Runtime, same_spec
from services.manager.volumes.sizewatch import evicted_reason

log = logging.getLogger(__name__)


URGENT, ROUTINE = 0, 1
# A pod asked to stop is shown Terminating only if it is still there this much later (seconds).
TERMINATING_AFTER = 0.5
# What a pod is wanted to be; only the reconciler writes the rest (its status).
_WANTED = ("uid", "generation", "desired", "spec")


class Reconciler:
    """Syncs pods on worker threads fed by a priority queue: a pod somebody just changed goes
    before the routine checks (rechecks, resync), so a new pod never waits behind a hundred."""

    def __init__(self, memory: MemoryClient, runtimes: Mapping[str, Runtime],
                 pods: Any, interval: float = 0.5, workers: int = 8, *,
                 resync_interval: float = 30.0, blocked: blocked_ports.Reader | None = None,
                 clock: Clock = time.monotonic, recorder: Records | None = None,
                 probes: bool = False) -> None:
        self.memory = memory
        self.recorder = recorder or NullRecorder()    # pod events: what happened, for users
        self.status_events = StatusEvents(self.recorder)
        self.runtimes = runtimes
        self.pods = pods              # a PodMirror: .get(name), .names()
        self.interval = interval      # a failed sync is tried again this much later
        self.blocked = blocked        # the proxy's blocked ports, refreshed here once a second
        self.clock = clock
        self.timers = Timers()
        self.pacer = Pacer(resync_interval, clock())
        self.holders = PidWatch(self.poke)
        # containers' health probes; their results come back through adjust() in each sync
        self.prober = Prober(self.poke, self.recorder) if probes else None
        self.telemetry: Any = None   # services.manager.telemetry.Telemetry: pod start latency
        self.sizer = Sizer(self.recorder)
        self.syncs = 0                         # syncs run, for tests and diagnostics
        self.resync_skipped = 0                # resync looks a driver found needless
        self._queue: queue.PriorityQueue[tuple[int, int, str]] = queue.PriorityQueue()
        self._order = itertools.count()
        self._lock = threading.Lock()
        self._queued: dict[str, int] = {}     # name -> best priority waiting in the queue
        self._running: set[str] = set()
        self._again: set[str] = set()
        self._offered: dict[str, PodRecord] = {}        # records this manager just wrote
        self._acted: dict[str, tuple[str, int]] = {}     # name -> (uid, generation) last synced
        # name -> ((uid, generation), clock) of the stop sent to a pod's holder
        self._stopping: dict[str, tuple[tuple[str, int], float]] = {}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._housekeep, name="reconciler", daemon=True)]
        self._threads += [threading.Thread(target=self._work, name=f"sync-{i}", daemon=True)
                          for i in range(workers)]

    def start(self) -> None:
        if self.blocked is not None:
            self.blocked.refresh()   # the first observations already see the blocked ports
        self.holders.start()
        if self.prober is not None:
            self.prober.start()
        for t in self._threads:
            t.start()
        self.poke()   # every pod once at start: what changed while no manager ran

    def stop(self) -> None:
        self._stop.set()
        self.timers.wake()
        for _ in self._threads:
            self._queue.put((-1, 0, ""))
        for t in self._threads:
            t.join(timeout=5)
        self.holders.stop()
        if self.prober is not None:
            self.prober.stop()

    def poke(self, name: str | None = None) -> None:
        """Something changed: sync ``name`` (or every pod) before the routine checks."""
        for n in ([name] if name is not None else self.pods.names()):
            self._submit(n, URGENT)

    def shim_said(self, name: str) -> None:
        """A shim's datagram: its pod's status file was rewritten. Nothing to sync when the
        files are as the last observe saw them (the status ``start`` returned with), or when
        the pod is being stopped and its holder is watched: its exit comes through the pidfd,
        and until then a sync would only read the files again."""
        with self._lock:
            stopping = name in self._stopping
        if (stopping and self.holders.watching(name)) or self._unchanged(name, count=False):
            return
        self.poke(name)

    def offer(self, record: PodRecord) -> None:
        """A record this manager has just written (an apply, a desired state): sync the pod now
        from this copy instead of waiting for memory's event to reach the mirror, which costs
        a hop between processes and one between threads. The mirror's copy is used instead
        when it is as new (same uid, no older version) or of another incarnation."""
        with self._lock:
            self._offered[record["name"]] = record
        self._submit(record["name"], URGENT)

    def changed(self, name: str, record: PodRecord | None, before: PodRecord | None) -> None:
        """Memory's word that a pod changed: sync it, unless all that changed is a status this
        reconciler wrote itself (the echo of its own write has nothing new to act on), or it
        is what a sync already acted on (an offered record's own event)."""
        if record is None:
            return
        if before is not None and all(before.get(k) == record.get(k) for k in _WANTED):
            return
        with self._lock:
            if self._acted.get(name) == (record.get("uid"), record.get("generation")):
                return
        self.poke(name)

    def _housekeep(self) -> None:
        """The one periodic thread: due rechecks, and once a second the blocked-ports file and
        the resync pacer. It sleeps until the earliest of those, woken by an earlier recheck."""
        second = self.clock() + 1.0
        while not self._stop.is_set():
            now = self.clock()
            due, next_due = self.timers.pop_due(now)
            for name in due:
                self._submit(name, ROUTINE)
            if now >= second:
                second = now + 1.0
                self._check_blocked()
                for name in self.pacer.take(now, self.pods.names):
                    self._resync(name)
            wake = second if next_due is None else min(second, next_due)
            self.timers.wait(wake - self.clock())

    def _resync(self, name: str) -> None:
        """The safety net's look at one pod, on this thread: a handful a second, each cheap (a
        few file reads), so handing them to a worker would cost more than it spares. Skipped
        when the pod is being synced anyway, or rechecked: a driver that asks for rechecks may
        be slow to answer (containerd), and is looked at often already."""
        if self.timers.has(name) or self._unchanged(name):
            return
        with self._lock:
            if name in self._running or name in self._queued:
                return
            self._running.add(name)
        self._run(name)

    def _unchanged(self, name: str, count: bool = True) -> bool:
        """A driver's cheap word that nothing happened to the pod since its last observe (a
        stat instead of file reads: at 5,000 pods the resync would otherwise cost a core's few
        percent). Changes in memory reach the reconciler through the mirror, not the resync."""
        for runtime in self.runtimes.values():
            check = getattr(runtime, "unchanged", None)
            if check is not None and check(name):
                self.resync_skipped += count
                return True
        return False

    def _check_blocked(self) -> None:
        """Sync the pods asking for a host port that was just blocked or set free."""
        if self.blocked is None:
            return
        changed = self.blocked.refresh()
        if not changed:
            return
        for name in self.pods.names():
            record = self.pods.get(name)
            if record is not None and _host_ports(record) & changed:
                self._submit(name, URGENT)

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

    def _freshest(self, name: str) -> PodRecord | None:
        record = self.pods.get(name)
        with self._lock:
            offered = self._offered.pop(name, None)
        if offered is None or (record is not None and (
                record.get("uid") != offered.get("uid") or record["version"] >= offered["version"])):
            return record
        return offered

    def _run(self, name: str) -> None:
        while True:
            record = self._freshest(name)
            if record is not None:
                with self._lock:
                    self._acted[name] = (record["uid"], record["generation"])
                self._sync_one(name, record)
            else:
                with self._lock:
                    self._acted.pop(name, None)
                    self._stopping.pop(name, None)
                self.holders.forget(name)
                self.timers.cancel(name)
                if self.prober is not None:
                    self.prober.forget(name)
                self.sizer.forget(name)
                self.status_events.forget(name)
            with self._lock:
                if name not in self._again:
                    self._running.discard(name)
                    return
                self._again.discard(name)

    def _sync_one(self, name: str, record: PodRecord) -> None:
        self.syncs += 1
        try:
            obs = self.sync(record)
        except Conflict as exc:  # memory has a newer record: its event brings it here
            log.debug("sync acted on a stale record", extra={"pod": name, "error": str(exc)})
            return
        except RikletError as exc:
            log.warning("sync failed, will retry", extra={"pod": name, "error": str(exc)})
            self.timers.schedule(name, self.clock() + self.interval)
            return
        except Exception:
            log.exception("sync crashed, will retry", extra={"pod": name})
            self.timers.schedule(name, self.clock() + self.interval)
            return
        # watch the holder while it lives: its exit (even by SIGKILL) brings the pod back here
        if obs is not None and obs.alive and obs.holder is not None:
            self.holders.watch(name, *obs.holder)
        else:
            self.holders.forget(name)
        if obs is not None and obs.recheck_after is not None:
            self.timers.schedule(name, self.clock() + obs.recheck_after)

    # -- one pod -----------------------------------------------------------------------------

    def runtime_of(self, record: PodRecord) -> Runtime:
        kinds = {c.get("runtime", "process") for c in record["spec"].get("containers", [])}
        kind = "containerd" if "containerd" in kinds else "process"
        runtime = self.runtimes.get(kind)
        if runtime is None:
            raise NotFound(f"no {kind} runtime is configured on this node", "spec.containers.runtime")
        return runtime

    def sync(self, record: PodRecord) -> Observed | None:
        """One step towards the desired state; the pod as last observed (None: nothing held)."""
        desired = record.get("desired", "running")
        try:
            runtime = self.runtime_of(record)
        except NotFound as exc:
            self._publish(record, {"phase": Phase.ERROR.value, "reason": "RuntimeUnavailable",
                                   "message": exc.message, "containers": [], "endpoints": []})
            if desired == "deleted":
                self.memory.remove(record["name"], record["uid"], record["generation"])
            return None
        obs = runtime.observe(record)
        if desired in ("deleted", "stopped"):
            return self._sync_stop(record, runtime, obs, desired)
        if obs is not None and obs.alive and not same_spec(obs.spec_hash, record["spec"]):
            log.info("spec changed: replacing containers", extra={"pod": record["name"]})
            if (record.get("status") or {}).get("phase") != Phase.TERMINATING.value:   # said once
                self.recorder.record(record["name"], "Killing", "the spec changed: replacing the containers",
                                     uid=record["uid"])
            self._publish(record, {**(record.get("status") or {}), "phase": Phase.TERMINATING.value})
            runtime.stop(record)
            return obs  # the next sync (the holder's exit) starts the new spec once the old is gone
        if self._should_start(record, obs):
            if self._other_runtime_busy(record, runtime):
                # the pod moved between runtimes: the old one's containers stop first, and the
                # old driver may announce nothing (containerd): look again soon
                self.timers.schedule(record["name"], self.clock() + self.interval)
                return obs
            if not runtime.quick_start:
                self._publish(record, {"phase": Phase.CREATING.value, "reason": None, "message": None,
                                       "containers": [], "endpoints": []})
            try:
                obs = runtime.start(record)
            except RikletError as exc:
                reason = "RuntimeUnavailable" if isinstance(exc, Unavailable) else "StartError"
                self._publish(self.pods.get(record["name"]) or record, {
                    "phase": Phase.ERROR.value, "reason": reason, "message": exc.message,
                    "containers": [], "endpoints": []})
                # tried again as the periodic pass did before events (containerd may come back)
                self.timers.schedule(record["name"], self.clock() + self.interval)
                return None
            log.info("pod started", extra={"pod": record["name"]})
            self.sizer.started(record)
        elif obs is not None and obs.alive:
            self.sizer.check(record, runtime)
        if obs is not None:
            if self.prober is not None:
                obs = self.prober.adjust(record, obs, desired, runtime)
            self._publish(record, self.sizer.annotate(record, derive(obs, desired)))
        return obs

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
        return obs.lost or obs.stopped or not same_spec(obs.spec_hash, record["spec"])

    def _sync_stop(self, record: PodRecord, runtime: Runtime, obs: Observed | None,
                   desired: str) -> Observed | None:
        if self.prober is not None:
            self.prober.forget(record["name"])
        if obs is not None and obs.alive:
            asked, now = (record["uid"], record["generation"]), self.clock()
            with self._lock:
                since = self._stopping.get(record["name"])
            first = since is None or since[0] != asked
            if first:
                runtime.stop(record)   # recorded once sent: a stop that failed is sent again
                with self._lock:
                    self._stopping[record["name"]] = (asked, now)
                # Most pods are gone a moment later, and a Terminating written now would only
                # be replaced at once: it is said of a pod still there after TERMINATING_AFTER.
                self.timers.schedule(record["name"], now + TERMINATING_AFTER)
            elif since is not None and now - since[1] >= TERMINATING_AFTER:
                self._publish(record, {**derive(obs, desired), "phase": Phase.TERMINATING.value})
                runtime.stop(record)   # again, as every later sync does: a holder ignores repeats
            return obs  # the holder's exit (event, pidfd) brings the pod back here
        with self._lock:
            stopped_now = self._stopping.pop(record["name"], None) is not None
        if stopped_now:
            self.timers.cancel(record["name"])   # its Terminating is moot: the pod has stopped
        if desired == "deleted":
            runtime.cleanup(record)
            try:
                self.memory.remove(record["name"], record["uid"], record["generation"])
            except NotFound:
                return None   # removed already: its Deleted was said then
            self.recorder.record(record["name"], "Deleted", "the pod is stopped and removed",
                                 uid=record["uid"])
            log.info("pod deleted", extra={"pod": record["name"]})
            return None
        if obs is not None and not obs.stopped:
            runtime.stop(record)  # marks it stopped so that a later apply starts it again
            obs = runtime.observe(record)
        status = derive(obs, desired) if obs is not None else {
            "phase": Phase.TERMINATED.value, "containers": [], "endpoints": []}
        # a pod stopped for outgrowing an emptyDir says so (services/manager/volumes/sizewatch.py)
        self._publish(record, {**status, "phase": Phase.TERMINATED.value, **evicted_reason(record)})
        return obs

    def _publish(self, record: PodRecord, status: dict[str, Any]) -> None:
        old = record.get("status") or {}
        if same(old, status):
            return
        status = {**old, **status, "transitionAt": time.time()} if old.get("phase") != status.get(
            "phase") else {**old, **status}
        self.memory.set_status(record["name"], record["uid"], status, generation=record["generation"])
        self.status_events.observed(record, old, status)   # the one place a status is written
        if self.telemetry is not None:
            self.telemetry.pod_status(record, old, status)


def _host_ports(record: PodRecord) -> set[blocked_ports.Key]:
    """The (protocol, host port) pairs a pod asks for."""
    ports = (record.get("spec") or {}).get("ports") or []
    return {(str(p.get("protocol") or "TCP").upper(), p["port"]) for p in ports
            if isinstance(p, Mapping) and isinstance(p.get("port"), int) and p["port"]}
