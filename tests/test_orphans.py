"""supervisord killed alone: its services go away, the next start takes over, workloads live on.

The agent's services and proxy workers all share the session `riklet run` leads (the Agent
starts it in a new session); the pods' shims and workloads each have a session of their own.
So "every process of the old agent's session is gone" is what a user would check with ps.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

import pytest

from tests.stack import BIN, Agent, pid_alive, session_processes
from tests.support import wait_for

pytestmark = pytest.mark.integration

SERVICES = ("memory", "manager", "monitor", "proxy")


def kill_supervisord(agent: Agent) -> tuple[int, list[int]]:
    """kill -9 of supervisord alone; its pid and the pids of its services and proxy workers."""
    sid = agent.supervisord_pid()
    services = [p for p in session_processes(sid) if p != sid]
    assert len(services) >= len(SERVICES) + 1, f"services and proxy worker expected, got {services}"
    os.kill(sid, signal.SIGKILL)
    assert agent.proc is not None and agent.proc.pid == sid
    agent.proc.wait(timeout=10)
    return sid, services


def stop_and_check_nothing_left(agent: Agent, workload: int) -> None:
    sid = agent.supervisord_pid()
    agent.stop()
    wait_for(lambda: not session_processes(sid), 10,
             what="no process of the stopped agent left (services, proxy workers)")
    assert pid_alive(workload), "stopping the agent must not stop its workloads"


def run_pod(agent: Agent, name: str) -> int:
    agent.ctl("run", name, "--", "sleep", "3600")
    return int(agent.wait_phase(name, "Running")["containers"][0]["pid"])


def test_services_exit_with_their_supervisord_and_the_next_start_adopts_the_pods(agent: Agent) -> None:
    workload = run_pod(agent, "survivor")
    sid, services = kill_supervisord(agent)
    try:
        # Memory and monitor stop at once; the manager in ~2 s; the proxy worker serves 3 s for a
        # successor first.
        wait_for(lambda: not session_processes(sid), 10,
                 what=f"the services of the killed supervisord to exit (left: {session_processes(sid)})")
        assert pid_alive(workload), "the workload must outlive the agent's services"
        agent.start()
        pod = agent.wait_phase("survivor", "Running")
        assert pod["containers"][0]["pid"] == workload
        stop_and_check_nothing_left(agent, workload)
    finally:
        _kill(services)


def test_next_start_takes_over_orphans_that_stayed(agent: Agent) -> None:
    """Services that do not notice their supervisord's death (a riklet from before parent-death
    handling, or a service stuck at the time) are stopped by the next start, which then runs."""
    agent.stop()
    agent.env["RIKLET_PARENT_WATCH"] = "off"
    agent.start()
    workload = run_pod(agent, "survivor")
    sid, services = kill_supervisord(agent)
    try:
        # Give a service that would exit on its own the time to do so: none may.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            assert all(pid_alive(p) for p in services), "orphans expected with the watch off"
            time.sleep(0.1)
        del agent.env["RIKLET_PARENT_WATCH"]
        started = time.monotonic()
        agent.start()
        took = time.monotonic() - started
        assert not session_processes(sid), "the previous agent's services must be gone"
        assert took < 20, f"the takeover took {took:.1f} s"
        pod = agent.wait_phase("survivor", "Running")
        assert pod["containers"][0]["pid"] == workload
        with open(os.path.join(agent.base, "supervisord.out"), encoding="utf-8") as fh:
            out = fh.read()
        assert "left by a previous run" in out, out
        stop_and_check_nothing_left(agent, workload)
    finally:
        _kill(services)


def test_second_start_on_a_live_agent_is_refused(agent: Agent) -> None:
    sid = agent.supervisord_pid()
    before = session_processes(sid)
    res = subprocess.run([os.path.join(BIN, "riklet"), "run"], env=agent.env, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 1, res
    assert f"already running from {agent.run_dir}" in res.stderr
    assert f"supervisord pid {sid}" in res.stderr
    assert session_processes(sid) == before, "the live agent must be left alone"
    assert set(agent.statuses().values()) == {"RUNNING"}


def _kill(pids: list[int]) -> None:
    """A failed test must not leave the old services behind."""
    for pid in pids:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
