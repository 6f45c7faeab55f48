"""The agent under fault: start and restart on the same directories, supervisord's view of its
services, and cleanup of every process the suite saw, by pid."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import xmlrpc.client
from collections.abc import Iterable
from typing import Any

from supervisor.xmlrpc import SupervisorTransport

from tests.stack import BIN, Agent, pid_alive

SERVICES = ("memory", "manager", "monitor", "proxy")


class ChaosAgent(Agent):
    """tests.stack.Agent, plus a restart that reports instead of tearing down: after a fault
    the workloads must survive a failed recovery too, so nothing is killed until cleanup."""

    def __init__(self) -> None:
        super().__init__()
        self.seen_pids: set[int] = set()  # agent processes met during the run, killed at cleanup

    def launch(self) -> None:
        """``riklet run`` on this agent's directories, as an operator or systemd would."""
        out = open(os.path.join(self.base, "supervisord.out"), "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([os.path.join(BIN, "riklet"), "run"], env=self.env,
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def restart(self, timeout: float = 30.0) -> str | None:
        """Launch again and wait until the API answers and all four services run; None when
        it did, else what was seen at the deadline."""
        self.launch()
        try:
            self.wait_ready(timeout)
        except AssertionError:
            return f"not ready {timeout:.0f}s after restart: {_short(self.statuses())}"
        return None

    def remember_services(self) -> list[int]:
        """supervisord's and the services' pids now (recorded for cleanup)."""
        pids = [self.supervisord_pid()]
        for name in SERVICES:
            with contextlib.suppress(ValueError):
                pids.append(self.service_pid(name))
        pids.extend(self.proxy_workers())
        self.seen_pids.update(p for p in pids if p > 0)
        return pids

    def teardown(self, workload_pids: Iterable[int]) -> None:
        """Delete every pod, stop supervisord, then kill by pid what is left: shims and workloads
        the pod directories name, the workloads found by marker, and agent processes seen."""
        self.workload_pids.update(workload_pids)
        with contextlib.suppress(Exception):
            self.remember_services()
        self.close()
        kill_pids(self.seen_pids)


def kill_pids(pids: Iterable[int]) -> None:
    for pid in pids:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _short(statuses: dict[str, str]) -> str:
    bad = {k: v for k, v in statuses.items() if v != "RUNNING"}
    return ", ".join(f"{k} {v}" for k, v in sorted(bad.items())) or "API not answering"


class RestartWatch:
    """Counts service (re)starts as supervisord reports them: a program's new (pid, start time)
    after the first one seen is a restart. Polls supervisord's XML-RPC socket every 0.1 s in a
    thread; survives supervisord itself going away and coming back on the same socket."""

    def __init__(self, agent: ChaosAgent) -> None:
        self._url = f"unix://{agent.run_dir}/supervisor.sock"
        self._agent = agent
        self._seen: dict[str, set[tuple[int, int]]] = {name: set() for name in SERVICES}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="restart-watch", daemon=True)

    def __enter__(self) -> RestartWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def counts(self) -> dict[str, int]:
        return {name: max(0, len(self._seen[name]) - 1) for name in SERVICES}

    def _run(self) -> None:
        while not self._stop.is_set():
            proxy = xmlrpc.client.ServerProxy("http://127.0.0.1",
                                              transport=SupervisorTransport(None, None, self._url))
            with contextlib.suppress(Exception):  # supervisord may be dead or restarting
                infos: list[dict[str, Any]] = proxy.supervisor.getAllProcessInfo()  # type: ignore[assignment]
                for info in infos:
                    name, pid = str(info["name"]), int(info["pid"])
                    if name in self._seen and pid > 0:
                        self._seen[name].add((pid, int(info["start"])))
                        self._agent.seen_pids.add(pid)
            self._stop.wait(0.1)


def wait_dead(pids: Iterable[int], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    pending = list(pids)
    while time.monotonic() < deadline:
        pending = [p for p in pending if pid_alive(p)]
        if not pending:
            return True
        time.sleep(0.02)
    return False
