"""The monitor's HTTP server: ``GET /metrics`` (the scrape, in the format the scraper's
``Accept`` asks for) and ``GET /healthz``. A thin stdlib ``ThreadingHTTPServer`` in a daemon
thread; the body comes from a ``collect(accept) -> (body, content type)`` callable."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

Collect = Callable[[str], tuple[bytes, str]]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    collect: Collect


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # a client that opens a connection and says nothing does not keep a thread
    server_version = "riklet-monitor"

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, send_body: bool) -> None:
        path = urlsplit(self.path).path
        if path == "/metrics":
            try:
                body, ctype = self.server.collect(self.headers.get("Accept") or "")
            except Exception:  # the HTTP boundary: a bug in collection is a 500, not a dead thread
                log.exception("metrics collection failed")
                self.send_error(500, "metrics collection failed")
                return
            self._send(200, ctype, body, send_body)
        elif path == "/healthz":
            self._send(200, "text/plain; charset=utf-8", b"ok\n", send_body)
        else:
            self.send_error(404, "not found")

    def _send(self, code: int, ctype: str, body: bytes, send_body: bool) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("http " + format, *args)


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` into (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class MetricsServer:
    """Serves ``collect()`` on ``/metrics`` at ``address`` from a daemon thread."""

    def __init__(self, address: str, collect: Collect) -> None:
        host, port = split_address(address)
        cls = _Server6 if ":" in host else _Server
        self._httpd = cls((host, port), _Handler)
        self._httpd.collect = collect
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.5}, name="metrics-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for serve_forever, which may never have run
            self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
