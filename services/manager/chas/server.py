"""The CHaS HTTP API's server: aiohttp on its own thread and (uvloop) event loop, inside the
manager. The blocking core (:class:`services.manager.chas.api.ChasApi`) is called through a
bounded thread pool; the app (routes, authentication, errors) is in ``web.py``.

aiohttp gives HTTP/1.1 parsing, keep-alive, body limits and chunked streams. What it lacks, and
what this module adds on top of its connection class (``RequestHandler``), is what conn.py
describes: a deadline for a request's whole head (slowloris), a cap on connections that closes
the oldest idle one to make room, and protocol errors in the API's JSON error shape.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import re
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from common.errors import Unavailable
from services.manager.chas.conn import Connections

if TYPE_CHECKING:
    from services.manager.chas.api import ChasApi

log = logging.getLogger("riklet.chas")

WORKERS = 8                     # threads calling the blocking core at once
MAX_HEADERS = 100               # header lines of a request (431 above), as http.server had
SERVER = "riklet-chas"          # the Server header (not aiohttp's, with its version)
_QUOTED_LINE = re.compile(r"b'[!-~]+ (/[!-~]*) HTTP/")
MAX_LINE = 65536                # bytes of the request line (414 above)
MAX_FIELD = MAX_LINE - 1        # bytes of a header line (431 above)


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if field:
        err["field"] = field
    return {"error": err}


def raw_answer(status: int, phrase: str, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 answer written straight to a transport (no request to answer through
    aiohttp: a refused connection, a head that did not arrive)."""
    body = json.dumps(error_body(code, message)).encode()
    return (f"HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nX-Request-Id: {uuid.uuid4().hex}\r\nServer: {SERVER}\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n").encode() + body


class Connection(RequestHandler):
    """aiohttp's connection, under the head deadline and the connection cap."""

    def __init__(self, edge: Edge, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._edge = edge
        self._slot: Any = None
        self._timer: asyncio.TimerHandle | None = None
        self._received = 0          # bytes since the connection last became idle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        slot = self._edge.connections.admit(self, self.force_close)
        if slot is None:            # every connection is in a request: refuse this one
            with contextlib.suppress(Exception):
                getattr(transport, "write")(raw_answer(503, "Service Unavailable", "unavailable",  # noqa: B009
                                                       "too many connections; retry later"))
            transport.close()
            self._edge.api.stats.request("OTHER", "other", 503, 0.0)
            return
        self._slot = slot
        super().connection_made(transport)
        self.idle()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._slot is None:
            return
        self._edge.connections.leave(self)
        self._cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._slot is not None and not self._slot.busy:
            self._received += len(data)
        super().data_received(data)

    # -- the head deadline ---------------------------------------------------------------------

    def busy(self) -> None:
        """A request's head was read (and so its token checked): never closed for another."""
        if self._slot is not None:
            self._slot.busy = True
        self._cancel()

    def idle(self) -> None:
        """Waiting for the next request: its head must arrive within chas.header_timeout."""
        if self._slot is None:
            return
        self._slot.busy = False
        self._slot.since = time.monotonic()
        self._received = 0
        self._cancel()
        self._timer = asyncio.get_running_loop().call_later(self._edge.api.header_timeout, self._late)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _late(self) -> None:
        """408 to a client that began a request and did not finish its head in time (one that
        sent nothing is closed without a word)."""
        self._timer = None
        transport = self.transport
        if self._received and transport is not None and not transport.is_closing():
            timeout = self._edge.api.header_timeout
            with contextlib.suppress(Exception):
                transport.write(raw_answer(408, "Request Timeout", "timeout",
                                           f"the request's headers did not arrive within {timeout:g} s "
                                           "(chas.header_timeout)"))
        self._edge.api.stats.request("OTHER", "other", 408, float(self._edge.api.header_timeout))
        self.force_close()

    # -- protocol errors in the API's shape ----------------------------------------------------

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        code, field = "invalid_argument", None
        text = message or str(exc or "") or "bad request"
        headers = {"X-Request-Id": uuid.uuid4().hex, "Cache-Control": "no-store", "Server": SERVER}
        if isinstance(exc, BadHttpMethod) and (allow := self._allow(text)):
            # A method no HTTP parser of aiohttp's knows: the route's 405, as for any other.
            status, code, text, field = 405, "method_not_allowed", f"the path answers {allow}", "method"
            headers["Allow"] = allow
        elif isinstance(exc, LineTooLong):
            # The request line's limit differs from a header line's by a byte, to tell them apart.
            status, code = (414 if str(exc.args[1]) == str(MAX_LINE) else 431), "too_large"
        elif isinstance(exc, BadHttpMessage) and "too many headers" in text.lower():
            status, code = 431, "too_large"
        elif isinstance(exc, ConnectionError):   # the client went in the middle of its request:
            log.debug("connection ended", extra={"error": str(exc)})   # no one to answer, nothing to count
            resp = web.Response(status=503)
            resp.force_close()
            return resp
        elif status >= 500:
            code, text = "internal", "internal error"
            log.error("request failed", exc_info=exc)
        if field is None and "content-length" in text.lower():
            field = "Content-Length"
        self._edge.api.stats.request("OTHER", "other", status, 0.0)
        self._edge.api.stats.error(code)
        resp = web.Response(status=status, body=json.dumps(error_body(code, text[:300], field)).encode(),
                            content_type="application/json", headers=headers)
        resp.force_close()
        return resp

    @staticmethod
    def _allow(text: str) -> str:
        """The methods of the route named in the request line the parser quotes, if any."""
        from services.manager.chas.web import allowed_methods

        m = _QUOTED_LINE.search(text)
        return allowed_methods(m.group(1)) if m else ""


class Edge:
    """The server: a thread running an event loop, the app, the listening socket."""

    def __init__(self, api: ChasApi) -> None:
        self.api = api
        self.connections = Connections(api.max_connections)
        self.executor = concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="chas-core")
        self.sock = self._bind(api.host.strip("[]"), api._requested_port)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopping: asyncio.Event | None = None
        self._error: BaseException | None = None

    @staticmethod
    def _bind(host: str, port: int) -> socket.socket:
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
                sock.listen(256)
            except OSError:
                sock.close()
                raise
        except OSError as exc:
            raise Unavailable(f"cannot listen on {host}:{port}: {exc.strerror or exc}", "chas.port") from exc
        sock.setblocking(False)
        return sock

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="chas-http", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        if self.loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(10)
        self.executor.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(OSError):
            self.sock.close()

    def _run(self) -> None:
        try:
            import uvloop
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        except ImportError:
            loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:   # reported to start(), or logged
            if not self._ready.is_set():
                self._error = exc
            else:
                log.exception("the CHaS API server stopped")
        finally:
            self._ready.set()
            loop.close()

    async def _serve(self) -> None:
        from services.manager.chas.web import make_app

        self._stopping = asyncio.Event()
        app = make_app(self.api, self)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        server = runner.server
        assert server is not None
        options = {"loop": asyncio.get_running_loop(), "access_log": None, "max_headers": MAX_HEADERS,
                   "max_line_size": MAX_LINE, "max_field_size": MAX_FIELD, "lingering_time": 1.0}
        listener = await asyncio.get_running_loop().create_server(
            lambda: Connection(self, server, **options), sock=self.sock, ssl=self.api.ssl_context,
            ssl_handshake_timeout=self.api.header_timeout if self.api.ssl_context else None)
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            listener.close()
            for conn in list(server.connections):
                conn.force_close()
            await runner.cleanup()
