"""The proxy's feed of memory's pods: the shared mirror (:class:`common.memclient.PodMirror`),
handing over the whole set once per batch of events, since routes are computed from all pods at
once. While memory cannot be reached the last known pods stay in force: losing the control plane
must not cut traffic.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import zmq

from common.config import Config
from common.memclient import SNAPSHOT_TIMEOUT, PodMirror

__all__ = ["SNAPSHOT_TIMEOUT", "watch_pods"]


def watch_pods(cfg: Config, on_pods: Callable[[list[dict[str, Any]]], None], stop: threading.Event,
               *, context: zmq.Context[Any] | None = None) -> None:
    """Mirror memory's pods until ``stop`` is set, calling ``on_pods`` with the full current set
    after each change. Blocks: run it on a thread of its own."""
    PodMirror(cfg, context=context, on_batch=lambda mirror: on_pods(mirror.records())).run(stop)
