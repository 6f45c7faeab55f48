"""The scale benchmark's traffic to the Node API: bulk Apply from several callers, single pods
timed from Apply to Running, List and /metrics latencies, and delete of everything.

One Watch stream (:class:`Watcher`) records when each pod was first seen Running and when it
was removed; a wait that sees no progress for a while asks List instead, since the manager drops
events for a Watch client that falls behind rather than grow its queue.
"""

from __future__ import annotations

import http.client
import json
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc

from common.errors import Timeout, Unavailable
from tests.stack import Agent, npb

RUNNING, ERROR = "Running", "Error"
CALLERS = 8            # concurrent Apply / Delete callers
STALL = 60.0           # a wait fails when nothing progressed for this long
RESYNC_AFTER = 2.0     # ... and asks List after this long without news from the Watch
RPC_TIMEOUT = 30.0
LIST_PAGE = 500   # as rikletctl pages: one unpaged reply of 5000 pods passes gRPC's 4 MiB


def manifest(name: str) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "Pod", "name": name,
                       "spec": {"containers": [{"name": "c", "command": ["sleep", "infinity"]}]}})


class Watcher:
    """First time (perf_counter) each pod was seen Running, pods in Error, pods removed."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.running: dict[str, float] = {}
        self.errors: dict[str, str] = {}
        self.removed: set[str] = set()
        self.present: set[str] = set()
        self.changed = threading.Condition()
        self._stop = threading.Event()
        self._call: Any = None   # the Watch call, cancelled to stop the stream
        self._thread = threading.Thread(target=self._run, name="scale-watch", daemon=True)

    def start(self) -> Watcher:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._call is not None:
            self._call.cancel()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._call = self.agent.stub.Watch(npb.WatchRequest())
                for ev in self._call:
                    self.see(ev.pod.name, ev.pod.phase, ev.kind == "removed", ev.pod.reason)
            except grpc.RpcError:
                self._stop.wait(0.2)   # the stream broke (a manager restart); open a new one

    def see(self, name: str, phase: str, removed: bool, reason: str = "") -> None:
        now = time.perf_counter()
        with self.changed:
            if removed:
                self.removed.add(name)
                self.present.discard(name)
                self.errors.pop(name, None)
            else:
                self.present.add(name)
                self.removed.discard(name)
                if phase == RUNNING:
                    self.running.setdefault(name, now)
                elif phase == ERROR:
                    self.errors[name] = reason or phase
            self.changed.notify_all()

    def resync(self) -> None:
        """Catch up through List on what the stream may have dropped."""
        listed = {p.name: p for p in all_pods(self.agent)}
        for name, pod in listed.items():
            self.see(name, pod.phase, False, pod.reason)
        with self.changed:
            gone = self.present - set(listed)
        for name in gone:
            self.see(name, "", True)

    def wait(self, done: Callable[[], int], total: int, what: str, resync: bool = True) -> None:
        """Until ``done()`` (counted under the lock) reaches ``total``; fails after STALL
        seconds without progress, or at once when a pod is in Error. ``resync=False`` waits for
        the stream alone (to know that it is open)."""
        progress_at, last = time.monotonic(), -1
        while True:
            with self.changed:
                count = done()
                if self.errors:
                    name, reason = next(iter(self.errors.items()))
                    raise Unavailable(f"pod {name} went to Error ({reason}) while {what}", name)
                if count >= total:
                    return
                if count != last:
                    progress_at, last = time.monotonic(), count
                self.changed.wait(timeout=RESYNC_AFTER)
                quiet = time.monotonic() - progress_at
            if quiet >= STALL:
                raise Timeout(f"{what}: {count} of {total} after {STALL:.0f} s without progress", "pods")
            if resync and quiet >= RESYNC_AFTER:
                self.resync()


@dataclass(frozen=True)
class Bulk:
    created: int
    seconds: float                 # first Apply call to the last pod Running
    apply_ms: list[float]          # client-side time of each Apply call

    @property
    def rate(self) -> float | None:
        return self.created / self.seconds if self.created and self.seconds > 0 else None


def apply_one(agent: Agent, name: str) -> float:
    """Milliseconds the Apply call took."""
    t0 = time.perf_counter()
    agent.stub.Apply(npb.ApplyRequest(manifest=manifest(name)), timeout=RPC_TIMEOUT)
    return (time.perf_counter() - t0) * 1000


def bulk_create(agent: Agent, watcher: Watcher, names: Sequence[str]) -> Bulk:
    if not names:
        return Bulk(0, 0.0, [])
    t0 = time.perf_counter()
    with ThreadPoolExecutor(CALLERS) as pool:
        apply_ms = list(pool.map(lambda n: apply_one(agent, n), names))
    wanted = set(names)
    watcher.wait(lambda: len(wanted & watcher.running.keys()), len(wanted),
                 f"waiting for {len(wanted)} new pods to be Running")
    last = max(watcher.running[n] for n in names)
    return Bulk(len(names), last - t0, apply_ms)


def probe(agent: Agent, watcher: Watcher, name: str) -> tuple[float, float]:
    """Milliseconds of the Apply call alone, and from the Apply call to the pod seen Running;
    the pod is then deleted and gone before this returns, so that the next probe meets the same
    number of pods."""
    ms = probe_hold(agent, watcher, name)
    remove(agent, watcher, name)
    return ms


def probe_hold(agent: Agent, watcher: Watcher, name: str, resync: bool = True) -> tuple[float, float]:
    """Milliseconds of the Apply call, and from the Apply call to the pod seen Running; the pod
    stays."""
    t0 = time.perf_counter()
    agent.stub.Apply(npb.ApplyRequest(manifest=manifest(name)), timeout=RPC_TIMEOUT)
    applied = time.perf_counter()
    watcher.wait(lambda: int(name in watcher.running), 1, f"waiting for {name} to be Running", resync)
    return (applied - t0) * 1000, (watcher.running[name] - t0) * 1000


def remove(agent: Agent, watcher: Watcher, name: str) -> None:
    """Delete a pod and wait until it is gone."""
    agent.stub.Delete(npb.DeleteRequest(name=name), timeout=RPC_TIMEOUT)
    watcher.wait(lambda: int(name in watcher.removed), 1, f"waiting for {name} to be removed")


def all_pods(agent: Agent) -> list[Any]:
    """Every pod, page after page."""
    pods: list[Any] = []
    token = ""
    while True:
        reply = agent.stub.List(npb.ListRequest(limit=LIST_PAGE, continue_token=token), timeout=RPC_TIMEOUT)
        pods.extend(reply.pods)
        token = reply.continue_token
        if not token:
            return pods


def all_names(agent: Agent) -> list[str]:
    return [p.name for p in all_pods(agent)]


def list_ms(agent: Agent, calls: int = 10) -> float:
    """Milliseconds to list every pod, page after page as rikletctl does."""
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        token = ""
        while True:
            reply = agent.stub.List(npb.ListRequest(limit=LIST_PAGE, continue_token=token),
                                    timeout=RPC_TIMEOUT)
            token = reply.continue_token
            if not token:
                break
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def metrics_ms(agent: Agent, calls: int = 10) -> float:
    """Median of full GETs of the monitor's /metrics (a new connection each, as a scraper)."""
    host, port = agent.metrics.rsplit(":", 1)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection(host, int(port), timeout=RPC_TIMEOUT)
        try:
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            raise Unavailable(f"GET /metrics on {agent.metrics} answered {resp.status}", "metrics")
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def delete_all(agent: Agent, watcher: Watcher, gone: Callable[[], bool]) -> tuple[int, float]:
    """How many pods there were, and the seconds from the first Delete call until List is
    empty and ``gone()`` holds (every shim exited)."""
    names = all_names(agent)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(CALLERS) as pool:
        list(pool.map(lambda n: _delete(agent, n), names))
    _until_gone(agent, watcher, names, gone)
    return len(names), time.perf_counter() - t0


