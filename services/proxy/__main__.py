"""riklet-proxy: forwards the node's host ports to pod endpoints, following memory's pods.

The data path runs on a uvloop event loop in the main thread; the pod feed (blocking ZeroMQ)
runs on a thread of its own and hands each new route table to the loop, where only the newest
one waiting is applied.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import threading
from typing import Any

import uvloop

from common import config
from common import log as common_log
from services.proxy.feed import SNAPSHOT_TIMEOUT, watch_pods
from services.proxy.routes import routes_from_pods
from services.proxy.server import ProxyServer, ProxySettings
from services.proxy.tcp import CONNECT_TIMEOUT
from services.proxy.udp import IDLE_TIMEOUT, MAX_FLOWS

log = logging.getLogger("services.proxy")


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value
    return parse


def _ip(text: str) -> str:
    # An IP literal only: listeners are opened on the data path's loop, which must not resolve.
    try:
        return str(ipaddress.ip_address(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an IP address, got {text!r}") from exc


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bind-address", type=_ip,
                        default=os.environ.get("RIKLET_PROXY_BIND_ADDRESS", "0.0.0.0"),
                        help="address the host ports listen on (env RIKLET_PROXY_BIND_ADDRESS)")
    parser.add_argument("--connect-timeout", type=_positive(float), default=CONNECT_TIMEOUT,
                        help="seconds to wait for an endpoint before trying the next one")
    parser.add_argument("--udp-max-flows", type=_positive(int), default=MAX_FLOWS,
                        help="UDP flows kept per route; the least recently used is evicted")
    parser.add_argument("--udp-idle-timeout", type=_positive(float), default=IDLE_TIMEOUT,
                        help="seconds after which an idle UDP flow is closed")


def settings_from(ns: argparse.Namespace) -> ProxySettings:
    return ProxySettings(bind_host=ns.bind_address, connect_timeout=ns.connect_timeout,
                         udp_max_flows=ns.udp_max_flows, udp_idle_timeout=ns.udp_idle_timeout)


async def serve(cfg: config.Config, settings: ProxySettings) -> int:
    """Run until SIGTERM or SIGINT (exit 0) or until the pod feed dies (exit 1)."""
    loop = asyncio.get_running_loop()
    server = ProxyServer(settings)
    done = asyncio.Event()
    stop = threading.Event()
    failed = False

    def on_pods(pods: list[dict[str, Any]]) -> None:
        # Routes are computed here, on the feed thread, to keep the data path's loop free.
        loop.call_soon_threadsafe(server.update, routes_from_pods(pods))

    def run_feed() -> None:
        nonlocal failed
        try:
            watch_pods(cfg, on_pods, stop)
        except Exception:  # a feed bug would freeze the routes silently: exit, be restarted
            log.exception("pod feed failed")
            failed = True
            loop.call_soon_threadsafe(done.set)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    feed = threading.Thread(target=run_feed, name="pod-feed", daemon=True)
    feed.start()
    log.info("proxy started", extra={"pid": os.getpid(), "bind": settings.bind_host})
    await done.wait()
    stop.set()
    # Join before closing the loop: the feed may still call on_pods until it sees ``stop``.
    await loop.run_in_executor(None, feed.join, SNAPSHOT_TIMEOUT + 1.0)
    await server.close()
    log.info("proxy stopped")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    cfg, ns = config.parse_args("riklet-proxy", argv, extra=_flags)
    common_log.setup("proxy", cfg.logging_level)
    return uvloop.run(serve(cfg, settings_from(ns)))


if __name__ == "__main__":
    raise SystemExit(main())
