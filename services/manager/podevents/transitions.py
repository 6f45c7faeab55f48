"""Container and pod events derived from two statuses: what changed between the status a pod
showed and the one the reconciler is writing (kubelet's relister: a pure ``diff(old, new)``).

:func:`transitions` is pure. :class:`StatusEvents` records its events for the reconciler, each
once: the reconciler may write a status twice when the mirror has not caught up with its own
last write, and the second write must not say the same thing again.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, NamedTuple

from common.blocked_ports import REASON as BLOCKED_REASON
from common.podevent import NORMAL, WARNING
from services.manager.podevents.recorder import Records

Status = Mapping[str, Any]
KEYS_PER_POD = 16


class Transition(NamedTuple):
    reason: str
    message: str
    type: str = NORMAL
    container: str = ""
    at: float | None = None        # when it happened, when the status says
    key: tuple[Any, ...] = ()      # what makes it the same event if derived again


def _containers(status: Status | None) -> dict[str, Mapping[str, Any]]:
    items = (status or {}).get("containers") or []
    return {str(c.get("name")): c for c in items if isinstance(c, Mapping) and c.get("name")}


def _exit_of(name: str, c: Mapping[str, Any], stopping: bool) -> Transition:
    code, reason, signal = c.get("exitCode"), c.get("reason"), c.get("signal")
    if signal:
        how = f"killed by {signal}" if str(signal).startswith("SIG") else f"killed by signal {signal}"
    else:
        how = f"exited with code {code}" if code is not None else "could not start"
    detail = f": {c['message']}" if c.get("message") and c["message"] != how else ""
    key = ("exit", name, c.get("finishedAt"), c.get("restartCount"))
    at = c.get("finishedAt")
    if reason == "OOMKilled":
        return Transition("OOMKilled", f"container {name} was killed for lack of memory ({how})",
                          WARNING, name, at, key)
    if stopping:   # asked for: a stop or a delete
        return Transition("Stopped", f"container {name} stopped ({how})", NORMAL, name, at, key)
    if reason in (None, "Completed") and (code or 0) == 0 and not signal:
        return Transition("Completed", f"container {name} {how}", NORMAL, name, at, key)
    return Transition("Failed", f"container {name} {how} ({reason or 'Error'}){detail}", WARNING, name, at,
                      key)


def _started(name: str, c: Mapping[str, Any]) -> Transition:
    count = int(c.get("restartCount") or 0)
    again = f" (restart {count})" if count else ""
    return Transition("Started", f"started container {name}{again}", NORMAL, name, c.get("startedAt"),
                      ("start", name, c.get("startedAt"), count))


def _container_changes(name: str, old: Mapping[str, Any] | None, new: Mapping[str, Any],
                       stopping: bool = False) -> list[Transition]:
    old = old or {}
    state, count = new.get("state"), int(new.get("restartCount") or 0)
    out: list[Transition] = []
    # A run that began since the last status, even one that also ended before this look.
    if (new.get("startedAt") and new.get("startedAt") != old.get("startedAt")) or (
            state == "running" and old.get("state") != "running"):
        out.append(_started(name, new))
    if state == "running":
        return out
    ended = new.get("finishedAt")
    if ended and (old.get("state") == "running" or old.get("finishedAt") != ended):
        out.append(_exit_of(name, new, stopping))
    elif new.get("reason") and not new.get("finishedAt") and old.get("reason") != new.get("reason"):
        out.append(Transition("Failed", f"container {name}: {new.get('reason')}"
                              + (f": {new['message']}" if new.get("message") else ""),
                              WARNING, name, None, ("fail", name, new.get("reason"), count)))
    nxt = new.get("nextRestartAt")
    if nxt and nxt != old.get("nextRestartAt"):
        wait = max(0.0, float(nxt) - float(new.get("finishedAt") or nxt))
        out.append(Transition("BackOff", f"back-off {wait:g}s restarting failed container {name} "
                              f"(restart {count + 1})", WARNING, name, new.get("finishedAt"),
                              ("backoff", name, nxt)))
    return out


def transitions(old: Status | None, new: Status) -> list[Transition]:
    """The events that writing ``new`` over ``old`` means, oldest first."""
    before = _containers(old)
    stopping = new.get("phase") in ("Terminating", "Terminated") and new.get("reason") != "Completed"
    out: list[Transition] = []
    for name, c in _containers(new).items():
        out.extend(_container_changes(name, before.get(name), c, stopping))
    old_phase, old_reason = (old or {}).get("phase"), (old or {}).get("reason")
    phase, reason = new.get("phase"), new.get("reason")
    if phase == "Error" and (old_phase, old_reason) != (phase, reason):
        message = new.get("message") or ""
        if reason == BLOCKED_REASON:
            out.append(Transition("PortConflict", message or "a host port of the pod is taken", WARNING,
                                  key=("port", message)))
        elif not any(t.type == WARNING for t in out) and not any(
                c.get("reason") == reason for c in _containers(new).values()):
            out.append(Transition("Failed", f"{reason or 'Error'}: {message}" if message else str(reason),
                                  WARNING, key=("pod", reason, message)))
    elif old_phase == "Error" and old_reason == BLOCKED_REASON and phase == "Running":
        out.append(Transition("PortFreed", "the pod's host ports are served again", NORMAL,
                              key=("portfreed", new.get("transitionAt"))))
    return out


class StatusEvents:
    """Records the transitions of each status the reconciler writes, each event once."""

    def __init__(self, recorder: Records) -> None:
        self.recorder = recorder
        self._seen: dict[str, tuple[str, list[tuple[Any, ...]]]] = {}   # pod -> (uid, recent keys)
        self._lock = threading.Lock()

    def observed(self, record: Mapping[str, Any], old: Status | None, new: Status) -> None:
        name, uid = str(record["name"]), str(record.get("uid") or "")
        found = transitions(old, new)
        if not found:
            return
        with self._lock:
            seen_uid, keys = self._seen.get(name, (uid, []))
            if seen_uid != uid:
                keys = []
            fresh = [t for t in found if not t.key or t.key not in keys]
            keys = (keys + [t.key for t in fresh if t.key])[-KEYS_PER_POD:]
            self._seen[name] = (uid, keys)
        for t in fresh:
            self.recorder.record(name, t.reason, t.message, type=t.type, uid=uid,
                                 container=t.container or None, at=t.at)

    def forget(self, name: str) -> None:
        with self._lock:
            self._seen.pop(name, None)