def delete_all_at_once(agent: Agent, watcher: Watcher, gone: Callable[[], bool]) -> tuple[int, float]:
    """As :func:`delete_all`, with one ``Delete(all=True)`` call (``rikletctl delete --all``)."""
    names = all_names(agent)
    t0 = time.perf_counter()
    agent.stub.Delete(npb.DeleteRequest(all=True), timeout=RPC_TIMEOUT)
    _until_gone(agent, watcher, names, gone)
    return len(names), time.perf_counter() - t0


def _until_gone(agent: Agent, watcher: Watcher, names: list[str], gone: Callable[[], bool]) -> None:
    """Until every pod named was seen removed, List is empty and ``gone()`` holds."""
    watcher.wait(lambda: len(watcher.removed.intersection(names)), len(names),
                 f"waiting for {len(names)} pods to be removed")
    deadline = time.monotonic() + STALL
    while agent.stub.List(npb.ListRequest(limit=1), timeout=RPC_TIMEOUT).pods or not gone():
        if time.monotonic() > deadline:
            raise Timeout(f"pods or shims still there {STALL:.0f} s after every pod was removed", "pods")
        time.sleep(0.01)


def _delete(agent: Agent, name: str) -> None:
    try:
        agent.stub.Delete(npb.DeleteRequest(name=name), timeout=RPC_TIMEOUT)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:   # gone meanwhile is what was asked
            raise
