"""The reconciler on its own: a fake runtime driver (the Runtime protocol) against the REAL
memory service started in a temp dir, its mirror feeding the reconciler as in the manager.

Covers status derivation and the phase rules, when a pod is (re)started, the stop and delete
flows, stale records (Conflict) and generation fencing, and what makes a pod be synced: events
(coalesced), holders' exits (pidfds), rechecks a driver asks for, the blocked-ports file, the
paced resync, and nothing else (an idle reconciler does not poll).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from common import blocked_ports
from common.errors import Conflict, Unavailable
from common.memclient import MemoryClient, PodMirror
from services.manager.process.shimctl import proc_start_time
from services.manager.reconcile import reconciler
from services.manager.reconcile.events import ShimEvents
from services.manager.reconcile.pidwatch import raise_fd_limit
from services.manager.reconcile.reconciler import Reconciler
from services.manager.reconcile.schedule import Pacer, Timers
from services.manager.reconcile.status import derive, same
from services.manager.runtime import Observed, PodRecord, spec_hash
from tests.support import wait_for
from tests.test_memory_service import Memory

HOUR = 3600.0


def spec(*ports: int, command: str = "sleep") -> dict[str, Any]:
    return {"containers": [{"name": "app", "command": [command]}],
            "ports": [{"port": p, "target_port": p + 1, "protocol": "TCP", "container": "app"}
                      for p in ports]}


# -- a fake driver -------------------------------------------------------------------------------

@dataclass
class Held:
    """What the fake driver holds for one pod; ``holder`` is a real process standing for a shim."""

    spec_hash: str
    endpoints: list[dict[str, Any]]
    holder: subprocess.Popen[bytes] | None = None
    alive: bool = True
    stopped: bool = False
    exit_code: int | None = None


class FakeRuntime:
    name = "process"
    quick_start = False

    def __init__(self, *, holders: bool = False, recheck_after: float | None = None,
                 blocked: blocked_ports.Reader | None = None, quick_start: bool = False,
                 stubborn: bool = False) -> None:
        self.holders = holders
        self.quick_start = quick_start
        self.stubborn = stubborn   # holders ignore SIGTERM (a workload slow to stop)
        self.recheck_after = recheck_after
        self.blocked = blocked
        self.held: dict[str, Held] = {}
        self.observed: Counter[str] = Counter()
        self.started: Counter[str] = Counter()
        self.stops: Counter[str] = Counter()
        self.cleaned: Counter[str] = Counter()
        self.fail_starts = 0
        self.notify: Callable[[str], None] | None = None   # a shim's datagram, for holderless pods
        self.gates: dict[str, threading.Event] = {}
        self.entered: dict[str, threading.Event] = {}
        self.lock = threading.Lock()

    def observe(self, pod: PodRecord) -> Observed | None:
        name = pod["name"]
        self.observed[name] += 1
        if name in self.gates:
            self.entered[name].set()
            self.gates[name].wait(10)
        with self.lock:
            h = self.held.get(name)
            if h is None:
                return None
            if h.holder is not None and h.alive and h.holder.poll() is not None:
                h.alive = False   # the holder died: like a shim gone without a word
            state = "running" if h.alive else "terminated"
            container = {"name": "app", "state": state, "pid": h.holder.pid if h.holder else None,
                         "exitCode": h.exit_code, "reason": _reason(h.exit_code),
                         "restartCount": 0, "startedAt": 1.0}
            holder = None
            if h.holder is not None and h.alive:
                holder = (h.holder.pid, proc_start_time(h.holder.pid) or 0)
            return Observed(
                alive=h.alive, spec_hash=h.spec_hash, stopped=h.stopped,
                lost=not h.alive and h.exit_code is None and not h.stopped,
                containers=[container], endpoints=h.endpoints, holder=holder,
                recheck_after=self.recheck_after,
                blocked=self.blocked.message(h.endpoints) if self.blocked else None)

    def start(self, pod: PodRecord) -> Observed:
        self.started[pod["name"]] += 1
        if self.fail_starts:
            self.fail_starts -= 1
            raise Unavailable("the fake runtime is down", "runtime")
        endpoints = [{"host_port": p["port"], "protocol": p["protocol"], "address": "127.0.0.1",
                      "port": p["target_port"]} for p in pod["spec"].get("ports") or []]
        command = ["sh", "-c", "trap '' TERM; sleep 600"] if self.stubborn else ["sleep", "600"]
        holder = subprocess.Popen(command) if self.holders else None
        with self.lock:
            self.held[pod["name"]] = Held(spec_hash(pod["spec"]), endpoints, holder)
        obs = self.observe(pod)
        assert obs is not None
        return obs

    def stop(self, pod: PodRecord) -> None:
        """Like a shim given SIGTERM: a holder ends soon after, telling nobody (its pidfd
        tells); without one, the pod ends at once and says so (a shim's datagram)."""
        self.stops[pod["name"]] += 1
        with self.lock:
            h = self.held.get(pod["name"])
            if h is None:
                return
            h.stopped = True
            if h.holder is not None:
                h.holder.terminate()
                return
            h.alive = False
        if self.notify is not None:
            self.notify(pod["name"])

    def cleanup(self, pod: PodRecord) -> None:
        self.cleaned[pod["name"]] += 1
        with self.lock:
            h = self.held.pop(pod["name"], None)
        if h is not None and h.holder is not None:
            h.holder.kill()
            h.holder.wait()

    def exit(self, name: str, code: int) -> None:
        """The workload ends by itself (the caller tells the reconciler, as a shim's event)."""
        with self.lock:
            h = self.held[name]
            h.alive, h.exit_code = False, code

    def log_path(self, pod_name: str, container: str) -> str:
        return f"/nonexistent/{pod_name}/{container}.log"

    def close(self) -> None:
        for h in self.held.values():
            if h.holder is not None and h.holder.poll() is None:
                h.holder.kill()
                h.holder.wait()


def _reason(code: int | None) -> str | None:
    return None if code is None else ("Completed" if code == 0 else "Error")


# -- the harness: real memory, its mirror, the reconciler ----------------------------------------

class Harness:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.memory = Memory(base)
        self.memory.start()
        self.cfg = self.memory.config()
        self.client = MemoryClient(self.cfg)
        self.reconciler: Reconciler | None = None
        self.seen: dict[str, dict[str, Any]] = {}
        self.phases: dict[str, list[str]] = {}   # every phase memory published, per pod
        self.mirror = PodMirror(self.cfg, on_change=self._changed)
        self.mirror.start()
        assert self.mirror.wait_synced(10)
        self.runtime = FakeRuntime()

    def _changed(self, name: str, record: dict[str, Any] | None) -> None:
        before = self.seen.pop(name, None)
        if record is not None:
            self.seen[name] = record
            phases = self.phases.setdefault(name, [])
            phase = (record.get("status") or {}).get("phase")
            if not phases or phases[-1] != phase:
                phases.append(phase)
        if self.reconciler is not None:
            self.reconciler.changed(name, record, before)   # as the manager wires it

    def start(self, runtime: FakeRuntime | None = None, **options: Any) -> Reconciler:
        self.runtime = runtime or self.runtime
        options.setdefault("resync_interval", HOUR)
        self.reconciler = Reconciler(self.client, {"process": self.runtime}, self.mirror, **options)
        self.runtime.notify = self.reconciler.poke
        self.reconciler.start()
        return self.reconciler

    def status(self, name: str) -> dict[str, Any]:
        status: dict[str, Any] = self.client.get(name)["status"]
        return status

    def wait_phase(self, name: str, phase: str, timeout: float = 2.0) -> dict[str, Any]:
        return wait_for(lambda: self.status(name) if self.status(name).get("phase") == phase else None,
                        timeout, what=f"{name} {phase}")

    def settled(self) -> int:
        """Syncs so far, once none has run for a while (the echoes of status writes are over)."""
        assert self.reconciler is not None
        rec = self.reconciler

        def quiet() -> int | None:
            before = rec.syncs
            time.sleep(0.2)   # the quiet period being checked, not synchronisation
            return before if rec.syncs == before and not rec._running else None
        return wait_for(quiet, 5, what="the reconciler idle", interval=0)

    def close(self) -> None:
        if self.reconciler is not None:
            self.reconciler.stop()
        self.mirror.stop()
        self.client.close()
        self.runtime.close()
        self.memory.cleanup()


@pytest.fixture
def h() -> Iterator[Harness]:
    base = Path(tempfile.mkdtemp(dir="/tmp", prefix="rec"))
    harness = Harness(base)
    try:
        yield harness
    finally:
        harness.close()
        shutil.rmtree(base, ignore_errors=True)


# -- status derivation: pure ---------------------------------------------------------------------

def obs(*containers: dict[str, Any], alive: bool = True, lost: bool = False,
        blocked: str | None = None) -> Observed:
    return Observed(alive=alive, spec_hash="x", stopped=False, lost=lost, containers=list(containers),
                    endpoints=[{"host_port": 80, "protocol": "TCP", "address": "127.0.0.1", "port": 81}],
                    blocked=blocked)


RUNNING = {"name": "app", "state": "running", "pid": 7, "restartCount": 2}


def test_derive_running_shows_endpoints_and_restarts() -> None:
    status = derive(obs(RUNNING), "running")
    assert status["phase"] == "Running" and status["restartCount"] == 2
    assert status["endpoints"][0]["host_port"] == 80 and status["reason"] is None


def test_derive_error_rules_lost_blocked_failed() -> None:
    assert derive(obs(RUNNING, alive=False, lost=True), "running")["reason"] == "ShimLost"
    blocked = derive(obs(RUNNING, blocked="port 80 held by nginx"), "running")
    assert (blocked["phase"], blocked["reason"], blocked["message"]) == (
        "Error", "PortInUse", "port 80 held by nginx")
    assert blocked["endpoints"] == []   # traffic of a blocked port would go elsewhere
    backoff = derive(obs({"name": "app", "state": "waiting", "exitCode": 3, "reason": "Error",
                          "nextRestartAt": 99.0}), "running")
    assert (backoff["phase"], backoff["exitCode"]) == ("Error", 3)
    assert backoff["message"] == "container app will be restarted"


def test_derive_completed_creating_and_stopping() -> None:
    done = {"name": "app", "state": "terminated", "exitCode": 0, "reason": "Completed"}
    assert derive(obs(done, alive=False), "running")["phase"] == "Terminated"
    assert derive(obs(done, alive=False), "running")["reason"] == "Completed"
    assert derive(obs(alive=True), "running")["phase"] == "Creating"
    assert derive(obs(RUNNING), "stopped")["phase"] == "Terminating"
    assert derive(obs(done, alive=False), "deleted")["phase"] == "Terminated"


def test_same_ignores_only_unchanged_fields() -> None:
    assert same({"phase": "Running", "x": 1}, {"phase": "Running"})
    assert not same({"phase": "Running"}, {"phase": "Error"})
    assert not same(None, {"phase": "Running"})


def test_should_start_rules(h: Harness) -> None:
    rec = Reconciler(h.client, {"process": h.runtime}, h.mirror, resync_interval=HOUR)
    record = {"name": "p", "spec": spec()}
    mine = spec_hash(spec())

    def o(**kw: Any) -> Observed:
        return Observed(**{"alive": False, "spec_hash": mine, "stopped": False, "lost": False, **kw})
    assert rec._should_start(record, None)                      # nothing held
    assert not rec._should_start(record, o(alive=True))         # running
    assert rec._should_start(record, o(lost=True))              # its shim died
    assert rec._should_start(record, o(stopped=True))           # stopped by us, applied again
    assert rec._should_start(record, o(spec_hash="older"))      # an older spec ended
    assert not rec._should_start(record, o())                   # finished: the policy said no


# -- the flows, through real memory ---------------------------------------------------------------

def test_apply_starts_the_pod_and_publishes_running(h: Harness) -> None:
    h.start()
    h.client.apply("web", spec())
    status = h.wait_phase("web", "Running")
    assert status["containers"][0]["state"] == "running"
    assert h.runtime.started["web"] == 1


def test_a_failed_start_is_retried_after_the_interval_without_being_told(h: Harness) -> None:
    h.runtime.fail_starts = 2
    h.start(interval=0.1)
    h.client.apply("web", spec())
    h.wait_phase("web", "Running")
    assert h.runtime.started["web"] == 3


def test_stop_flow_terminated_on_the_holders_exit(h: Harness) -> None:
    rt = FakeRuntime(holders=True)
    h.start(rt)
    h.client.apply("web", spec())
    h.wait_phase("web", "Running")
    h.client.set_desired("web", "stopped")
    # the fake's holder ends on SIGTERM and tells nobody: only its pidfd brings the pod back
    h.wait_phase("web", "Terminated")
    assert rt.stops["web"] >= 1 and rt.cleaned["web"] == 0
    assert h.reconciler is not None and h.reconciler.holders.watched() == 0
    # stopped at once: no Terminating is written only to be replaced a moment later
    assert h.phases["web"] == ["Pending", "Creating", "Running", "Terminated"]


def test_delete_flow_removes_the_pod_on_the_holders_exit(h: Harness) -> None:
    rt = FakeRuntime(holders=True)
    h.start(rt)
    h.client.apply("web", spec())
    h.wait_phase("web", "Running")
    t0 = time.monotonic()
    h.client.set_desired("web", "deleted")
    wait_for(lambda: "web" not in [p["name"] for p in h.client.list()], 2, what="web removed")
    assert time.monotonic() - t0 < 1.0  # resync is an hour away: the exit itself did it
    assert rt.cleaned["web"] == 1 and "web" not in rt.held


def test_a_quick_runtime_goes_from_pending_to_running_without_creating(h: Harness) -> None:
    h.start(FakeRuntime(quick_start=True))
    h.client.apply("quick", spec())
    h.wait_phase("quick", "Running")
    assert h.phases["quick"] == ["Pending", "Running"]


def test_a_runtime_that_may_pull_images_says_creating_first(h: Harness) -> None:
    h.start(FakeRuntime())
    h.client.apply("slow", spec())
    h.wait_phase("slow", "Running")
    assert h.phases["slow"] == ["Pending", "Creating", "Running"]


def test_a_pod_slow_to_stop_is_shown_terminating_after_a_moment(h: Harness) -> None:
    rt = FakeRuntime(holders=True, stubborn=True)
    h.start(rt)
    h.client.apply("web", spec())
    h.wait_phase("web", "Running")
    t0 = time.monotonic()
    h.client.set_desired("web", "deleted")
    h.wait_phase("web", "Terminating", timeout=5)
    assert time.monotonic() - t0 >= reconciler.TERMINATING_AFTER
    assert "web" in [p["name"] for p in h.client.list()]


def test_a_stale_record_is_refused_by_memory_and_not_retried(h: Harness) -> None:
    rec = h.start()
    h.client.apply("web", spec())
    h.wait_phase("web", "Running")
    old = h.client.get("web")
    h.client.set_desired("web", "stopped")   # a newer generation
    h.wait_phase("web", "Terminated")
    h.runtime.exit("web", 0)
    stale = {**old, "status": {"phase": "Pending"}}   # would publish a Running status
    with pytest.raises(Conflict):
        rec.sync(stale)
    assert h.status("web")["phase"] == "Terminated"
    # through the worker: swallowed as stale, no retry scheduled (the newer record comes anyway)
    rec._sync_one("web", stale)
    assert rec.timers.pending() == 0 and h.status("web")["phase"] == "Terminated"


def test_a_late_delete_cannot_remove_the_pod_applied_after_it(h: Harness) -> None:
    rec = h.start()
    h.client.apply("web", spec())
    h.wait_phase("web", "Running")
    rec.stop()   # hold the delete: it "finishes late", after the new apply
    h.reconciler = None
    deleting = h.client.set_desired("web", "deleted")
    h.runtime.exit("web", 0)
    h.client.apply("web", spec(8080))
    with pytest.raises(Conflict):
        rec.sync(deleting)
    assert h.client.get("web")["spec"]["ports"][0]["port"] == 8080


def test_spec_change_replaces_the_containers(h: Harness) -> None:
    rt = FakeRuntime(holders=True)
    h.start(rt)
    h.client.apply("web", spec())
    h.wait_phase("web", "Running")
    h.client.apply("web", spec(9000))
    wait_for(lambda: rt.started["web"] == 2 and h.status("web")["phase"] == "Running", 2,
             what="the new spec running")
    assert h.status("web")["endpoints"][0]["host_port"] == 9000


# -- records the manager just wrote, offered before the mirror has them -----------------------------

class LateMirror:
    """A mirror that has not heard of anything yet (memory's events are still on their way)."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}

    def get(self, name: str) -> dict[str, Any] | None:
        return self.records.get(name)

    def names(self) -> list[str]:
        return list(self.records)


def test_an_offered_record_is_synced_before_the_mirror_has_it_and_its_event_adds_no_sync(
        h: Harness) -> None:
    mirror = LateMirror()
    rec = Reconciler(h.client, {"process": h.runtime}, mirror, resync_interval=HOUR)
    rec.start()
    try:
        record = h.client.apply("web", spec())["pod"]
        rec.offer(record)
        h.wait_phase("web", "Running")
        assert h.runtime.started["web"] == 1
        wait_for(lambda: not rec._running, 2, what="the sync over")
        syncs = rec.syncs
        mirror.records["web"] = record            # memory's event for it reaches the mirror
        rec.changed("web", record, None)
        assert rec.syncs == syncs and not rec._queued, "already acted on: not synced again"
        result = h.client.set_desired("web", "stopped")
        newer = mirror.records["web"] = result.get("pod", result)
        rec.changed("web", newer, record)         # what changed since is acted on
        wait_for(lambda: rec.syncs > syncs, 2, what="the newer record synced")
    finally:
        rec.stop()


def test_the_freshest_of_the_offered_and_the_mirrored_record_is_synced(h: Harness) -> None:
    mirror = LateMirror()
    rec = Reconciler(h.client, {"process": h.runtime}, mirror, resync_interval=HOUR)
    v1 = {"name": "web", "uid": "u1", "version": 1, "generation": 1, "spec": spec()}
    v2 = {**v1, "version": 2}
    other = {**v1, "uid": "u2", "version": 5}
    cases = [(None, v1, v1),          # the mirror has not heard of it yet
             (v1, v2, v2),            # the mirror is behind
             (v2, v1, v2),            # the offer is behind
             (v2, v2, v2),
             (v1, other, v1)]         # another incarnation: wait for memory's word
    for mirrored, offered, chosen in cases:
        mirror.records = {"web": mirrored} if mirrored else {}
        rec._offered["web"] = offered
        assert rec._freshest("web") is chosen, (mirrored, offered)
        assert "web" not in rec._offered
    mirror.records = {"web": v1}
    assert rec._freshest("web") is v1, "no offer: the mirror's"


# -- what makes a pod be synced -------------------------------------------------------------------

def test_an_idle_reconciler_does_not_poll(h: Harness) -> None:
    rec = h.start()
    for i in range(20):
        h.client.apply(f"p{i}", spec())
    for i in range(20):
        h.wait_phase(f"p{i}", "Running")
    before = h.settled()
    time.sleep(1.5)   # the span in which a poll would have shown
    assert rec.syncs == before
    assert {t.name for t in threading.enumerate()} >= {"reconciler", "pidwatch"}


def test_events_for_one_pod_are_coalesced_into_one_sync(h: Harness) -> None:
    rec = h.start(workers=1)
    h.client.apply("web", spec())
    h.client.apply("busy", spec())
    h.wait_phase("web", "Running")
    h.wait_phase("busy", "Running")
    h.settled()
    path = str(h.base / "ev.sock")
    events = ShimEvents(path, rec.poke)
    events.start()
    try:
        # the only worker is held by another pod while 50 events for web arrive
        h.runtime.gates["busy"], h.runtime.entered["busy"] = threading.Event(), threading.Event()
        rec.poke("busy")
        assert h.runtime.entered["busy"].wait(2)
        before = h.runtime.observed["web"]
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            for _ in range(50):
                s.sendto(b"web", path)
            s.sendto(b"\xff not a name", path)   # ignored
        wait_for(lambda: events.received == 51, 2, what="every datagram read")
        h.runtime.gates.pop("busy").set()
        wait_for(lambda: h.runtime.observed["web"] > before, 2, what="web synced")
        h.settled()
        assert h.runtime.observed["web"] - before == 1
    finally:
        events.stop()
    assert not os.path.exists(path)


def test_a_holder_killed_with_sigkill_brings_its_pod_back(h: Harness) -> None:
    rt = FakeRuntime(holders=True)
    h.start(rt)
    h.client.apply("web", spec())
    h.wait_phase("web", "Running")
    holder = rt.held["web"].holder
    assert holder is not None
    os.kill(holder.pid, signal.SIGKILL)
    # lost, so started again: a new holder, without any event or poll (resync: an hour)
    wait_for(lambda: rt.started["web"] == 2, 2, what="web restarted")
    h.wait_phase("web", "Running")


def test_rechecks_poll_only_the_pods_that_ask(h: Harness) -> None:
    h.start()
    h.client.apply("quiet", spec())
    h.wait_phase("quiet", "Running")
    h.settled()
    h.runtime.recheck_after = 0.1     # observations from now on ask to be looked at again
    h.client.apply("polled", spec())
    h.wait_phase("polled", "Running")
    quiet, polled = h.runtime.observed["quiet"], h.runtime.observed["polled"]
    time.sleep(1.0)   # the span over which rechecks are counted
    assert h.runtime.observed["quiet"] == quiet
    assert 5 <= h.runtime.observed["polled"] - polled <= 12


def test_the_resync_observes_every_pod_spread_over_the_interval(h: Harness) -> None:
    rec = h.start(resync_interval=3.0)
    for i in range(30):
        h.client.apply(f"p{i}", spec())
    for i in range(30):
        h.wait_phase(f"p{i}", "Running")
    h.settled()
    start = dict(h.runtime.observed)
    seen: list[int] = []
    for _ in range(4):
        time.sleep(1.0)  # sampling once a second, the pacer's own rhythm
        seen.append(sum(h.runtime.observed.values()))
    per_second = [b - a for a, b in zip([sum(start.values()), *seen], seen, strict=False)]
    assert all(n <= 15 for n in per_second), per_second     # 10 a second, never all 30 at once
    assert all(h.runtime.observed[f"p{i}"] > start[f"p{i}"] for i in range(30))
    assert rec.syncs > 0


def test_a_blocked_host_port_reaches_its_pod_only(h: Harness) -> None:
    path = blocked_ports.path_in(str(h.base))
    reader = blocked_ports.Reader(path, refreshed_elsewhere=True)
    h.start(FakeRuntime(blocked=reader), blocked=reader)
    h.client.apply("web", spec(8080))
    h.client.apply("other", spec(9090))
    h.wait_phase("web", "Running")
    h.wait_phase("other", "Running")
    h.settled()
    other = h.runtime.observed["other"]
    blocked_ports.write(path, {("TCP", 8080): "port 8080 is held by nginx"})
    status = h.wait_phase("web", "Error")
    assert (status["reason"], status["message"]) == ("PortInUse", "port 8080 is held by nginx")
    blocked_ports.write(path, {})
    h.wait_phase("web", "Running")
    assert h.runtime.observed["other"] == other


# -- the schedules, on their own ------------------------------------------------------------------

def test_timers_keep_the_earliest_time_per_pod() -> None:
    t = Timers()
    t.schedule("a", 5.0)
    t.schedule("b", 3.0)
    t.schedule("a", 7.0)      # later than pending: ignored
    t.schedule("c", 4.0)
    t.cancel("c")
    assert t.has("a") and not t.has("c")
    assert t.pop_due(2.0) == ([], 3.0)
    assert t.pop_due(5.0) == (["b", "a"], None)
    t.schedule("a", 9.0)
    t.schedule("a", 1.0)      # earlier: replaces
    assert t.pop_due(1.0) == (["a"], None) and t.pending() == 0
    t.schedule("b", 2.0)      # between pop_due and wait: the wait must not sleep past it
    began = time.monotonic()
    t.wait(5.0)
    assert time.monotonic() - began < 1.0


def test_pacer_spreads_a_pass_evenly_and_never_bursts() -> None:
    names = [f"p{i:03d}" for i in range(100)]
    p = Pacer(10.0, now=0.0)
    taken = [p.take(float(s), lambda: names) for s in range(1, 11)]
    assert [len(t) for t in taken] == [10] * 10
    assert sorted(n for t in taken for n in t) == names   # each pod once per interval
    assert len(p.take(1000.0, lambda: names)) <= 100  # a stalled clock: at most one pass
    with pytest.raises(ValueError):
        Pacer(0.0, now=0.0)


def test_blocked_reader_reports_what_changed(tmp_path: Path) -> None:
    path = str(tmp_path / "blocked.json")
    reader = blocked_ports.Reader(path, refreshed_elsewhere=True)
    assert reader.refresh() == set()
    blocked_ports.write(path, {("TCP", 80): "a", ("UDP", 53): "b"})
    assert reader.refresh() == {("TCP", 80), ("UDP", 53)}
    assert reader.refresh() == set()
    os.unlink(path)
    with open(path, "w") as f:
        json.dump({"blocked": [{"protocol": "TCP", "port": 80, "message": "c"}]}, f)
    assert reader.refresh() == {("TCP", 80), ("UDP", 53)}   # message changed, 53 left
    assert reader.message([{"protocol": "tcp", "host_port": 80}]) == "c"


def test_the_fd_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
        assert raise_fd_limit() == hard   # a pidfd per live pod: 5000 pods need 5000+
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
