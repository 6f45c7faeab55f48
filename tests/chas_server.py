"""A CHaS API server for tests, written from seed 003's outbound API contract (not from the
agent's code): ``POST /nodes/register`` and ``PUT /nodes/{node_id}/health``.

Every request is recorded (with its arrival time on the monotonic clock and the status it was
answered with) and checked against the contract; a request that breaks it (a missing, extra or
mistyped field, a wrong Content-Type, a missing bearer token when one is set, a path or method
outside the contract) is answered 4xx and listed in :attr:`ChasServer.violations`.

Modes, switchable at run time with :meth:`ChasServer.set_mode`:

- ``normal``: register -> 201 ``{"node_id": ...}``; health of a registered node -> 200, of an
  unknown one -> 404;
- ``failing``: every request -> 500;
- ``slow``: answers as in ``normal`` after ``delay`` seconds;
- ``unknown-node``: every health report -> 404 (the agent must register again); register works.

Down is :meth:`ChasServer.stop` (the listener is closed; connections are refused) and
:meth:`ChasServer.start` again on the same port. :meth:`ChasServer.forget` drops every
registration once, like a server restarted without its state.
"""

from __future__ import annotations

import ipaddress
import json
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support import free_port

MODES = ("normal", "failing", "slow", "unknown-node")
SIZE = re.compile(r"\d+(\.\d+)?(B|KB|MB|GB|TB)")  # "8GB", "100GB", "7.5GB"
HEALTH_STATUSES = ("healthy", "unhealthy")


@dataclass
class Request:
    method: str
    path: str                # as sent, percent-encoding included
    node_id: str | None      # decoded from a health path
    headers: dict[str, str]
    body: Any                # parsed JSON (None if it was not JSON)
    at: float                # time.monotonic() on arrival
    mode: str                # the server's mode on arrival
    status: int = 0          # the status answered


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fields(obj: Any, where: str, spec: dict[str, Any]) -> list[str]:
    """Problems of ``obj`` against {field: predicate}: exactly these fields, each passing."""
    if not isinstance(obj, dict):
        return [f"{where}: expected an object, got {type(obj).__name__}"]
    problems = [f"{where}.{k}: unexpected field" for k in obj if k not in spec]
    for key, check in spec.items():
        if key not in obj:
            problems.append(f"{where}.{key}: missing")
        elif not check(obj[key]):
            problems.append(f"{where}.{key}: bad value {obj[key]!r}")
    return problems


def _ip(value: Any) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False


def _size(value: Any) -> bool:
    return isinstance(value, str) and SIZE.fullmatch(value) is not None


def register_problems(body: Any) -> list[str]:
    return _fields(body, "register", {
        "node_id": lambda v: isinstance(v, str) and v != "",
        "hostname": lambda v: isinstance(v, str) and v != "",
        "ip_address": lambda v: isinstance(v, str) and _ip(v),
        "port": lambda v: _is_int(v) and 0 < v < 65536,
        "resources": lambda v: isinstance(v, dict),
    }) + (_fields(body["resources"], "register.resources", {
        "cpu_cores": lambda v: _is_int(v) and v >= 1,
        "memory_total": _size,
        "disk_total": _size,
    }) if isinstance(body, dict) and isinstance(body.get("resources"), dict) else [])


def health_problems(body: Any) -> list[str]:
    return _fields(body, "health", {
        "status": lambda v: v in HEALTH_STATUSES,
        "resources": lambda v: isinstance(v, dict),
        "uptime": lambda v: _is_int(v) and v >= 0,
    }) + (_fields(body["resources"], "health.resources", {
        "cpu_usage": lambda v: _is_number(v) and v >= 0,
        "memory_usage": lambda v: _is_number(v) and 0 <= v <= 100,
        "disk_available": _size,
        "container_count": lambda v: _is_int(v) and v >= 0,
    }) if isinstance(body, dict) and isinstance(body.get("resources"), dict) else [])


