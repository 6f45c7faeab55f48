"""The CHaS HTTP edge: a threaded HTTP/1.1 server on the standard library, its routes,
authentication, body limits, deadlines and chunked log streams; every answer comes from
:class:`services.manager.chas.api.ChasApi`. (Issue 16 moves this edge onto a maintained
framework; the core does not change.)"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import select
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Iterator, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from common import auth, rotlog
from common.errors import ErrorCode, InvalidArgument, RikletError
from common.model import dns_label, load_json
from services.manager.chas.conn import (
    WRITE_TIMEOUT,
    Connections,
    DeadlineReader,
    body_deadline,
)
from services.manager.chas.deploy import container_summary, parse_deploy

if TYPE_CHECKING:
    from services.manager.chas.api import ChasApi

log = logging.getLogger("riklet.chas")

MAX_BODY = 1 << 20                 # bytes of a request body (413 above)
FOLLOW_POLL = 0.25                 # seconds between the checks that end a log stream

HTTP_STATUS: Mapping[ErrorCode, int] = {
    ErrorCode.INVALID_ARGUMENT: 400, ErrorCode.BAD_FRAME: 400, ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.PERMISSION_DENIED: 403, ErrorCode.NOT_FOUND: 404, ErrorCode.ALREADY_EXISTS: 409,
    ErrorCode.CONFLICT: 409, ErrorCode.TOO_LARGE: 413, ErrorCode.UNAVAILABLE: 503,
    ErrorCode.TIMEOUT: 503, ErrorCode.INTERNAL: 500,
}

METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})
_ID_ROUTE = re.compile(r"/containers/([^/]+)")
_LOGS_ROUTE = re.compile(r"/containers/([^/]+)/logs")
_DIGITS = re.compile(r"[0-9]{1,18}")
# Route template -> the one method it answers.
ROUTES: Mapping[str, str] = {
    "/openapi.json": "GET", "/containers/deploy": "POST", "/containers": "GET", "/health": "GET",
    "/containers/{container_id}/logs": "GET", "/containers/{container_id}": "DELETE",
}


class HttpError(Exception):
    """An answer other than a RikletError's: 401, 404 of a route, 405, 411, 413."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if field:
        err["field"] = field
    return {"error": err}


# -- HTTP -----------------------------------------------------------------------------------------

class HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 256          # a burst of connects is accepted, then shed if idle

    def __init__(self, api: ChasApi) -> None:
        self.api = api
        self.ssl_context = api.ssl_context
        self.connections = Connections(api.max_connections)
        if ":" in api.host:
            self.address_family = socket.AF_INET6
        super().__init__((api.host.strip("[]"), api._requested_port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer's would look the host name up (getfqdn): nothing here needs it.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.connections.admit(request) is None:  # every connection is in a request
            if self.ssl_context is None:
                body = json.dumps(error_body("unavailable", "too many connections; retry later")).encode()
                with contextlib.suppress(OSError):
                    request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                    b"Connection: close\r\nContent-Length: " + str(len(body)).encode()
                                    + b"\r\n\r\n" + body)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connections.leave(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.leave(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys
        exc = sys.exc_info()[1]
        if isinstance(exc, (OSError, ssl.SSLError)):
            log.debug("connection ended", extra={"client": str(client_address[0]), "error": str(exc)})
        else:
            log.error("connection failed", exc_info=True, extra={"client": str(client_address[0])})


Reply = tuple[int, Any, tuple[tuple[str, str], ...]]   # status, JSON (or bytes), extra headers


class _Handler(BaseHTTPRequestHandler):
    server: HttpServer
    protocol_version = "HTTP/1.1"
    server_version = "riklet-chas"
    sys_version = ""
    timeout = WRITE_TIMEOUT
    disable_nagle_algorithm = True   # a keep-alive answer must not wait for the client's delayed ACK
    _headers_buffer: list[bytes]     # http.server's: the head being built, written by flush_headers()

    # -- connection plumbing ------------------------------------------------------------------

    def setup(self) -> None:
        self._expect_continue = False
        self._conn = self.server.connections.get(self.request)
        if self.server.ssl_context is not None:
            self.request.settimeout(self.server.api.header_timeout)  # the handshake is part of the head
            self.request = self.server.ssl_context.wrap_socket(self.request, server_side=True)
            self._conn.sock = self.request
        super().setup()
        self.rfile.close()  # reads go through the deadline reader instead
        self._reader = DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self.server.ssl_context is not None:
                with contextlib.suppress(OSError):
                    self.request.close()

    def handle_one_request(self) -> None:
        """http.server's, except that every method reaches the router (which answers 405 with
        Allow) instead of only those with a ``do_`` method (501), and that the head must arrive
        within chas.header_timeout of the moment the server starts waiting for it."""
        self._reader.deadline = time.monotonic() + self.server.api.header_timeout
        self._reader.received = 0
        self.raw_requestline = b""
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.requestline = self.request_version = self.command = ""
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return
            if self.request_version == "HTTP/0.9":
                self.send_error(HTTPStatus.BAD_REQUEST, "HTTP/0.9 is not supported")
                return
            self._reader.deadline = None
            self._conn.busy = True   # a request in progress: never closed to make room
            try:
                self._dispatch()
                self.wfile.flush()
            finally:
                self._conn.busy = False
                self._conn.since = time.monotonic()
        except TimeoutError:
            self.close_connection = True
            if self.raw_requestline or self._reader.received:
                self._head_timeout()

    def _head_timeout(self) -> None:
        """408 to a client that began a request and did not finish its head in time (one that
        sent nothing is closed without a word)."""
        if not getattr(self, "command", None):
            self.command = self.requestline = ""
            self.request_version = "HTTP/1.0"
        with contextlib.suppress(OSError):
            self.send_error(HTTPStatus.REQUEST_TIMEOUT, "the request's headers did not arrive within "
                            f"{self.server.api.header_timeout:g} s (chas.header_timeout)")

    def version_string(self) -> str:
        return self.server_version

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # one structured line per request is written by _dispatch

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def handle_expect_100(self) -> bool:
        self._expect_continue = True  # sent only once the body is known to be acceptable
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol errors http.server finds itself (request line, headers): same JSON shape."""
        self.close_connection = True
        if getattr(self, "request_version", "HTTP/0.9") in ("HTTP/0.9", ""):
            self.request_version = "HTTP/1.0"  # answer with a status line, whatever was asked
        err = {414: "too_large", 431: "too_large", 408: "timeout"}.get(code, "invalid_argument")
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._begin()
        self._method = "OTHER"
        with contextlib.suppress(OSError):
            self._write_json(code, error_body(err, message or phrase), ())
        self._done()

    # -- one request --------------------------------------------------------------------------

    def _begin(self) -> None:
        self._t0 = time.perf_counter()
        self._latency: float | None = None
        self._status = 0
        self._template = "other"
        command = getattr(self, "command", None) or ""
        self._method = command if command in METHODS else "OTHER"
        self._error: str | None = None
        self._deploy = False

    def _done(self) -> None:
        elapsed = time.perf_counter() - self._t0
        api = self.server.api
        if self._status:
            api.stats.request(self._method, self._template, self._status, self._latency or elapsed)
            if self._error:
                api.stats.error(self._error)
            if self._deploy:
                api.stats.deployment(self._status < 300)
        raw_path = getattr(self, "path", "") or ""
        log.info("request", extra={
            "method": self._method, "path": urlsplit(raw_path).path[:256] if raw_path else "",
            "endpoint": self._template, "status": self._status or None,
            "duration_ms": round(elapsed * 1000, 2), "client": str(self.client_address[0])})

    def _dispatch(self) -> None:
        self._begin()
        te = self.headers.get("Transfer-Encoding")
        length = self.headers.get("Content-Length")
        self._unread_body = te is not None or (length is not None and length.strip() != "0")
        try:
            reply = self._route()
            if reply is not None:
                self._write(*reply)
        except HttpError as exc:
            self._fail(exc.status, exc.code, exc.message, exc.field, exc.headers)
        except RikletError as exc:
            self._fail(HTTP_STATUS.get(exc.code, 500), exc.code.value, exc.message, exc.field, ())
        except (BrokenPipeError, ConnectionResetError, TimeoutError, ssl.SSLError):
            self.close_connection = True
        except Exception:
            log.exception("request failed", extra={"method": self._method, "endpoint": self._template})
            self._fail(500, "internal", "internal error", None, ())
        finally:
            self._done()

    def _fail(self, status: int, code: str, message: str, field: str | None,
              headers: tuple[tuple[str, str], ...]) -> None:
        if self._status:  # the answer had begun (a stream): nothing can be added
            self.close_connection = True
            return
        self._error = code
        with contextlib.suppress(OSError):
            self._write_json(status, error_body(code, message, field), headers)

    def _write(self, status: int, payload: Any, headers: tuple[tuple[str, str], ...]) -> None:
        if isinstance(payload, bytes):
            self._send(status, payload, "text/plain; charset=utf-8", headers)
        else:
            self._write_json(status, payload, headers)

    def _write_json(self, status: int, payload: Any, headers: tuple[tuple[str, str], ...]) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", headers)

    def _send(self, status: int, body: bytes, content_type: str,
              headers: tuple[tuple[str, str], ...]) -> None:
        if getattr(self, "_unread_body", False):
            self.close_connection = True  # a body we did not read must not be taken for a request
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in headers:
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        # Head and body in one write: a second small write would wait for the client's
        # delayed ACK of the first (about 40 ms per keep-alive request).
        self._headers_buffer.append(b"\r\n" + (body if self.command != "HEAD" else b""))
        self.flush_headers()
        self._status = status

    # -- routing ------------------------------------------------------------------------------

    def _route(self) -> Reply | None:
        api = self.server.api
        parts = urlsplit(self.path)
        path = parts.path
        container_id = ""
        if path in ("/openapi.json", "/containers/deploy", "/containers", "/health"):
            self._template = path
        elif m := _LOGS_ROUTE.fullmatch(path):
            self._template, container_id = "/containers/{container_id}/logs", unquote(m.group(1))
        elif m := _ID_ROUTE.fullmatch(path):
            self._template, container_id = "/containers/{container_id}", unquote(m.group(1))
        if self._template != "/openapi.json" and not auth.bearer_ok(self.headers.get("Authorization"),
                                                                   api.token()):
            raise HttpError(401, ErrorCode.UNAUTHENTICATED.value,
                            "missing or wrong bearer token: send Authorization: Bearer <token> "
                            "(see auth.token_file)", "Authorization",
                            (("WWW-Authenticate", 'Bearer realm="riklet"'),))
        if self._template == "other":
            raise HttpError(404, ErrorCode.NOT_FOUND.value, "no such endpoint (see GET /openapi.json)",
                            "path")
        self._allow(ROUTES[self._template])
        logs = self._template == "/containers/{container_id}/logs"
        query = self._query(parts.query, ("tail", "follow", "container") if logs else ())
        if self._template == "/openapi.json":
            return 200, api.openapi, ()
        if self._template == "/containers/deploy":
            self._deploy = True
            return self._deploy_route()
        if self._template == "/containers":
            return 200, api.list(), ()
        if self._template == "/health":
            return 200, api.health(), ()
        if self._template == "/containers/{container_id}/logs":
            return self._logs(container_id, query)
        return 200, api.delete(container_id), ()

    def _allow(self, method: str) -> None:
        if self.command != method:
            raise HttpError(405, "method_not_allowed", f"{self._template} answers {method}",
                            "method", (("Allow", method),))

    def _query(self, query: str, allowed: tuple[str, ...]) -> dict[str, str]:
        try:
            pairs = parse_qsl(query, keep_blank_values=True, max_num_fields=16)
        except ValueError as exc:
            raise InvalidArgument(f"cannot parse the query string: {exc}", "query") from exc
        out: dict[str, str] = {}
        for key, value in pairs:
            if key not in allowed:
                hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
                raise InvalidArgument(f"unknown query parameter{hint}", f"query.{key[:100]}")
            if key in out:
                raise InvalidArgument("given twice", f"query.{key}")
            out[key] = value
        return out

    # -- deploy -------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding") is not None:
            raise HttpError(411, "length_required", "send the body with a Content-Length, not chunked",
                            "Content-Length")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            raise HttpError(411, "length_required", "a Content-Length is required", "Content-Length")
        if len(set(lengths)) != 1 or not _DIGITS.fullmatch(lengths[0].strip()):
            raise HttpError(400, ErrorCode.INVALID_ARGUMENT.value, "expected one decimal Content-Length",
                            "Content-Length")
        size = int(lengths[0].strip())
        if size > MAX_BODY:
            raise HttpError(413, ErrorCode.TOO_LARGE.value,
                            f"the body is larger than {MAX_BODY // 1024} KiB", "body")
        if self._expect_continue:
            self.send_response_only(100)
            self.end_headers()
        allowed = body_deadline(size, self.server.api.header_timeout)
        self._reader.deadline = time.monotonic() + allowed
        try:
            data = self.rfile.read(size)
        except TimeoutError:
            raise HttpError(408, ErrorCode.TIMEOUT.value, f"the body ({size} bytes) did not arrive within "
                            f"{allowed:.3g} s", "body") from None
        finally:
            self._reader.deadline = None
        if len(data) < size:
            raise ConnectionResetError("the client sent less than its Content-Length")
        self._unread_body = False
        return data

    def _deploy_route(self) -> Reply:
        raw = self._read_body()
        data = load_json(raw, "body", MAX_BODY)  # size, depth, then the decoder
        request = parse_deploy(data)
        record, created = self.server.api.deploy(request)
        summary = container_summary(record)
        headers = (("Location", f"/containers/{summary['id']}"),) if created else ()
        return (201 if created else 200), summary, headers

    # -- logs ---------------------------------------------------------------------------------

    def _logs(self, container_id: str, query: dict[str, str]) -> Reply | None:
        api = self.server.api
        tail: int | None = None
        if "tail" in query:
            if not _DIGITS.fullmatch(query["tail"]):
                raise InvalidArgument("expected a non-negative integer (lines)", "query.tail")
            tail = int(query["tail"])
        follow = query.get("follow", "false").lower()
        if follow not in ("true", "false", "1", "0", "yes", "no", ""):
            raise InvalidArgument("expected true or false", "query.follow")
        container = query.get("container", "")
        if container:
            if len(container) > 63:
                raise InvalidArgument("expected a container name (a DNS label)", "query.container")
            dns_label(container, "query.container")
        record = api.find(container_id)
        try:
            path = api.service.log_file(record["name"], container)
        except InvalidArgument as exc:
            if exc.field == "container":
                exc.field = "query.container"
            raise
        if follow not in ("true", "1", "yes"):
            return 200, rotlog.tail(path, tail), ()
        self._stream(path, tail, record)
        return None

    def _stream(self, path: str, tail: int | None, record: Mapping[str, Any]) -> None:
        api = self.server.api
        stop = threading.Event()
        new = rotlog.follow(path, stop)  # before tail(): nothing written in between is lost
        try:
            data = rotlog.tail(path, tail)
            self.close_connection = True
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Connection", "close")
            self.end_headers()
            self._status = 200
            self._latency = time.perf_counter() - self._t0
            with api._streams_lock:
                api._streams.add(stop)
            threading.Thread(target=self._watch, args=(stop, str(record["name"]), str(record.get("uid"))),
                             name="chas-follow", daemon=True).start()
            for chunk in _chunks(data):
                self._chunk(chunk)
            for chunk in new:
                self._chunk(chunk)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client went away
        finally:
            stop.set()
            with api._streams_lock:
                api._streams.discard(stop)
            close = getattr(new, "close", None)
            if close is not None:
                close()

    def _chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    def _watch(self, stop: threading.Event, name: str, uid: str) -> None:
        """End a follow stream when the client closes (or sends anything: it has nothing to
        send) or when the pod is gone; a final short wait lets its last output through."""
        sock = self.connection
        while not stop.wait(FOLLOW_POLL):
            try:
                readable, _, _ = select.select([sock], [], [], 0)
            except (OSError, ValueError):
                break
            if readable:
                break
            if not self.server.api.pod_alive(name, uid):
                stop.wait(2 * FOLLOW_POLL)
                break
        stop.set()


def _chunks(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]
