"""The manager's client of the CHaS API server (seed 003, "Outbound API").

    POST {api_url}/nodes/register           {"node_id", "hostname", "ip_address", "port", "resources"}
    PUT  {api_url}/nodes/{node_id}/health   the body of the agent's own ``GET /health``

:class:`ChasReporter` is one daemon thread. It registers, retrying with jittered exponential
back-off (:class:`common.rik.Backoff`) until the server answers 2xx, then sends a health report
right away and then on a fixed schedule: slot k is at t0 + k * interval, whatever the server
answers; slots missed behind a slow answer are skipped, never sent in a burst, so reports never
come closer than the interval. A 404 on a report means the server forgot the node: it registers
again (at once, then with back-off) and the next report goes in the next slot.

Logs (``riklet.chas``) are written once per change of state, never per attempt, and never
carry the token. Sizes in the register body are written like the seed's: see
:func:`format_size`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import math
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from common.rik import Backoff
from services.manager.chas.stats import ChasStats

log = logging.getLogger("riklet.chas")

_UNITS = ("B", "KB", "MB", "GB", "TB")  # binary, as common.units.parse_memory reads them back
_READ_LIMIT = 64 * 1024                 # of an answer: only its status matters


def format_size(size: int) -> str:
    """Bytes the way the seed writes sizes ("8GB", "100GB"): binary units (1KB = 1024B, like
    ``common.units.parse_memory``), the largest unit the value reaches, one decimal only when it
    is not zero: 8589934592 -> "8GB", 16_500_000_000 -> "15.4GB", 512 -> "512B"."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"expected a byte count, got {size!r}")
    value, unit = float(size), 0
    while unit < len(_UNITS) - 1 and round(value, 1) >= 1024:
        value /= 1024
        unit += 1
    return f"{value:.1f}".removesuffix(".0") + _UNITS[unit]


def resources_from_monitor(node_resources: Mapping[str, Any], disk_total_bytes: int | None = None
                           ) -> dict[str, Any]:
    """The register body's ``resources`` from the monitor's ``node.resources`` answer
    (``cpu``: logical cores, ``memory``: bytes). ``disk_total_bytes`` defaults to its
    ``disksize`` (the filesystem of the state directory)."""
    cpu = node_resources.get("cpu")
    if isinstance(cpu, bool) or not isinstance(cpu, int) or cpu < 1:
        raise ValueError(f"node.resources: expected a core count in 'cpu', got {cpu!r}")
    disk = node_resources.get("disksize") if disk_total_bytes is None else disk_total_bytes
    return {"cpu_cores": cpu, "memory_total": _size("memory", node_resources.get("memory")),
            "disk_total": _size("disksize", disk)}


def _size(field: str, value: Any) -> str:
    try:
        return format_size(value)
    except ValueError as exc:
        raise ValueError(f"node.resources: {field}: {exc}") from exc


class State(StrEnum):
    REGISTERING = "registering"   # not registered yet (or forgotten), last attempt not failed
    REGISTERED = "registered"     # registered and the last request succeeded
    UNREACHABLE = "unreachable"   # the last request failed: no answer, a timeout, or an error status


