"""The agent's voice to systemd (Type=notify), spoken by the monitor.

supervisord is the unit's main process (``riklet run`` execs it), so the notifications come from
a process under it (the unit sets NotifyAccess=all): the monitor, which already follows every
pod and asks the proxy and the manager for their figures. A thread of it sends READY=1 once the
four services answer on their IPC endpoints (the monitor's own included: its request loop must
answer too), STATUS= whenever the one-line summary changes, and WATCHDOG=1 at half of
``$WATCHDOG_USEC``, only in a round where all four answered: a service that hangs (or is
stopped) lets the watchdog expire, and systemd restarts the agent (not the pods).

``riklet run`` moves systemd's variables aside and supervisord.conf hands them back to the
monitor alone; :func:`take_environment` then removes them from its environment, so that nothing
it starts can speak for the unit. Without ``$NOTIFY_SOCKET`` nothing is started.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import zmq

from common.config import Config
from common.errors import RikletError, Timeout
from common.parentwatch import expected_parent
from common.pod import serving
from common.sdnotify import ENV, Notifier, watchdog_interval
from common.zmqutil import RequestClient
from services.monitor.podtable import PodTable

log = logging.getLogger("riklet.monitor.notify")

SERVICES = ("memory", "manager", "monitor", "proxy")
STARTING_POLL = 0.25   # seconds between rounds until READY=1
STATUS_POLL = 5.0      # between rounds after READY=1 when there is no watchdog (or a slower one)


@dataclass(frozen=True)
class PodCounts:
    total: int
    ready: int  # wanted running, running and ready: the pods that take traffic


@dataclass(frozen=True)
class Health:
    answering: frozenset[str]
    pods: PodCounts | None = None  # None: memory's pods not known yet
    proxy_mode: str | None = None  # None: the proxy did not say

    @property
    def up(self) -> bool:
        return self.answering >= frozenset(SERVICES)

    @property
    def silent(self) -> list[str]:
        return [s for s in SERVICES if s not in self.answering]


def count_pods(records: Iterable[Mapping[str, Any]]) -> PodCounts:
    total = ready = 0
    for record in records:
        total += 1
        ready += serving(record)
    return PodCounts(total, ready)


def status_line(health: Health, ready_sent: bool, watchdog: bool = False) -> str:
    """systemd's STATUS=: how many services answer (and which do not), pods, proxy mode."""
    n = len(health.answering & frozenset(SERVICES))
    head = f"{n}/{len(SERVICES)} services up"
    if not health.up:
        head += f" ({', '.join(health.silent)} not answering)"
        head = head if ready_sent else f"starting: {head}"
    parts = [head]
    if health.pods is not None:
        parts.append(f"{health.pods.total} pods ({health.pods.ready} ready)")
    if health.proxy_mode:
        parts.append(f"proxy {health.proxy_mode}")
    line = ", ".join(parts)
    if watchdog and ready_sent and not health.up:
        line += "; watchdog withheld"
    return line


class Prober:
    """One round of questions to the four services; the pods as the monitor's table has them."""

    def __init__(self, cfg: Config, table: PodTable, timeout: float, ctx: zmq.Context[Any]) -> None:
        endpoints = {"memory": cfg.memory_endpoint, "manager": cfg.manager_endpoint,
                     "monitor": cfg.monitor_endpoint, "proxy": cfg.proxy_endpoint}
        self._clients = {name: RequestClient(endpoints[name], timeout=timeout, retries=0, context=ctx)
                         for name in SERVICES}
        self._table = table

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
        synced = self._table.wait_synced(0)
        pods = count_pods(e.record for e in self._table.entries()) if synced else None
        return Health(frozenset(answering), pods, mode)

    def close(self) -> None:
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


def take_environment(environ: MutableMapping[str, str]) -> dict[str, str]:
    """systemd's variables, removed from ``environ`` (empty ones, as supervisord.conf passes
    them outside systemd, are dropped too)."""
    taken = {name: environ.pop(name, "") for name in ENV}
    return {name: value for name, value in taken.items() if value}


class SystemdNotifier:
    """The notifying thread."""

    def __init__(self, cfg: Config, table: PodTable, notifier: Notifier, environ: Mapping[str, str],
                 ctx: zmq.Context[Any]) -> None:
        self._notifier = notifier
        supervisord = expected_parent(os.environ)
        self._interval = watchdog_interval(environ, [supervisord] if supervisord else [])
        timeout = 1.0 if self._interval is None else max(0.2, min(1.0, self._interval / 4))
        self._prober = Prober(cfg, table, timeout, ctx)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="systemd-notify", daemon=True)

    def start(self) -> None:
        log.info("notifying systemd", extra={"socket": self._notifier.address,
                                             "watchdog_interval": self._interval})
        self._thread.start()

    def _run(self) -> None:
        try:
            serve(self._notifier, self._prober, self._interval, self._stop)
        finally:
            self._prober.close()
            self._notifier.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def start(cfg: Config, table: PodTable, ctx: zmq.Context[Any],
          given: Mapping[str, str]) -> SystemdNotifier | None:
    """The notifying thread, started when systemd's variables (:func:`take_environment`) name a
    socket; None otherwise."""
    notifier = Notifier(given)
    if not notifier.enabled:
        return None
    thread = SystemdNotifier(cfg, table, notifier, given, ctx)
    thread.start()
    return thread
