"""The Node API's budget for streaming calls, so that open streams never take the workers
unary calls need.

The gRPC server is synchronous: every call holds a worker thread until it ends, and a stream
(Watch, Logs -f, PullImage, ImportImage, reflection) may last for hours.
The pool is sized ``unary workers + max streams`` and this interceptor refuses a stream beyond
``max_streams`` open at once, or beyond ``max_per_client`` from one client (the peer's host:
every client on the node is the same one), with RESOURCE_EXHAUSTED naming the limit. So at
least ``unary workers`` threads are always left for unary calls, whatever streams are open.

grpc's own ``maximum_concurrent_rpcs`` is not used: it counts unary calls too and refuses them
all once streams fill it, which is the starvation this module exists to prevent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

UNARY_WORKERS = 32        # threads kept for unary calls, whatever streams are open


def client_of(peer: str) -> str:
    """A client's identity from ``context.peer()``: its host without the port
    (``ipv4:127.0.0.1:5123`` -> ``ipv4:127.0.0.1``, ``ipv6:[::1]:5123`` -> ``ipv6:[::1]``);
    a unix socket peer is one client."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return f"{kind}:{rest.rsplit(':', 1)[0]}"
    return peer


class StreamLimits:
    """Counts of open streams, in total and per client."""

    def __init__(self, max_streams: int, max_per_client: int) -> None:
        self.max_streams = max_streams
        self.max_per_client = max_per_client
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}
        self._total = 0

    @property
    def workers(self) -> int:
        """Threads the server's pool needs: every stream may hold one, unary calls keep theirs."""
        return UNARY_WORKERS + self.max_streams

    def open_streams(self) -> int:
        with self._lock:
            return self._total

    def acquire(self, client: str) -> str | None:
        """Count a new stream of ``client``; the refusal's message when a limit is reached."""
        with self._lock:
            if self._open.get(client, 0) >= self.max_per_client:
                return f"too many open streams from this client: limit {self.max_per_client} " \
                       "(api.max_streams_per_client); close some (rikletctl watch, logs -f)"
            if self._total >= self.max_streams:
                return f"too many open streams on this node: limit {self.max_streams} (api.max_streams)"
            self._open[client] = self._open.get(client, 0) + 1
            self._total += 1
            return None

    def release(self, client: str) -> None:
        with self._lock:
            left = self._open.get(client, 0) - 1
            if left > 0:
                self._open[client] = left
            else:
                self._open.pop(client, None)
            self._total -= 1

    def _enter(self, context: grpc.ServicerContext) -> str:
        client = client_of(context.peer())
        refusal = self.acquire(client)
        if refusal is not None:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
        return client

    def _response_stream(self, behavior: Callable[[Any, Any], Iterator[Any]]
                         ) -> Callable[[Any, Any], Iterator[Any]]:
        def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            # A generator: the slot is taken when gRPC starts the stream and given back when it
            # ends, however it ends (finished, failed, or closed after the client went away).
            client = self._enter(context)
            try:
                yield from behavior(request, context)
            finally:
                self.release(client)
        return run

    def _request_stream(self, behavior: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        def run(requests: Any, context: grpc.ServicerContext) -> Any:
            client = self._enter(context)
            try:
                return behavior(requests, context)
            finally:
                self.release(client)
        return run

    def interceptor(self) -> grpc.ServerInterceptor:
        """A server interceptor applying these limits to every streaming method of every
        service; unary methods pass untouched."""
        limits = self

        class _Interceptor(grpc.ServerInterceptor):
            def intercept_service(self, continuation: Any, details: Any) -> Any:
                handler = continuation(details)
                if handler is None or not (handler.request_streaming or handler.response_streaming):
                    return handler
                behavior = handler.stream_stream or handler.unary_stream or handler.stream_unary
                if getattr(behavior, "experimental_non_blocking", False):
                    return handler  # answers through callbacks: holds no worker (grpc.health's Watch)
                if handler.stream_stream is not None:
                    return handler._replace(stream_stream=limits._response_stream(handler.stream_stream))
                if handler.unary_stream is not None:
                    return handler._replace(unary_stream=limits._response_stream(handler.unary_stream))
                return handler._replace(stream_unary=limits._request_stream(handler.stream_unary))

        return _Interceptor()
