"""The prober: runs every container's liveness, readiness and startup probes on one event loop.

The reconciler tells the prober what runs (:meth:`Prober.adjust`, called with each observation
of a pod it is about to publish) and gets back the observation with each probed container's
``started`` and ``ready``, and the reason of a restart the prober caused. The prober never
writes a status itself: when a result changes what a pod shows (a container becomes ready or
not, a startup probe passes, a liveness probe fails for good), it pokes the pod, and the
reconciler's next sync publishes it, fenced like every other write. So a pod's readiness reaches
memory, and the proxy's routes, one sync after the probe that changed it.

Kubernetes' semantics: a container's probes start when it starts (``initialDelaySeconds``
after its start time) and stop when it stops; a new run of the container (restarted, or a new
pod) starts them again from scratch. Until its startup probe passes, the other two do not run.
Readiness starts failed and flips after ``successThreshold`` successes / ``failureThreshold``
failures in a row. A liveness or startup probe failing ``failureThreshold`` times in a row gets
the container killed (SIGTERM, then SIGKILL after the grace period, through a pidfd so a pid
reused meanwhile is never hit); its holder restarts it under the pod's restart policy and
back-off, and the status says ``Unhealthy``.

Cost: one timer and one connection per probe period, on one thread, the probes due within a
tenth of a second run in one wake-up; nothing per pod when no probe is due.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from common.probespec import PROBES
from services.manager.podevents import NullRecorder, Records
from services.manager.probes.checks import ExecRunner, run_check
from services.manager.runtime import Observed, PodRecord

log = logging.getLogger(__name__)

UNHEALTHY = "Unhealthy"
TICK = 0.1     # seconds: the grid probes are run on


@dataclasses.dataclass(eq=False)
class _Run:
    """One probe of one container run, and its streak."""

    kind: str
    spec: Mapping[str, Any]
    successes: int = 0
    failures: int = 0
    handle: asyncio.TimerHandle | None = None
    due: float = 0.0      # the loop's time its next attempt is due


@dataclasses.dataclass(eq=False)
class _Container:
    """The probes of one run of one container (a restart makes a new one)."""

    pod: str
    uid: str
    name: str
    started_at: float
    pid: int
    host: str
    grace: float
    run: ExecRunner | None
    runs: dict[str, _Run]
    started: bool = False
    ready: bool = False
    done: bool = False            # stopped, replaced or killed: its timers do nothing

    @property
    def incarnation(self) -> tuple[str, float, int]:
        return (self.uid, self.started_at, self.pid)


class Prober:
    def __init__(self, poke: Callable[[str], None], recorder: Records | None = None) -> None:
        self.poke = poke
        self.recorder: Records = recorder or NullRecorder()
        self.attempts = 0                       # probe attempts run, for tests and the bench
        self.telemetry: Any = None              # services.manager.telemetry.Telemetry
        self._lock = threading.Lock()
        self._pods: dict[str, dict[str, _Container]] = {}
        # (pod, container) -> (start time of the run killed, why): the restart's reason
        self._killed: dict[tuple[str, str], tuple[float, str]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Future[None]] = set()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        try:
            import uvloop
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover - uvloop is a dependency
            loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="prober", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return
        with self._lock:
            for containers in self._pods.values():
                for st in containers.values():
                    st.done = True
            self._pods.clear()
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._loop = None

    # -- what the reconciler calls -------------------------------------------------------------

    def forget(self, name: str) -> None:
        """The pod is gone or not wanted running: its probes stop."""
        if name not in self._pods and not self._killed:
            return   # every stop and delete of a pod without probes comes here: nothing to do
        with self._lock:
            containers = self._pods.pop(name, None)
            for key in [k for k in self._killed if k[0] == name]:
                del self._killed[key]
        for st in (containers or {}).values():
            self._end(st)

    def adjust(self, record: PodRecord, obs: Observed, desired: str, runtime: Any = None) -> Observed:
        """``obs`` with each probed container's ``started``/``ready`` (and an ``Unhealthy``
        reason for a run the prober killed); starts and stops probes as containers start and
        stop. O(containers) for a pod with probes, a dict lookup for one without."""
        name = record["name"]
        probed = {c["name"]: c for c in record["spec"].get("containers") or ()
                  if any(k in c for k in PROBES)}
        if not probed or desired != "running":
            if name in self._pods:
                self.forget(name)
            return obs
        begun: list[_Container] = []
        ended: list[_Container] = []
        containers = []
        with self._lock:
            current = self._pods.setdefault(name, {})
            for c in obs.containers:
                spec = probed.get(c["name"])
                if spec is None:
                    containers.append(c)
                    continue
                c = dict(c)
                st = current.get(c["name"])
                if obs.alive and c.get("state") == "running" and c.get("pid"):
                    inc = (record["uid"], float(c.get("startedAt") or 0.0), int(c["pid"]))
                    if st is None or st.incarnation != inc:
                        if st is not None:
                            ended.append(st)
                        st = self._new(record, spec, inc, obs, runtime)
                        current[c["name"]] = st
                        begun.append(st)
                    c["started"], c["ready"] = st.started, st.started and st.ready
                else:
                    if st is not None:
                        ended.append(current.pop(c["name"]))
                    c["started"] = c["ready"] = False
                killed = self._killed.get((name, c["name"]))
                if killed is not None:
                    if c.get("state") != "running" and float(c.get("startedAt") or 0.0) == killed[0]:
                        c["reason"], c["message"] = UNHEALTHY, killed[1]
                    elif c.get("state") == "running":
                        c["lastTerminationReason"] = UNHEALTHY
                containers.append(c)
        for st in ended:
            self._end(st)
        loop = self._loop
        if loop is not None:
            for st in begun:
                loop.call_soon_threadsafe(self._begin, st)
        return dataclasses.replace(obs, containers=containers)

    def _new(self, record: PodRecord, spec: Mapping[str, Any], inc: tuple[str, float, int],
             obs: Observed, runtime: Any) -> _Container:
        cname = spec["name"]
        runs = {kind: _Run(kind, spec[kind]) for kind in PROBES if kind in spec}
        exec_fn = getattr(runtime, "probe_exec", None)
        runner: ExecRunner | None = None
        if exec_fn is not None:
            def runner(argv: list[str], timeout: float) -> Any:
                return exec_fn(record, cname, argv, timeout)
        grace = float(record["spec"].get("gracePeriod") or 10.0)
        # The same run of the container as the stored status shows (a manager that restarted):
        # what its probes had found holds until they find otherwise, so a restart of the manager
        # never takes a ready pod out of the proxy's routes.
        stored = (record.get("status") or {}).get("containers") or ()
        before: Mapping[str, Any] = next(
            (c for c in stored if c.get("name") == cname and c.get("pid") == inc[2]
             and float(c.get("startedAt") or 0.0) == inc[1]), {})
        return _Container(pod=record["name"], uid=inc[0], name=cname, started_at=inc[1], pid=inc[2],
                          host=obs.internal_ip or "127.0.0.1", grace=grace, run=runner, runs=runs,
                          started="startupProbe" not in runs or before.get("started") is True,
                          ready="readinessProbe" not in runs or before.get("ready") is True)

    # -- on the loop ---------------------------------------------------------------------------

    def _end(self, st: _Container) -> None:
        st.done = True
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._cancel, st)

    @staticmethod
    def _cancel(st: _Container) -> None:
        for run in st.runs.values():
            if run.handle is not None:
                run.handle.cancel()
                run.handle = None

    def _begin(self, st: _Container) -> None:
        kinds = ("startupProbe",) if not st.started else ("livenessProbe", "readinessProbe")
        for kind in kinds:
            run = st.runs.get(kind)
            if run is not None:
                delay = st.started_at + float(run.spec["initialDelaySeconds"]) - time.time()
                self._schedule(st, run, max(0.0, delay))

    def _schedule(self, st: _Container, run: _Run, delay: float | None) -> None:
        """The next attempt ``delay`` seconds from now, or (None) one period after the last."""
        loop = self._loop
        if st.done or loop is None:
            return
        now = loop.time()
        run.due = now + delay if delay is not None else max(now, run.due + float(run.spec["periodSeconds"]))
        # On a grid of TICK: the probes due within one tick run in one wake-up of the loop
        # (a wake-up per probe would cost as much again as the probe: measured, 190 us an
        # attempt against 85 us), at most a tick later than their period says.
        when = math.ceil(run.due / TICK) * TICK
        run.handle = loop.call_at(when, self._fire, st, run)

    def _fire(self, st: _Container, run: _Run) -> None:
        run.handle = None
        if not st.done:
            task = asyncio.ensure_future(self._attempt(st, run))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _attempt(self, st: _Container, run: _Run) -> None:
        began = time.monotonic()
        try:
            ok, message = await run_check(run.spec, st.host, st.run)
        except Exception as exc:   # a bug in a check must not end the prober
            log.exception("probe crashed", extra={"pod": st.pod, "container": st.name})
            ok, message = False, f"probe error: {exc}"
        self.attempts += 1
        if self.telemetry is not None:
            self.telemetry.probe(run.kind, ok, time.monotonic() - began)
        if st.done:
            return
        if self._outcome(st, run, ok, message):
            self._schedule(st, run, None)

    def _outcome(self, st: _Container, run: _Run, ok: bool, message: str) -> bool:
        """Count one result; act when a threshold is crossed. Whether to probe again."""
        if ok:
            run.successes, run.failures = run.successes + 1, 0
        else:
            run.failures, run.successes = run.failures + 1, 0
            if run.failures == 1:
                what = run.kind.removesuffix("Probe").capitalize()
                self.recorder.record(st.pod, UNHEALTHY, f"{what} probe failed: {message}",
                                     type="Warning", uid=st.uid, container=st.name)
        if run.kind == "readinessProbe":
            if not st.ready and ok and run.successes >= int(run.spec["successThreshold"]):
                self._set(st, ready=True)
            elif st.ready and not ok and run.failures >= int(run.spec["failureThreshold"]):
                self._set(st, ready=False)
            return True
        if not ok and run.failures >= int(run.spec["failureThreshold"]):
            self._kill(st, run, message)
            return False
        if run.kind == "startupProbe" and ok:
            self._set(st, started=True)
            self._begin(st)
            return False
        return True

    def _set(self, st: _Container, **change: bool) -> None:
        with self._lock:
            for key, value in change.items():
                setattr(st, key, value)
        log.info("probe result changed", extra={"pod": st.pod, "container": st.name, **change})
        self.poke(st.pod)

    def _kill(self, st: _Container, run: _Run, message: str) -> None:
        what = run.kind.removesuffix("Probe")
        why = f"{what} probe failed: {message}"
        with self._lock:
            st.done = True
            self._killed[(st.pod, st.name)] = (st.started_at, why)
        self._cancel(st)
        log.warning("container failed its probe: killing it", extra={
            "pod": st.pod, "container": st.name, "probe": what, "error": message})
        self.recorder.record(st.pod, "Killing", f"Container {st.name} failed {what} probe, will be "
                             "restarted", type="Normal", uid=st.uid, container=st.name)
        grace = float(run.spec.get("terminationGracePeriodSeconds", st.grace))
        try:
            fd = os.pidfd_open(st.pid)
        except (ProcessLookupError, OSError):
            self.poke(st.pod)
            return
        try:
            signal.pidfd_send_signal(fd, signal.SIGTERM)
        except (ProcessLookupError, OSError):
            os.close(fd)
            self.poke(st.pod)
            return
        assert self._loop is not None
        self._loop.call_later(grace, self._kill_hard, fd)
        self.poke(st.pod)

    @staticmethod
    def _kill_hard(fd: int) -> None:
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        os.close(fd)
