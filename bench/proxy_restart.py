"""Proxy restart benchmark: how long a host port is unserved when the proxy service alone is
restarted or killed.

Starts a private agent with one process pod serving HTTP behind a host port, then N times each:

- ``supervisorctl restart riklet:proxy``: the keeper tells its worker to stop; the worker serves
  on until the new keeper's worker has taken its listening sockets over;
- ``kill -9`` of the keeper (the pid supervisord has for program ``proxy``): its worker, orphaned,
  serves on; supervisord starts a new keeper about 1 s later, whose worker takes over;
- ``kill -9`` of the worker: its keeper starts another at once, which binds the ports anew
  (the sockets died with the worker) and gets its routes from memory.

A thread sends a request through the host port every 5 ms around each action; the outage runs
from the first unanswered request to the next answered one (0 when none failed). Prints median
and max, and the failed requests in all.

Before the keeper and the hand-off (one process, no socket passing) the same machine measured:
``supervisorctl restart`` 559 ms median, 567 ms max; ``kill -9`` 1.7 s median, 2.7 s max (a
respawn waited for supervisord's 1 s poll, then ~0.55 s for the new proxy to listen).

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


def outage(port: int, action: Callable[[], None], settle: Callable[[], object],
           timeout: float = 30.0, probe: Callable[[int], bool] = answered) -> tuple[float, int]:
    """Seconds the port went unanswered around ``action`` (from the first failed request to
    the next answered one) and the number of failed requests, probing every 5 ms from a thread
    started before the action and stopped once ``settle()`` returned after it. ``probe`` sends
    one request on a new connection (bench.proxy uses its own, for an nginx backend)."""
    failures: list[float] = []
    back: list[float] = []
    stop = threading.Event()

    def probing() -> None:
        while not stop.is_set():
            ok = probe(port)
            now = time.perf_counter()
            if not ok:
                failures.append(now)
            elif failures and not back:
                back.append(now)
            time.sleep(0.005)

    t = threading.Thread(target=probing, daemon=True)
    t.start()
    time.sleep(0.05)
    action()
    settle()
    wait_for(lambda: probe(port), timeout, "the port answering again")
    time.sleep(0.1)
    stop.set()
    t.join(timeout)
    if not failures:
        return 0.0, 0
    if not back:
        raise AssertionError("the port did not come back")
    return back[0] - failures[0], len(failures)


def current_worker(agent: Agent) -> int:
    keeper = agent.service_pid("proxy")
    [pid] = [p for p, parent in agent.proxy_workers().items() if parent == keeper]
    return pid


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--mode", choices=("userspace", "kernel"), default="userspace",
                        help="the proxy's data path (the hand-off of listening sockets is userspace's)")
    args = parser.parse_args()
    target, host = free_ports(2)
    agent = Agent(f"proxy:\n  mode: {args.mode}\n").start()
    try:
        agent.ctl("run", "web", "--port", f"{host}:{target}", "--",
                  sys.executable, "-m", "http.server", str(target), "--bind", "127.0.0.1")
        agent.wait_phase("web", "Running")
        wait_for(lambda: answered(host), 10, "the first answer through the proxy")
        results: dict[str, list[tuple[float, int]]] = {
            "supervisorctl restart": [], "kill -9 keeper": [], "kill -9 worker": []}

        def one_worker() -> int:
            """Wait until the old worker has drained and exited: one worker, the keeper's."""
            return wait_for(lambda: len(agent.proxy_workers()) == 1 and current_worker(agent),
                            40, "a single proxy worker")

        for _ in range(args.rounds):
            old = one_worker()
            results["supervisorctl restart"].append(outage(
                host, lambda: agent.supervisorctl("restart", "riklet:proxy"),
                lambda o=old: wait_for(lambda: current_worker(agent) != o, 20, "the new worker")))
            old, keeper = one_worker(), agent.service_pid("proxy")
            results["kill -9 keeper"].append(outage(
                host, lambda k=keeper: os.kill(k, signal.SIGKILL),
                lambda o=old: wait_for(lambda: current_worker(agent) != o, 20, "the new worker")))
            old = one_worker()
            results["kill -9 worker"].append(outage(
                host, lambda o=old: os.kill(o, signal.SIGKILL),
                lambda o=old: wait_for(lambda: current_worker(agent) != o, 20, "the new worker")))
        print(f"\nhost port unanswered around a proxy restart, {args.mode} mode, {args.rounds} rounds "
              f"({os.cpu_count()} cores)")
        print(f"{'':24} {'median ms':>10} {'max ms':>8} {'failed requests':>16}")
        for label, values in results.items():
            ms = [v[0] * 1000 for v in values]
            print(f"{label:24} {statistics.median(ms):10.0f} {max(ms):8.0f} "
                  f"{sum(v[1] for v in values):16d}")
    finally:
        agent.close()


if __name__ == "__main__":
    main()
