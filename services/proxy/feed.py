"""The proxy's feed of memory's pods: the shared mirror (:class:`common.memclient.PodMirror`),
handing over the pods that matter to routing once per batch of events that changed one of them,
since routes are computed from all of them at once. While memory cannot be reached the last
known pods stay in force: losing the control plane must not cut traffic.

Only pods that ask for ports or list endpoints matter here. A node of thousands of pods without
ports (batch jobs, workers) therefore costs the proxy no recomputation when they come and go:
each change is looked at once, not every pod after every change.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import zmq

from common.config import Config
from common.memclient import SNAPSHOT_TIMEOUT, PodMirror

__all__ = ["SNAPSHOT_TIMEOUT", "routed", "watch_pods"]


def routed(record: Mapping[str, Any] | None) -> bool:
    """Whether a pod record can matter to the proxy: it asks for ports or lists endpoints."""
    if record is None:
        return False
    spec, status = record.get("spec"), record.get("status")
    return bool((isinstance(spec, Mapping) and spec.get("ports"))
                or (isinstance(status, Mapping) and status.get("endpoints")))


_STUB_KEYS = ("name", "uid", "version", "generation", "desired")


def _kept(record: dict[str, Any]) -> dict[str, Any]:
    """What the proxy's mirror holds of a pod: all of a pod that routes, a stub of the others
    (a node of thousands of pods without ports costs the proxy a few hundred bytes each)."""
    return record if routed(record) else {k: record[k] for k in _STUB_KEYS if k in record}


class _Routed:
    """The mirror's pods that matter to routing, and whether they changed since last handed."""

    def __init__(self, on_pods: Callable[[list[dict[str, Any]]], None]) -> None:
        self._on_pods = on_pods
        self._pods: dict[str, dict[str, Any]] = {}
        self._dirty = True   # the first batch (the snapshot) is handed even when empty

    def transition(self, name: str, record: dict[str, Any] | None, before: dict[str, Any] | None) -> None:
        if routed(record):
            assert record is not None
            self._pods[name] = record
            self._dirty = True
        elif routed(before) or name in self._pods:
            self._pods.pop(name, None)
            self._dirty = True

    def batch(self, _mirror: PodMirror) -> None:
        if self._dirty:
            self._dirty = False
            self._on_pods(list(self._pods.values()))


def watch_pods(cfg: Config, on_pods: Callable[[list[dict[str, Any]]], None], stop: threading.Event,
               *, context: zmq.Context[Any] | None = None) -> None:
    """Mirror memory's pods until ``stop`` is set, calling ``on_pods`` with every pod that asks
    for ports or lists endpoints after each change to one of them. Blocks: run it on a thread
    of its own."""
    pods = _Routed(on_pods)
    PodMirror(cfg, context=context, on_batch=pods.batch, on_transition=pods.transition,
              shared=True, keep=_kept).run(stop)
