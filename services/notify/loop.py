"""The notify program's loop: the agent's voice to systemd.

supervisord is the unit's main process (``riklet run`` execs it), so the notifications come from
this program under it (the unit sets NotifyAccess=all). It sends READY=1 once the four services
answer on their IPC endpoints, STATUS= whenever the one-line summary changes, and WATCHDOG=1 at
half of ``$WATCHDOG_USEC``, only in a round where all four answered: a service that hangs
(or is stopped) lets the watchdog expire, and systemd restarts the agent (not the pods).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

import zmq

from common import log as logsetup
from common.config import Config, parse_args
from common.errors import RikletError, Timeout
from common.memclient import PodMirror
from common.parentwatch import expected_parent, watch_parent
from common.sdnotify import Notifier, watchdog_interval
from common.zmqutil import RequestClient
from services.notify.health import SERVICES, Health, count_pods, kept, status_line

log = logging.getLogger("services.notify")

STARTING_POLL = 0.25   # seconds between rounds until READY=1
STATUS_POLL = 5.0      # between rounds after READY=1 when there is no watchdog (or a slower one)


class Prober:
    """One round of questions to the four services, and the pods seen through a mirror."""

    def __init__(self, cfg: Config, timeout: float, ctx: zmq.Context[Any]) -> None:
        endpoints = {"memory": cfg.memory_endpoint, "manager": cfg.manager_endpoint,
                     "monitor": cfg.monitor_endpoint, "proxy": cfg.proxy_endpoint}
        self._clients = {name: RequestClient(endpoints[name], timeout=timeout, retries=0, context=ctx)
                         for name in SERVICES}
        self._mirror = PodMirror(cfg, context=ctx, shared=True, keep=kept)

    def start(self) -> None:
        self._mirror.start()

    def round(self) -> Health:
        answering, mode = set(), None
        for name, client in self._clients.items():
            try:
                # The proxy's endpoint answers ``stats`` (its data path among them), not ping.
                reply = client.call("stats" if name == "proxy" else "ping")
            except (Timeout, RikletError):
                continue
            answering.add(name)
            if name == "proxy" and isinstance(reply, dict) and isinstance(reply.get("mode"), str):
                mode = reply["mode"]
        pods = count_pods(self._mirror.records()) if self._mirror.wait_synced(0) else None
        return Health(frozenset(answering), pods, mode)

    def close(self) -> None:
        self._mirror.stop()
        for client in self._clients.values():
            client.close()


def serve(notifier: Notifier, prober: Prober, interval: float | None, stop: threading.Event) -> None:
    ready_sent, last_status = False, ""
    while not stop.is_set():
        began = time.monotonic()
        health = prober.round()
        fields: dict[str, str | int] = {}
        if health.up and not ready_sent:
            fields["READY"] = 1
        if health.up and interval is not None:
            fields["WATCHDOG"] = 1
        status = status_line(health, ready_sent or health.up, interval is not None)
        if status != last_status:
            fields["STATUS"] = status
            log.info("status", extra={"status": status})
        if fields and notifier.notify(**fields):
            ready_sent = ready_sent or health.up
            last_status = status
        pause = STARTING_POLL if not ready_sent else min(interval or STATUS_POLL, STATUS_POLL)
        stop.wait(max(0.0, pause - (time.monotonic() - began)))


def run(argv: Sequence[str] | None = None) -> int:
    watch_parent("riklet-notify")
    notifier = Notifier()
    cfg, _ = parse_args("riklet-notify", argv)
    logsetup.configure("notify", cfg)
    supervisord = expected_parent(os.environ)
    interval = watchdog_interval(os.environ, [supervisord] if supervisord else [])
    timeout = 1.0 if interval is None else max(0.2, min(1.0, interval / 4))
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ctx: zmq.Context[Any] = zmq.Context.instance()
    prober = Prober(cfg, timeout, ctx)
    prober.start()
    log.info("notifying systemd", extra={"socket": notifier.address, "watchdog_interval": interval})
    try:
        serve(notifier, prober, interval, stop)
    finally:
        prober.close()
        notifier.close()
    return 0
