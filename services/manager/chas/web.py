"""The CHaS HTTP API's app on aiohttp: routes, authentication, request ids, the error shape,
the request log and counters. Every answer comes from :class:`services.manager.chas.api.ChasApi`
(blocking: called through the server's bounded pool); log streams are in ``logstream.py``.

The routes are ``ROUTES``; ``openapi.json`` documents exactly these (tests/test_chas_http.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

from common import auth
from common.errors import ErrorCode, InvalidArgument, RikletError
from common.model import load_json
from services.manager.chas import views
from services.manager.chas.conn import body_deadline
from services.manager.chas.deploy import container_summary, parse_deploy
from services.manager.chas.server import SERVER, Connection, error_body

if TYPE_CHECKING:
    from services.manager.chas.api import ChasApi
    from services.manager.chas.server import Edge

log = logging.getLogger("riklet.chas")
T = TypeVar("T")

MAX_BODY = 1 << 20                 # bytes of a request body (413 above)

HTTP_STATUS: Mapping[ErrorCode, int] = {
    ErrorCode.INVALID_ARGUMENT: 400, ErrorCode.BAD_FRAME: 400, ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.PERMISSION_DENIED: 403, ErrorCode.NOT_FOUND: 404, ErrorCode.ALREADY_EXISTS: 409,
    ErrorCode.CONFLICT: 409, ErrorCode.TOO_LARGE: 413, ErrorCode.UNAVAILABLE: 503,
    ErrorCode.TIMEOUT: 503, ErrorCode.INTERNAL: 500,
}
METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})
PUBLIC = frozenset({"/openapi.json", "/livez", "/readyz"})   # answered without the token
DIGITS = re.compile(r"[0-9]{1,18}")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")

# The request id of the request being served, for every log line written while serving it.
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("chas_request_id", default=None)


@dataclass
class State:
    """What the middleware and a route share about the request being served."""

    rid: str
    t0: float
    body_read: bool = False
    deploy: bool = False             # a deploy that passed the token and method checks
    latency: float | None = None     # when the answer began, for a stream (else its end)


current: contextvars.ContextVar[State] = contextvars.ContextVar("chas_request")

API_KEY: web.AppKey[ChasApi] = web.AppKey("api")
EDGE_KEY: web.AppKey[Edge] = web.AppKey("edge")


class HttpError(Exception):
    """An answer other than a RikletError's: 401, 404 of a route, 405, 408, 411, 413."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = dict(headers or {})


def install_log_ids() -> None:
    """Every log record written while a request is served carries its ``request_id``."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "chas_request_ids", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        rid = request_id.get()
        if rid is not None and not hasattr(record, "request_id"):
            record.request_id = rid
        return record

    factory.chas_request_ids = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


async def core(request: web.Request, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on the bounded pool, in this request's context (its id reaches the logs)."""
    ctx = contextvars.copy_context()
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(request.app[EDGE_KEY].executor, functools.partial(ctx.run, fn, *args))


def json_response(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(payload).encode(), content_type="application/json",
                        headers=headers)


def decorate(request: web.Request, resp: web.StreamResponse) -> None:
    """Headers every answer carries (set before it is prepared)."""
    resp.headers["X-Request-Id"] = current.get().rid
    resp.headers.setdefault("Cache-Control", "no-store")
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Server"] = SERVER


def template_of(request: web.Request) -> str:
    """The route template of the path, whatever the method ("other" for no route)."""
    for template, pattern in _PATTERNS:
        if pattern.fullmatch(request.path):
            return template
    return "other"