@dataclass(frozen=True)
class Answer:
    status: int | None  # None: no answer (refused, timed out, reset)
    error: str          # for logs: "HTTP 500", "timed out", ...

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class ChasReporter:
    def __init__(self, api_url: str, node_id: str, hostname: str, ip_address: str, port: int,
                 resources: Callable[[], dict[str, Any]], health: Callable[[], dict[str, Any]],
                 interval: float, stats: ChasStats, token: str | None = None, timeout: float = 5.0,
                 backoff_initial: float = 1.0, backoff_max: float = 60.0) -> None:
        if interval <= 0 or timeout <= 0 or not 0 < backoff_initial <= backoff_max:
            raise ValueError("interval, timeout and back-off must be positive, initial <= max")
        url = urllib.parse.urlsplit(api_url)
        if url.scheme not in ("http", "https") or not url.hostname or url.username is not None \
                or url.query or url.fragment:
            raise ValueError("expected the CHaS API URL as http(s)://HOST[:PORT][/PATH]")
        self._https = url.scheme == "https"
        self._host, self._port = url.hostname, url.port
        self._prefix = url.path.rstrip("/")
        self._display_url = f"{url.scheme}://{url.netloc}{self._prefix}"
        self._ssl = ssl.create_default_context() if self._https else None  # the system's CAs
        self._node_id, self._hostname, self._ip_address, self._node_port = node_id, hostname, ip_address, port
        self._resources, self._health = resources, health
        self._interval, self._timeout, self._stats = interval, timeout, stats
        self._headers = {"Content-Type": "application/json", "Accept": "application/json",
                         "User-Agent": "riklet"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._backoff = Backoff(backoff_initial, backoff_max)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chas-reporter", daemon=True)
        self._conn_lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None
        self._registered = False
        self._reachable: bool | None = None  # None until the first answer (or its absence)
        self._source_failing = False         # resources() or health() raised
        self._failures = 0

    @property
    def state(self) -> State:
        if self._reachable is False:
            return State.UNREACHABLE
        return State.REGISTERED if self._registered else State.REGISTERING

    @property
    def failures(self) -> int:
        """Failed requests since the last success."""
        return self._failures

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Ends the thread: a back-off wait ends at once, a request in flight is cut off."""
        self._stop.set()
        with self._conn_lock:
            sock = self._conn.sock if self._conn is not None else None
            if sock is not None:
                # socket.socket's own shutdown, not SSLSocket's: that one drops the SSL object
                # under the reader's feet. The reader's recv() then fails at once.
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # --- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        next_slot: float | None = None  # monotonic time of the next health report
        while not self._stop.is_set():
            try:
                if not self._registered:
                    if self._register():
                        self._backoff.reset()
                        if next_slot is None:
                            next_slot = time.monotonic()
                    else:
                        self._stop.wait(self._backoff.next())
                    continue
                assert next_slot is not None
                if self._stop.wait(max(0.0, next_slot - time.monotonic())):
                    break
                self._report()
                next_slot = self._slot_after(next_slot)
            except Exception:  # a bug here must not end the reports for good
                log.exception("CHaS reporter failed; continuing")
                self._stop.wait(self._backoff.next())

    def _slot_after(self, slot: float) -> float:
        now = time.monotonic()
        slot += self._interval
        if slot <= now:  # the last request outlasted its slot: skip what was missed
            slot += (math.floor((now - slot) / self._interval) + 1) * self._interval
        return slot

    def _register(self) -> bool:
        body = self._build(lambda: {
            "node_id": self._node_id, "hostname": self._hostname, "ip_address": self._ip_address,
            "port": self._node_port, "resources": self._resources()})
        if body is None:
            self._stats.set_registered(False)
            return False
        answer = self._send("POST", "/nodes/register", body)
        if self._stop.is_set():
            return False
        self._stats.set_registered(answer.ok)
        self._note(answer.ok, answer, "register")
        if answer.ok:
            self._registered = True
            log.info("registered with CHaS", extra=self._extra())
        return answer.ok

    def _report(self) -> None:
        body = self._build(self._health)
        if body is None:
            self._stats.report(False)
            return
        path = f"/nodes/{urllib.parse.quote(self._node_id, safe='')}/health"
        answer = self._send("PUT", path, body)
        if self._stop.is_set():
            return
        self._stats.report(answer.ok)
        forgotten = answer.status == 404
        self._note(answer.ok or forgotten, answer, "health")
        if forgotten:
            self._registered = False
            self._stats.set_registered(False)
            log.warning("CHaS server does not know this node; registering again", extra=self._extra())

    def _build(self, make: Callable[[], Mapping[str, Any]]) -> bytes | None:
        """A request body from the agent's own figures; None (logged once) when they fail."""
        try:
            body = json.dumps(make(), separators=(",", ":")).encode()
        except Exception as exc:
            if not self._source_failing:
                log.warning("cannot build the CHaS report; nothing is sent until it works",
                            extra=self._extra(error=f"{type(exc).__name__}: {exc}"[:200]))
            self._source_failing = True
            return None
        if self._source_failing:
            log.info("CHaS report can be built again", extra=self._extra())
        self._source_failing = False
        return body

    def _note(self, reachable: bool, answer: Answer, action: str) -> None:
        if reachable:
            self._failures = 0
            if self._reachable is False:
                log.info("CHaS server reachable again", extra=self._extra())
            self._reachable = True
            return
        self._failures += 1
        if self._reachable is not False:
            log.warning("CHaS server unreachable or failing; will keep trying",
                        extra=self._extra(error=answer.error, action=action))
        self._reachable = False

    def _extra(self, **more: Any) -> dict[str, Any]:
        return {"chas_url": self._display_url, "node_id": self._node_id, **more}

    # --- one request -----------------------------------------------------------------------

    def _send(self, method: str, path: str, body: bytes) -> Answer:
        conn: http.client.HTTPConnection
        if self._ssl is not None:
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout,
                                               context=self._ssl)
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        try:
            conn.connect()
            with self._conn_lock:
                if self._stop.is_set():
                    return Answer(None, "stopped")
                self._conn = conn
            conn.request(method, self._prefix + path, body=body, headers=self._headers)
            response = conn.getresponse()
            response.read(_READ_LIMIT)
            return Answer(response.status, f"HTTP {response.status}")
        except (OSError, http.client.HTTPException) as exc:
            return Answer(None, _describe(exc))
        finally:
            with self._conn_lock:
                self._conn = None
            conn.close()


def _describe(exc: Exception) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"[:200]