class ChasServer:
    """Built stopped (its port is picked at once); ``start()`` to listen."""

    def __init__(self, token: str | None = None, prefix: str = "") -> None:
        self.token = token
        self.prefix = prefix.rstrip("/")
        self.port = free_port()
        self.mode = "normal"
        self.delay = 0.0
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        self._violations: list[str] = []
        self.registered: dict[str, dict[str, Any]] = {}  # node_id -> last register body
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()  # set on stop: slow answers end at once

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.prefix}"

    def start(self) -> ChasServer:
        assert self._httpd is None, "already started"
        self._wake = threading.Event()
        httpd = ThreadingHTTPServer(("127.0.0.1", self.port), _Handler)
        httpd.daemon_threads = True
        httpd.chas = self  # type: ignore[attr-defined]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="chas-test-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._wake.set()
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=2)

    close = stop

    def __enter__(self) -> ChasServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def set_mode(self, mode: str, delay: float = 0.0) -> None:
        assert mode in MODES, mode
        with self._lock:
            self.mode, self.delay = mode, delay

    def forget(self) -> None:
        with self._lock:
            self.registered.clear()

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    @property
    def violations(self) -> list[str]:
        with self._lock:
            return list(self._violations)

    def registers(self) -> list[Request]:
        return [r for r in self.requests if r.method == "POST"]

    def healths(self, status: int | None = None) -> list[Request]:
        return [r for r in self.requests if r.method == "PUT" and (status is None or r.status == status)]

    # --- called by the handler -------------------------------------------------------------

    def _answer(self, method: str, path: str, headers: dict[str, str], raw: bytes
                ) -> tuple[Request, int, dict[str, Any], float, threading.Event]:
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        with self._lock:
            req = Request(method, path, None, headers, body, time.monotonic(), self.mode)
            self._requests.append(req)
            status, answer = self._decide(req, raw)
            req.status = status
            return req, status, answer, (self.delay if self.mode == "slow" else 0.0), self._wake

    def _decide(self, req: Request, raw: bytes) -> tuple[int, dict[str, Any]]:
        problems: list[str] = []
        route = req.path[len(self.prefix):].split("/") if req.path.startswith(self.prefix + "/") else []
        if req.method == "POST" and route == ["", "nodes", "register"]:
            kind = "register"
        elif req.method == "PUT" and len(route) == 4 and route[:2] == ["", "nodes"] and route[3] == "health":
            kind = "health"
            req.node_id = urllib.parse.unquote(route[2])
        else:
            self._violations.append(f"{req.method} {req.path}: not in the contract")
            return 404, {"error": "no such endpoint"}
        if self.token is not None and req.headers.get("authorization") != f"Bearer {self.token}":
            problems.append("Authorization: missing or wrong bearer token")
        if not req.headers.get("content-type", "").startswith("application/json"):
            problems.append(f"Content-Type: {req.headers.get('content-type')!r}")
        if req.body is None:
            problems.append(f"body is not JSON: {raw[:80]!r}")
        else:
            problems += register_problems(req.body) if kind == "register" else health_problems(req.body)
        if problems:
            self._violations += [f"{req.method} {req.path}: {p}" for p in problems]
            return (401 if problems[0].startswith("Authorization") else 400), {"error": problems[0]}
        if self.mode == "failing":
            return 500, {"error": "failing on purpose"}
        if kind == "register":
            self.registered[req.body["node_id"]] = req.body
            return 201, {"node_id": req.body["node_id"]}
        if self.mode == "unknown-node" or req.node_id not in self.registered:
            return 404, {"error": "unknown node"}
        return 200, {"status": "ok"}


class _Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        chas: ChasServer = self.server.chas  # type: ignore[attr-defined]
        headers = {k.lower(): v for k, v in self.headers.items()}
        _, status, answer, delay, wake = chas._answer(self.command, self.path, headers, raw)
        if delay and wake.wait(delay):
            return  # stopped while slow: the connection is dropped unanswered
        data = json.dumps(answer).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the client gave up (a timeout in slow mode)

    do_POST = do_PUT = do_GET = do_DELETE = do_PATCH = _handle