def query(request: web.Request, allowed: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    if len(request.query) > 16:
        raise InvalidArgument("too many query parameters", "query")
    for key, value in request.query.items():
        if key not in allowed:
            hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
            raise InvalidArgument(f"unknown query parameter{hint}", f"query.{key[:100]}")
        if key in out:
            raise InvalidArgument("given twice", f"query.{key}")
        out[key] = value
    return out


# -- the middleware: everything every request gets ----------------------------------------------

@web.middleware
async def edge(request: web.Request,
               handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    api = request.app[API_KEY]
    t0 = time.perf_counter()
    method = request.method if request.method in METHODS else "OTHER"
    template = template_of(request)
    given = request.headers.get("X-Request-Id")
    rid = given if given is not None and REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
    state = State(rid, t0)
    current.set(state)
    token = request_id.set(rid)
    protocol = request.protocol
    if isinstance(protocol, Connection):
        protocol.busy()
    error: str | None = None
    status = 0
    try:
        try:
            if request.version < (1, 0):
                raise InvalidArgument("HTTP/0.9 is not supported", "version")
            if given is not None and rid != given:
                raise InvalidArgument("expected 1 to 128 letters, digits or ._:/+=-", "X-Request-Id")
            if template not in PUBLIC and not auth.bearer_ok(request.headers.get("Authorization"),
                                                             api.token()):
                raise HttpError(401, ErrorCode.UNAUTHENTICATED.value,
                                "missing or wrong bearer token: send Authorization: Bearer <token> "
                                "(see auth.token_file)", "Authorization",
                                {"WWW-Authenticate": 'Bearer realm="riklet"'})
            exc = request.match_info.http_exception
            if isinstance(exc, web.HTTPMethodNotAllowed):
                allow = ", ".join(sorted(exc.allowed_methods))
                raise HttpError(405, "method_not_allowed", f"{template} answers {allow}",
                                "method", {"Allow": allow})
            if exc is not None:
                raise HttpError(404, ErrorCode.NOT_FOUND.value, "no such endpoint (see GET /openapi.json)",
                                "path")
            resp = await handler(request)
        except HttpError as exc:
            resp = json_response(exc.status, error_body(exc.code, exc.message, exc.field), exc.headers)
            error = exc.code
        except RikletError as exc:
            resp = json_response(HTTP_STATUS.get(exc.code, 500),
                                 error_body(exc.code.value, exc.message, exc.field))
            error = exc.code.value
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("request failed", extra={"method": method, "endpoint": template})
            resp = json_response(500, error_body("internal", "internal error"))
            error = "internal"
        status = resp.status
        if not resp.prepared:
            decorate(request, resp)
            if request.body_exists and not state.body_read:
                resp.force_close()   # a body we did not read must not be taken for a request
        return resp
    finally:
        elapsed = time.perf_counter() - t0
        if status:
            api.stats.request(method, template, status, state.latency or elapsed)
            if error:
                api.stats.error(error)
            if state.deploy:
                api.stats.deployment(status < 300)
        log.info("request", extra={
            "method": method, "path": request.path[:256], "endpoint": template, "status": status or None,
            "duration_ms": round(elapsed * 1000, 2), "client": str(request.remote)})
        request_id.reset(token)
        if isinstance(protocol, Connection):
            protocol.idle()


# -- routes -------------------------------------------------------------------------------------

async def openapi(request: web.Request) -> web.StreamResponse:
    query(request, ())
    return json_response(200, request.app[API_KEY].openapi)


async def livez(request: web.Request) -> web.StreamResponse:
    query(request, ())
    return json_response(200, {"status": "ok"})


async def readyz(request: web.Request) -> web.StreamResponse:
    query(request, ())
    ready = await core(request, request.app[API_KEY].ready)
    return json_response(200 if ready["status"] == "ready" else 503, ready)


async def health(request: web.Request) -> web.StreamResponse:
    query(request, ())
    return json_response(200, await core(request, request.app[API_KEY].health))


async def list_containers(request: web.Request) -> web.StreamResponse:
    options = views.list_options(query(request, views.LIST_PARAMS))
    records = await core(request, request.app[API_KEY].service.memory.list)
    return json_response(200, views.list_page(records, options))


async def inspect(request: web.Request) -> web.StreamResponse:
    query(request, ())
    api = request.app[API_KEY]
    record = await core(request, api.find, request.match_info["container_id"])
    return json_response(200, views.inspect(record))


async def delete(request: web.Request) -> web.StreamResponse:
    query(request, ())
    api = request.app[API_KEY]
    return json_response(200, await core(request, api.delete, request.match_info["container_id"]))


async def read_body(request: web.Request) -> bytes:
    if "Transfer-Encoding" in request.headers:
        raise HttpError(411, "length_required", "send the body with a Content-Length, not chunked",
                        "Content-Length")
    size = request.content_length
    if size is None:
        raise HttpError(411, "length_required", "a Content-Length is required", "Content-Length")
    if size > MAX_BODY:
        raise HttpError(413, ErrorCode.TOO_LARGE.value, f"the body is larger than {MAX_BODY // 1024} KiB",
                        "body", {"Connection": "close"})
    allowed = body_deadline(size, request.app[API_KEY].header_timeout)
    try:
        data = await asyncio.wait_for(request.content.readexactly(size), allowed) if size else b""
    except TimeoutError:
        raise HttpError(408, ErrorCode.TIMEOUT.value, f"the body ({size} bytes) did not arrive within "
                        f"{allowed:.3g} s", "body", {"Connection": "close"}) from None
    except asyncio.IncompleteReadError:
        raise ConnectionResetError("the client sent less than its Content-Length") from None
    current.get().body_read = True
    return data


async def deploy(request: web.Request) -> web.StreamResponse:
    if request.method != "POST":   # /containers/deploy takes every method, so that it is never an id
        raise HttpError(405, "method_not_allowed", "/containers/deploy answers POST", "method",
                        {"Allow": "POST"})
    query(request, ())
    current.get().deploy = True
    api = request.app[API_KEY]
    raw = await read_body(request)
    data = load_json(raw, "body", MAX_BODY)  # size, depth, then the decoder
    parsed = parse_deploy(data)
    record, created = await core(request, api.deploy, parsed)
    summary = container_summary(record)
    headers = {"Location": f"/containers/{summary['id']}"} if created else None
    return json_response(201 if created else 200, summary, headers)


async def logs(request: web.Request) -> web.StreamResponse:
    from services.manager.chas.logstream import logs as serve_logs
    return await serve_logs(request, query(request, ("tail", "follow", "container", "since", "timestamps")))


async def expect(request: web.Request) -> None:
    """``Expect: 100-continue``: the go-ahead only for a body this API would read (a deploy
    with the token and an acceptable size); otherwise the answer comes without it. Other
    expectations are ignored, as http.server did."""
    if request.headers.get("Expect", "").lower() != "100-continue" or request.version != (1, 1):
        return
    if request.method != "POST" or template_of(request) != "/containers/deploy":
        return
    size = request.content_length
    if size is None or size > MAX_BODY:
        return
    if not auth.bearer_ok(request.headers.get("Authorization"), request.app[API_KEY].token()):
        return
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# (template, {method: handler}), in the order they are matched; "*" answers every method.
ROUTES: tuple[tuple[str, Mapping[str, Handler]], ...] = (
    ("/openapi.json", {"GET": openapi}),
    ("/livez", {"GET": livez}),
    ("/readyz", {"GET": readyz}),
    ("/health", {"GET": health}),
    ("/containers", {"GET": list_containers}),
    ("/containers/deploy", {"*": deploy}),
    ("/containers/{container_id}", {"GET": inspect, "DELETE": delete}),
    ("/containers/{container_id}/logs", {"GET": logs}),
)
_PATTERNS = tuple((t, re.compile(re.sub(r"\{[^}]+\}", "[^/]+", t))) for t, _ in ROUTES)
DOCUMENTED_METHODS = {"/containers/deploy": ("POST",)}  # what "*" stands for in openapi.json


def allowed_methods(path: str) -> str:
    """The Allow header of a path ("" for no route)."""
    for (template, methods), (_, pattern) in zip(ROUTES, _PATTERNS, strict=True):
        if pattern.fullmatch(path):
            return ", ".join(sorted(DOCUMENTED_METHODS.get(template, methods)))
    return ""


def registered(app: web.Application) -> dict[str, set[str]]:
    """The app's routes: path template -> methods (as openapi.json must list them)."""
    out: dict[str, set[str]] = {}
    for resource in app.router.resources():
        methods = {route.method for route in resource}
        if "*" in methods:
            methods = set(DOCUMENTED_METHODS[resource.canonical])
        out[resource.canonical] = methods
    return out


def make_app(api: ChasApi, edge_: Edge) -> web.Application:
    install_log_ids()
    app = web.Application(middlewares=[edge], client_max_size=MAX_BODY, handler_args=None)
    app[API_KEY] = api
    app[EDGE_KEY] = edge_
    for template, methods in ROUTES:
        resource = app.router.add_resource(template)
        for method, fn in methods.items():
            resource.add_route(method, fn, expect_handler=expect)
    return app
