"""Proxy restart benchmark: how long a host port is unserved when the proxy service alone is
restarted (``supervisorctl restart``) or killed (``kill -9``, supervisord starts it again).

Starts a private agent with one process pod serving HTTP behind a host port, then N times each:
restart or kill the proxy, and time until a request through the host port is answered again
(a new proxy has listened and re-synced its routes from memory). Prints median and max.

    make bench-proxy-restart
    .venv/bin/python -m bench.proxy_restart --rounds 5
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import sys
import time

from tests.stack import Agent
from tests.support import free_ports, wait_for


def answered(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return s.recv(12).startswith(b"HTTP/1.0 200")
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    target, host = free_ports(2)
    agent = Agent().start()
    try:
        agent.ctl("run", "web", "--port", f"{host}:{target}", "--",
                  sys.executable, "-m", "http.server", str(target), "--bind", "127.0.0.1")
        agent.wait_phase("web", "Running")
        wait_for(lambda: answered(host), 10, "the first answer through the proxy")
        results: dict[str, list[float]] = {"supervisorctl restart": [], "kill -9": []}
        for _ in range(args.rounds):
            old = agent.service_pid("proxy")
            t0 = time.perf_counter()
            agent.supervisorctl("restart", "riklet:proxy")
            wait_for(lambda: answered(host), 30, "an answer after restart", interval=0.005)
            results["supervisorctl restart"].append(time.perf_counter() - t0)
            assert agent.service_pid("proxy") != old

            old = agent.service_pid("proxy")
            t0 = time.perf_counter()
            os.kill(old, signal.SIGKILL)
            wait_for(lambda o=old: not answered(host) or agent.service_pid("proxy") != o, 10, "old proxy gone",
                     interval=0.005)
            wait_for(lambda: answered(host), 30, "an answer after kill -9", interval=0.005)
            results["kill -9"].append(time.perf_counter() - t0)
        print(f"\nhost port unserved after a proxy restart, {args.rounds} rounds ({os.cpu_count()} cores)")
        print(f"{'':24} {'median ms':>10} {'max ms':>8}")
        for label, values in results.items():
            print(f"{label:24} {statistics.median(values) * 1000:10.0f} {max(values) * 1000:8.0f}")
    finally:
        agent.close()


if __name__ == "__main__":
    main()
