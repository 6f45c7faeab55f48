"""How the other services use Runtime Memory: :class:`MemoryClient` for requests, and
:class:`PodMirror`, a live local copy of every pod kept by the "clone" pattern (subscribe,
snapshot, then apply only the events newer than the snapshot; resnapshot on any gap).

A memory restart is invisible to both beyond a short delay. The client resends the same
request (same id) until ~10 s have passed; memory remembers the ids of recent writes with
their results, so a write whose reply was lost is answered, not applied twice.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import zmq

from common import ipc
from common.config import Config
from common.errors import BadFrame, RikletError, Timeout, Unavailable
from common.podsync import Outcome, PodSequence
from common.zmqutil import RequestClient, Waker

log = logging.getLogger(__name__)

PATIENCE = 10.0          # seconds a call keeps trying before raising Unavailable
RESYNC_RETRY = 0.5       # seconds between snapshot attempts while memory is down
SNAPSHOT_TIMEOUT = 2.0   # seconds a snapshot request may take
POLL_MS = 1000           # how long the mirror waits for an event (stop() cuts it short)
MAX_BATCH = 1000         # events applied before on_batch runs once for all of them
SILENCE = 6.0            # no heartbeat for this long: say so (the last known pods stay)

OnChange = Callable[[str, "dict[str, Any] | None"], None]
OnTransition = Callable[[str, "dict[str, Any] | None", "dict[str, Any] | None"], None]


def _page_args(after: str | None, limit: int | None, workload: str | None) -> dict[str, Any]:
    given = {"after": after, "limit": limit, "workload": workload}
    return {key: value for key, value in given.items() if value is not None}


class MemoryClient:
    """Typed requests to memory. Thread-safe: up to ``concurrency`` requests in flight at once
    (one socket each, opened when first needed), so that the writes of several threads reach
    memory together and share one commit there; more callers wait for a free socket."""

    def __init__(self, cfg_or_endpoint: Config | str, timeout: float = 2.0, retries: int | None = None,
                 context: zmq.Context[Any] | None = None, concurrency: int = 1) -> None:
        self.endpoint = (cfg_or_endpoint if isinstance(cfg_or_endpoint, str)
                         else cfg_or_endpoint.memory_endpoint)
        if retries is None:
            retries = max(0, math.ceil(PATIENCE / timeout) - 1)
        self._timeout, self._retries, self._context = timeout, retries, context
        self._free: list[RequestClient] = []
        self._all: list[RequestClient] = []
        self._room = threading.Semaphore(max(1, concurrency))
        self._pool_lock = threading.Lock()

    def _call(self, op: str, **args: Any) -> Any:
        with self._room:
            with self._pool_lock:
                rpc = self._free.pop() if self._free else self._open()
            try:
                return rpc.call(op, **args)
            except Timeout as exc:
                raise Unavailable(f"memory at {self.endpoint} did not answer {op!r}", "memory") from exc
            finally:
                with self._pool_lock:
                    self._free.append(rpc)

    def _open(self) -> RequestClient:
        rpc = RequestClient(self.endpoint, timeout=self._timeout, retries=self._retries,
                            context=self._context)
        self._all.append(rpc)
        return rpc

    def apply(self, name: str, spec: dict[str, Any], uid: str | None = None,
              generation: int | None = None) -> dict[str, Any]:
        """Returns ``{"pod": record, "changed": bool}``; Conflict when ``generation`` is given
        and the pod is no longer at it."""
        args: dict[str, Any] = {"name": name, "spec": spec}
        if uid is not None:
            args["uid"] = uid
        if generation is not None:
            args["generation"] = generation
        result: dict[str, Any] = self._call("pod.apply", **args)
        return result

    def apply_workload(self, workload: str, pods: Iterable[tuple[str, dict[str, Any]]]
                       ) -> list[dict[str, Any]]:
        """Apply a workload's pods at once (its other pods wanted deleted), or nothing; returns
        ``{"pod": record, "changed": bool}`` per pod. Conflict names a pod another workload or
        the RIK scheduler holds."""
        result = self._call("workload.apply", workload=workload, pods=[[n, s] for n, s in pods])
        out: list[dict[str, Any]] = result["pods"]
        return out

    def set_status(self, name: str, uid: str, status: dict[str, Any],
                   expect_version: int | None = None, generation: int | None = None) -> dict[str, Any]:
        """Conflict when the record is no longer ``uid`` at ``generation`` (or ``expect_version``)."""
        args: dict[str, Any] = {"name": name, "uid": uid, "status": status}
        if expect_version is not None:
            args["expect_version"] = expect_version
        if generation is not None:
            args["generation"] = generation
        record: dict[str, Any] = self._call("pod.set_status", **args)
        return record

    def set_desired(self, name: str, desired: str, uid: str | None = None,
                    generation: int | None = None) -> dict[str, Any]:
        """Conflict when ``uid``/``generation`` are given and the record has moved on."""
        args: dict[str, Any] = {"name": name, "desired": desired}
        if uid is not None:
            args["uid"] = uid
        if generation is not None:
            args["generation"] = generation
        record: dict[str, Any] = self._call("pod.set_desired", **args)
        return record

    def delete_many(self, workload: str | None = None) -> list[str]:
        """Want every pod (or every pod of ``workload``) deleted at once; the names of those
        newly wanted deleted."""
        args = {} if workload is None else {"workload": workload}
        names: list[str] = self._call("pods.delete", **args)["pods"]
        return names

    def remove(self, name: str, uid: str, generation: int) -> None:
        """Forget a deleted pod, only if it is still ``uid`` at ``generation`` (else Conflict)."""
        self._call("pod.remove", name=name, uid=uid, generation=generation)

    def get(self, name: str) -> dict[str, Any]:
        record: dict[str, Any] = self._call("pod.get", name=name)
        return record

    def query(self, names: Iterable[str], workload: str | None = None,
              ports: Iterable[tuple[str, int]] = ()) -> list[dict[str, Any]]:
        """The pods named, the pods of ``workload`` and the pods claiming any of ``ports``
        (whatever their desired state), in name order: what an apply must check, by index."""
        args: dict[str, Any] = {"names": list(names), "ports": [list(p) for p in ports]}
        if workload is not None:
            args["workload"] = workload
        records: list[dict[str, Any]] = self._call("pod.query", **args)
        return records

    def claimed(self, low: int, high: int) -> set[tuple[str, int]]:
        """Every (protocol, port) that some pod's spec claims in ``low``-``high``."""
        return {(str(p), int(n)) for p, n in self._call("pod.claimed", low=low, high=high)}

    def find(self, uid: str) -> dict[str, Any]:
        """A pod by uid (NotFound naming ``uid``)."""
        record: dict[str, Any] = self._call("pod.find", uid=uid)
        return record

    def add_events(self, events: Iterable[dict[str, Any]]) -> list[int]:
        """Keep pod events (``common.podevent.PodEvent.to_dict()``); their sequence numbers."""
        result = self._call("events.add", events=[dict(e) for e in events])
        return [int(seq) for seq in result["seqs"]]

    def list_events(self, pod: str | None = None, after: int | None = None,
                    limit: int | None = None) -> dict[str, Any]:
        """``{"events": [...], "last": seq}``: the newest ``limit`` events, oldest first."""
        args = {k: v for k, v in (("pod", pod), ("after", after), ("limit", limit)) if v is not None}
        result: dict[str, Any] = self._call("events.list", **args)
        return result

    def stamps(self, after: str | None = None, limit: int | None = None,
               workload: str | None = None) -> list[tuple[str, str, int]]:
        """A page of pods as (name, uid, version) only."""
        rows = self._call("pod.stamps", **_page_args(after, limit, workload))
        return [(str(n), str(u), int(v)) for n, u, v in rows]

    def list(self, after: str | None = None, limit: int | None = None, workload: str | None = None,
             encoded: bool = False, names: list[str] | None = None) -> list[dict[str, Any]]:
        """Pods in name order: every one, or a page of at most ``limit`` named after ``after``,
        or those of ``names``. ``encoded``: spec and status as JSON text (``spec_json``,
        ``status_json``), and ``workload``."""
        args = _page_args(after, limit, workload)
        if encoded:
            args["encoded"] = True
        if names is not None:
            args["names"] = names
        records: list[dict[str, Any]] = self._call("pod.list", **args)
        return records

    def snapshot(self) -> dict[str, Any]:
        snap: dict[str, Any] = self._call("snapshot")
        return snap

    def close(self) -> None:
        with self._pool_lock:
            for rpc in self._all:
                rpc.close()


