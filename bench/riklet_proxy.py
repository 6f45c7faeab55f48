"""riklet's proxy with fixed routes, for the proxy benchmark.

The real data-path classes (``ProxyServer`` and its listeners) on uvloop, with the service's
default settings (connection limit, idle timeout), minus the pod feed: the routes are given on
the command line, so what the benchmark measures is the forwarding and nothing else.

    python -m bench.riklet_proxy --tcp 8080=127.0.0.1:18080 --udp 8081=127.0.0.1:18081
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal

import uvloop

from common import config
from services.proxy.routes import Endpoint, Routes
from services.proxy.server import ProxyServer
from services.proxy.worker import settings_from


def _route(proto: str, spec: str) -> tuple[tuple[str, int], tuple[Endpoint, ...]]:
    port, _, targets = spec.partition("=")
    eps = []
    for target in targets.split(","):
        host, _, tport = target.rpartition(":")
        eps.append(Endpoint(host, int(tport)))
    return (proto, int(port)), tuple(eps)


async def serve(routes: Routes, host: str) -> None:
    defaults = settings_from(config.load(None, environ={}))
    server = ProxyServer(dataclasses.replace(defaults, bind_host=host))
    await server.apply(routes)
    if server.failed():
        raise SystemExit(f"cannot listen on {sorted(server.failed())}")
    print("ready", flush=True)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    await server.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tcp", action="append", default=[], help="PORT=HOST:PORT[,HOST:PORT]")
    parser.add_argument("--udp", action="append", default=[], help="PORT=HOST:PORT[,HOST:PORT]")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    routes: Routes = dict([_route("TCP", s) for s in args.tcp] + [_route("UDP", s) for s in args.udp])
    uvloop.run(serve(routes, args.host))


if __name__ == "__main__":
    main()
