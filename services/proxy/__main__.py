"""riklet-proxy: forwards the node's host ports to pod endpoints, following memory's pods.

The data path runs on a uvloop event loop in the main thread; the pod feed (blocking ZeroMQ)
runs on a thread of its own and hands each new route table to the loop, where only the newest
one waiting is applied.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from typing import Any

import uvloop
import zmq

from common import config
from common import log as common_log
from common.errors import RikletError
from common.stats_server import StatsServer
from services.proxy.balance import balances
from services.proxy.feed import SNAPSHOT_TIMEOUT, watch_pods
from services.proxy.routes import balance_from_pods, routes_from_pods
from services.proxy.server import ProxyServer, ProxySettings

log = logging.getLogger("services.proxy")


def settings_from(cfg: config.Config) -> ProxySettings:
    return ProxySettings(bind_host=cfg.proxy_bind_address, connect_timeout=cfg.proxy_connect_timeout,
                         udp_max_flows=cfg.proxy_udp_max_flows,
                         udp_idle_timeout=cfg.proxy_udp_idle_timeout,
                         max_connections=cfg.proxy_max_connections,
                         idle_timeout=cfg.proxy_idle_timeout)


async def serve(cfg: config.Config, settings: ProxySettings) -> int:
    """Run until SIGTERM or SIGINT (exit 0) or until the pod feed dies (exit 1)."""
    loop = asyncio.get_running_loop()
    server = ProxyServer(settings)
    done = asyncio.Event()
    stop = threading.Event()
    failed = False

    def on_pods(pods: list[dict[str, Any]]) -> None:
        # Routes are computed here, on the feed thread, to keep the data path's loop free.
        loop.call_soon_threadsafe(server.update, routes_from_pods(pods),
                                  balances(balance_from_pods(pods)))

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
    stats = start_stats(cfg, server)
    feed = threading.Thread(target=run_feed, name="pod-feed", daemon=True)
    feed.start()
    log.info("proxy started", extra={"pid": os.getpid(), "bind": settings.bind_host})
    await done.wait()
    stop.set()
    # Join before closing the loop: the feed may still call on_pods until it sees ``stop``.
    await loop.run_in_executor(None, feed.join, SNAPSHOT_TIMEOUT + 1.0)
    await server.close()
    if stats is not None:
        stats.stop()
    log.info("proxy stopped")
    return 1 if failed else 0


def start_stats(cfg: config.Config, server: ProxyServer) -> StatsServer | None:
    """The ``stats`` endpoint for the monitor. Forwarding matters more than being measured:
    if it cannot bind (a live twin, an unwritable run dir), log and forward without it."""
    stats = StatsServer(cfg.proxy_endpoint, server.stats.as_dict)
    try:
        stats.start()
    except (RikletError, OSError, zmq.ZMQError) as exc:
        log.error("no stats endpoint", extra={"endpoint": cfg.proxy_endpoint, "error": str(exc)})
        return None
    return stats


def main(argv: list[str] | None = None) -> int:
    cfg, _ = config.parse_args("riklet-proxy", argv)
    common_log.setup("proxy", cfg.logging_level, cfg.logging_file)
    return uvloop.run(serve(cfg, settings_from(cfg)))


if __name__ == "__main__":
    raise SystemExit(main())