def diff_pods(old: dict[str, dict[str, Any]],
              new: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any] | None]]:
    """Every pod that differs between two states, as (name, new record or None if gone)."""
    names = sorted(old.keys() | new.keys())
    return [(name, new.get(name)) for name in names if old.get(name) != new.get(name)]


class _Health:
    """Says once when memory cannot be reached or goes quiet, and once when it is back."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.heard = time.monotonic()
        self.down = False

    def ok(self) -> None:
        if self.down:
            log.info("memory reachable again", extra={"endpoint": self.endpoint})
        self.heard, self.down = time.monotonic(), False

    def fail(self, what: str) -> None:
        if not self.down:
            log.warning(f"{what}; keeping the last known pods", extra={"endpoint": self.endpoint})
        self.down = True

    def quiet(self) -> None:
        if time.monotonic() - self.heard > SILENCE:
            self.fail("no heartbeat from memory")


class PodMirror:
    """A local, eventually consistent copy of memory's pods: the one subscriber to memory's
    change stream, used by the manager (per-pod ``on_change``) and the proxy (``on_batch``).

    ``on_change(name, record_or_None)`` runs on the mirror's thread for every change it sees,
    including each difference found by a resync; ``on_transition(name, record_or_None,
    before_or_None)`` likewise, with the record it replaced (which the mirror no longer holds:
    the subscriber need not keep its own copy of every pod to know what changed). The record
    given is a copy, unless ``shared``: then it is the mirror's own, for subscribers that keep
    it and never change it (one copy of every pod instead of two). ``keep(record)`` gives what
    of a record the mirror holds (all of it by default: see :class:`common.podsync.PodSequence`).
    ``on_batch(mirror)`` runs
    after each batch of events that changed something (up to ``MAX_BATCH`` waiting events) and
    after each resync, for consumers that recompute from every pod at once. While memory is down
    the mirror keeps the last known state (losing the control plane must not stop workloads or
    cut traffic) and tries again every 0.5 s.
    """

    def __init__(self, cfg: Config, on_change: OnChange | None = None,
                 context: zmq.Context[Any] | None = None,
                 on_batch: Callable[[PodMirror], None] | None = None, *,
                 on_transition: OnTransition | None = None, shared: bool = False,
                 keep: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        self._endpoint = cfg.memory_endpoint
        self._events_endpoint = cfg.memory_events_endpoint
        self._on_change = on_change
        self._on_transition = on_transition
        self._shared = shared
        self._on_batch = on_batch
        self._ctx = context or zmq.Context.instance()
        self._lock = threading.Lock()
        self._keep = keep
        self._state = PodSequence(keep)  # the ordering rules; read under the lock
        self._synced = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._waker: Waker | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("PodMirror already started")
        self._thread = threading.Thread(target=self.run, args=(self._stop,), name="pod-mirror",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        waker = self._waker
        if waker is not None:
            waker.wake()
        if self._thread is not None:
            self._thread.join(timeout)

    def get(self, name: str) -> dict[str, Any] | None:
        """A copy of one pod's record, or None."""
        with self._lock:
            record = self._state.pods.get(name)
            return copy.deepcopy(record) if record is not None else None

    def names(self) -> list[str]:
        with self._lock:
            return list(self._state.pods)

    def pods(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._state.pods)

    def records(self) -> list[dict[str, Any]]:
        """Every pod's record as it stands (shared, not copied: read them, never change them)."""
        with self._lock:
            return self._state.records()

    @property
    def seq(self) -> int:
        return max(self._state.seq, 0)

    @property
    def epoch(self) -> str | None:
        return self._state.epoch

    def wait_synced(self, timeout: float | None = None) -> bool:
        """True once the mirror holds a snapshot and no gap after it is known."""
        return self._synced.wait(timeout)

    # -- the mirror thread ------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Mirror memory until ``stop`` is set; blocks (``start`` runs it on a thread)."""
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        # Subscribe before the snapshot: what happens in between arrives as events to skip.
        sub.connect(self._events_endpoint)
        rpc = RequestClient(self._endpoint, timeout=SNAPSHOT_TIMEOUT, retries=0, context=self._ctx)
        health = _Health(self._endpoint)
        waker = self._waker = Waker(sub)
        need_sync = True
        try:
            while not stop.is_set():
                if need_sync:
                    if not self._resync(rpc):
                        health.fail("memory unreachable")
                        stop.wait(RESYNC_RETRY)
                        continue
                    need_sync = False
                    health.ok()
                    self._batch_done()
                if not waker.wait(POLL_MS):
                    health.quiet()
                    continue
                health.ok()
                changed, need_sync = self._drain(sub)
                if need_sync:
                    self._synced.clear()
                elif changed:
                    self._batch_done()
        finally:
            self._waker = None
            waker.close()
            sub.close(linger=0)
            rpc.close()

    def _drain(self, sub: zmq.Socket[Any]) -> tuple[bool, bool]:
        """Apply the events waiting (at most MAX_BATCH); returns (changed, resync needed)."""
        changed = False
        for _ in range(MAX_BATCH):
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                ev = ipc.decode_event(frames)
            except BadFrame as exc:
                log.warning("ignored a malformed event", extra={"error": str(exc)})
                continue
            outcome = self._apply(ev)
            if outcome is Outcome.RESYNC:
                return changed, True
            changed |= outcome is Outcome.CHANGED
        return changed, False

    def _resync(self, rpc: RequestClient) -> bool:
        try:
            snap = rpc.call("snapshot")
        except Timeout:
            return False  # memory is down or restarting: the caller retries
        except RikletError as exc:
            log.warning("snapshot failed", extra={"error": str(exc)})
            return False
        fresh = PodSequence(self._keep)
        try:
            fresh.load(snap)
        except BadFrame as exc:
            log.warning("malformed snapshot", extra={"error": str(exc)})
            return False
        with self._lock:
            old, self._state = self._state.pods, fresh
        for name, record in diff_pods(old, fresh.pods):
            self._notify(name, record, old.get(name))
        # Synced only once every subscriber has heard of every pod: a waiter must not act on
        # a mirror whose consumers are still catching up.
        self._synced.set()
        log.info("pods loaded from memory", extra={"pods": len(fresh.pods), "seq": fresh.seq,
                                                   "epoch": fresh.epoch})
        return True

    def _apply(self, ev: ipc.Event) -> Outcome:
        """Apply one event in order."""
        with self._lock:
            outcome = self._state.apply(ev)
            change = self._state.last_change if outcome is Outcome.CHANGED else None
        if change is not None:
            self._notify(*change)
        return outcome

    def _notify(self, name: str, record: dict[str, Any] | None, before: dict[str, Any] | None) -> None:
        if self._on_change is None and self._on_transition is None:
            return
        given = record if self._shared else copy.deepcopy(record)
        try:
            if self._on_change is not None:
                self._on_change(name, given)
            if self._on_transition is not None:
                self._on_transition(name, given, before)
        except Exception:  # a subscriber's bug must not stop the mirror for everyone else
            log.exception("on_change failed", extra={"pod": name})

    def _batch_done(self) -> None:
        if self._on_batch is not None:
            self._on_batch(self)
