"""Proxy restart benchmark: how long a host port is unserved when the proxy service alone is
restarted (``supervisorctl restart``) or killed (``kill -9``, supervisord starts it again).

Starts a private agent with one process pod serving HTTP behind a host port, then N times each:
restart or kill the proxy while a thread sends a request through the host port every 5 ms, and
time the outage, from the first unanswered request to the next answered one (a new proxy has
listened and re-synced its routes from memory). Prints median and max.

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
import threading
import time
from collections.abc import Callable

from tests.stack import Agent
from tests.support import free_ports, wait_for


def answered(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return s.recv(12).startswith(b"HTTP/1.0 200")
    except OSError:
        return False


def outage(port: int, action: Callable[[], None], timeout: float = 30.0) -> float:
    """Seconds the port went unanswered around ``action``: from the first failed request to the
    next answered one, probing every 5 ms from a thread started before the action."""
    first_fail: list[float] = []
    back: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            ok = answered(port)
            now = time.perf_counter()
            if not ok and not first_fail:
                first_fail.append(now)
            elif ok and first_fail:
                back.append(now)
                return
            time.sleep(0.005)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    action()
    t.join(timeout)
    stop.set()
    if not first_fail:
        return 0.0
    if not back:
        raise AssertionError("the port did not come back")
    return back[0] - first_fail[0]


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
            results["supervisorctl restart"].append(
                outage(host, lambda: agent.supervisorctl("restart", "riklet:proxy")))
            wait_for(lambda: answered(host), 10, "serving again")
            pid = agent.service_pid("proxy")
            results["kill -9"].append(outage(host, lambda p=pid: os.kill(p, signal.SIGKILL)))
            wait_for(lambda: answered(host), 10, "serving again")
        print(f"\nhost port unanswered around a proxy restart, {args.rounds} rounds ({os.cpu_count()} cores)")
        print(f"{'':24} {'median ms':>10} {'max ms':>8}")
        for label, values in results.items():
            print(f"{label:24} {statistics.median(values) * 1000:10.0f} {max(values) * 1000:8.0f}")
    finally:
        agent.close()


if __name__ == "__main__":
    main()
