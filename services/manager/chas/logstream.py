"""``GET /containers/{id}/logs``: the tail of a container's log, or (``follow``) a chunked
stream of it that ends when the container is deleted or the client goes. rotlog's follower is
a blocking iterator: it runs on a thread of its own per stream and hands its chunks to the
event loop through a small queue (a slow client slows the reader, it does not fill memory)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from aiohttp import web

from common import rotlog
from common.errors import InvalidArgument
from common.model import dns_label
from common.since import parse_since
from services.manager.chas.web import API_KEY, DIGITS, core, current, decorate

FOLLOW_POLL = 0.25                 # seconds between the checks that end a log stream
QUEUE = 16                         # chunks in flight between the reader thread and the client


async def logs(request: web.Request, params: Mapping[str, str]) -> web.StreamResponse:
    api = request.app[API_KEY]
    tail: int | None = None
    if "tail" in params:
        if not DIGITS.fullmatch(params["tail"]):
            raise InvalidArgument("expected a non-negative integer (lines)", "query.tail")
        tail = int(params["tail"])
    follow = _flag(params, "follow")
    stamps = _flag(params, "timestamps")
    since: int | None = None
    if "since" in params:
        if len(params["since"]) > 64:
            raise InvalidArgument("longer than 64 characters", "query.since")
        since = parse_since(params["since"], "query.since")
        since = since if since > 0 else None   # from the epoch or before: every line, as docker
    container = params.get("container", "")
    if container:
        if len(container) > 63:
            raise InvalidArgument("expected a container name (a DNS label)", "query.container")
        dns_label(container, "query.container")
    record = await core(request, api.find, request.match_info["container_id"])
    try:
        path = await core(request, api.service.log_file, record["name"], container)
    except InvalidArgument as exc:
        if exc.field == "container":
            exc.field = "query.container"
        raise
    if not follow:
        data = await core(request, rotlog.tail, path, tail, since, stamps)
        return web.Response(status=200, body=data, content_type="text/plain", charset="utf-8")
    return await _stream(request, path, (tail, since, stamps), record)


def _flag(params: Mapping[str, str], name: str) -> bool:
    value = params.get(name, "false").lower()
    if value not in ("true", "false", "1", "0", "yes", "no", ""):
        raise InvalidArgument("expected true or false", f"query.{name}")
    return value in ("true", "1", "yes")


async def _stream(request: web.Request, path: str, how: tuple[int | None, int | None, bool],
                  record: Mapping[str, Any]) -> web.StreamResponse:
    api = request.app[API_KEY]
    loop = asyncio.get_running_loop()
    stop = threading.Event()
    tail, since, stamps = how
    # follow() before tail(): nothing written in between is lost
    new = rotlog.follow(path, stop, since=since, timestamps=stamps)
    data = await core(request, rotlog.tail, path, tail, since, stamps)
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE)
    with api._streams_lock:
        api._streams.add(stop)
    reader = threading.Thread(target=_read, args=(loop, queue, stop, _chunks(data), new),
                              name="chas-follow", daemon=True)
    reader.start()
    watcher = asyncio.ensure_future(_watch(request, stop, str(record["name"]), str(record.get("uid"))))
    resp = web.StreamResponse(status=200)
    resp.content_type = "text/plain"
    resp.charset = "utf-8"
    resp.enable_chunked_encoding()
    resp.force_close()
    decorate(request, resp)
    try:
        await resp.prepare(request)
        state = current.get()
        state.latency = time.perf_counter() - state.t0
        while (chunk := await queue.get()) is not None:
            await resp.write(chunk)
        await resp.write_eof()
    except (ConnectionError, OSError):
        pass  # the client went away
    finally:
        stop.set()
        watcher.cancel()
        with api._streams_lock:
            api._streams.discard(stop)
        while not queue.empty():   # let a reader blocked on a full queue see stop
            queue.get_nowait()
    return resp


def _read(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[bytes | None], stop: threading.Event,
          first: Iterator[bytes], new: Iterator[bytes]) -> None:
    def put(item: bytes | None) -> bool:
        """Hand ``item`` over (waiting while a slow client keeps the queue full); False once the
        stream is over (stop set: only the end marker still goes) or the loop is gone."""
        if stop.is_set() and item is not None:
            return False
        try:
            future = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
        except RuntimeError:   # the loop is closed
            return False
        while True:
            try:
                future.result(FOLLOW_POLL)
                return True
            except TimeoutError:
                if (stop.is_set() and item is not None) or loop.is_closed():
                    future.cancel()
                    return False
            except Exception:   # cancelled with the loop
                return False
    try:
        for chunk in first:
            if not put(chunk):
                return
        for chunk in new:
            if not put(chunk):
                return
    finally:
        put(None)
        close = getattr(new, "close", None)
        if close is not None:
            close()


async def _watch(request: web.Request, stop: threading.Event, name: str, uid: str) -> None:
    """End the stream when the client closes or the pod is gone; a final short wait lets its
    last output through."""
    api = request.app[API_KEY]
    while not stop.is_set():
        await asyncio.sleep(FOLLOW_POLL)
        transport = request.transport
        if transport is None or transport.is_closing():
            break
        with contextlib.suppress(Exception):
            if not await core(request, api.pod_alive, name, uid):
                await asyncio.sleep(2 * FOLLOW_POLL)
                break
    stop.set()


def _chunks(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]
