"""supervisord killed alone: its services go away, the next start takes over, workloads live on.

The first tests drive a real agent; the rest check the parts (common.parentwatch,
services.takeover) on real processes that only look like an agent's.

The agent's services and proxy workers all share the session `riklet run` leads (the Agent
starts it in a new session); the pods' shims and workloads each have a session of their own.
So "every process of the old agent's session is gone" is what a user would check with ps.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services import takeover
from tests.stack import BIN, ROOT, Agent, pid_alive, session_processes
from tests.support import wait_for

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


def run_pod(agent: Agent, name: str) -> tuple[int, int]:
    """A process pod; its workload's pid and its shim's."""
    agent.ctl("run", name, "--", "sleep", "3600")
    workload = int(agent.wait_phase(name, "Running")["containers"][0]["pid"])
    [status] = glob.glob(os.path.join(agent.state_dir, "pods", "*", "status.json"))
    with open(status, encoding="utf-8") as fh:
        shim = int(json.load(fh)["shim_pid"])
    assert pid_alive(shim) and shim not in session_processes(agent.supervisord_pid())
    return workload, shim


@pytest.mark.integration
def test_services_exit_with_their_supervisord_and_the_next_start_adopts_the_pods(agent: Agent) -> None:
    workload, shim = run_pod(agent, "survivor")
    sid, services = kill_supervisord(agent)
    try:
        # Memory and monitor stop at once, the manager within ~2 s, the proxy worker after
        # serving 3 s for a successor: ~3.5 s in all here; the deadline leaves room for a slow CI.
        wait_for(lambda: not session_processes(sid), 15,
                 what=f"the services of the killed supervisord to exit (left: {session_processes(sid)})")
        assert pid_alive(workload) and pid_alive(shim), "the pod must outlive the agent's services"
        agent.start()
        pod = agent.wait_phase("survivor", "Running")
        assert pod["containers"][0]["pid"] == workload
        stop_and_check_nothing_left(agent, workload)
    finally:
        _kill(services)


@pytest.mark.integration
def test_next_start_takes_over_orphans_that_stayed(agent: Agent) -> None:
    """Services that do not notice their supervisord's death (a riklet from before parent-death
    handling, or a service stuck at the time) are stopped by the next start, which then runs."""
    agent.stop()
    agent.env["RIKLET_PARENT_WATCH"] = "off"
    agent.start()
    workload, shim = run_pod(agent, "survivor")
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
        assert pid_alive(shim), "the takeover must leave the pods' shims alone"
        assert took < 20, f"the takeover took {took:.1f} s"
        pod = agent.wait_phase("survivor", "Running")
        assert pod["containers"][0]["pid"] == workload
        with open(os.path.join(agent.base, "supervisord.out"), encoding="utf-8") as fh:
            out = fh.read()
        assert "left by a previous run" in out, out
        stop_and_check_nothing_left(agent, workload)
    finally:
        _kill(services)


@pytest.mark.integration
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


# --- the parts -----------------------------------------------------------------------------------

PY = sys.executable
WATCHED = (f"import sys, time; sys.path.insert(0, {ROOT!r}); from common.parentwatch import watch_parent; "
           "watch_parent('child'); print('armed', flush=True); time.sleep(60)")


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without any watch settings of an agent the tests may run under."""
    drop = ("SUPERVISOR_ENABLED", "RIKLET_SUPERVISOR_PID", "RIKLET_PARENT_WATCH")
    return {k: v for k, v in os.environ.items() if k not in drop} | extra


def _parent_of_watched(env: dict[str, str]) -> tuple[subprocess.Popen[str], int]:
    """A parent process (what supervisord is to a service) and its child that called
    watch_parent; both only wait. Returns the parent and the child's pid once armed."""
    parent_code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', sys.argv[1]]); "
                   "print(p.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([PY, "-c", parent_code, WATCHED], env=env, stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    lines = {parent.stdout.readline().strip() for _ in range(2)}
    assert "armed" in lines, lines
    child = int((lines - {"armed"}).pop())
    return parent, child


def test_a_watched_service_gets_sigterm_when_its_supervisor_dies(tmp_path: Path) -> None:
    (tmp_path / "log").mkdir()
    parent, child = _parent_of_watched(_clean_env(SUPERVISOR_ENABLED="1", RIKLET_STATE_DIR=str(tmp_path),
                                                  SUPERVISOR_PROCESS_NAME="child"))
    try:
        parent.kill()
        parent.wait()
        wait_for(lambda: not pid_alive(child), 5, what="the child to exit with its parent")
        # Its last words reach the program's log file, not supervisord's dead pipe.
        assert "supervisord gone: stopping" in (tmp_path / "log" / "child.log").read_text()
    finally:
        _kill([child])


@pytest.mark.parametrize("extra", [{}, {"SUPERVISOR_ENABLED": "1", "RIKLET_PARENT_WATCH": "off"}])
def test_no_watch_outside_supervisord_or_when_switched_off(extra: dict[str, str]) -> None:
    parent, child = _parent_of_watched(_clean_env(**extra))
    try:
        parent.kill()
        parent.wait()
        # A parent-death signal is sent as the parent exits: a child still there well after
        # that got none.
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            assert pid_alive(child)
            time.sleep(0.05)
    finally:
        _kill([child])


def test_a_service_whose_supervisor_died_before_it_armed_exits_at_once() -> None:
    env = _clean_env(SUPERVISOR_ENABLED="1", RIKLET_SUPERVISOR_PID="1")
    res = subprocess.run([PY, "-c", WATCHED], env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0
    assert res.stdout == ""
    assert "supervisord (pid 1) is gone; not starting" in res.stderr


@pytest.mark.parametrize(("argv", "env", "role"), [
    (["/v/bin/python3", "/v/bin/riklet-memory"], {"SUPERVISOR_ENABLED": "1"}, "memory"),
    (["/v/bin/python3", "/v/bin/riklet-proxy"], {"SUPERVISOR_ENABLED": "1"}, "proxy"),
    (["python", "-m", "services.monitor"], {"SUPERVISOR_ENABLED": "1"}, "monitor"),
    (["python", "-m", "services.proxy", "--worker", "--keeper-pid", "7"], {"SUPERVISOR_ENABLED": "1"},
     "proxy-worker"),
    (["/v/bin/python3", "/v/bin/supervisord", "-n", "-c", "x.conf"], {}, "supervisord"),
    # Shims inherit the manager's environment: their command line sets them apart.
    (["/v/services/manager/process/riklet-shim", "/s/pods/p"], {"SUPERVISOR_ENABLED": "1"}, None),
    (["/v/bin/python3", "/v/bin/supervisorctl", "status"], {}, None),
    (["sleep", "3600"], {"SUPERVISOR_ENABLED": "1"}, None),
    # A service started by hand, not by an agent's supervisord.
    (["/v/bin/python3", "/v/bin/riklet-memory"], {}, None),
])
def test_role_of(argv: list[str], env: dict[str, str], role: str | None) -> None:
    assert takeover.role_of(argv, {"RIKLET_RUN_DIR": "/r/run", **env}, "/r/run") == role
    # Another agent's (another run dir), or nobody's: never ours.
    assert takeover.role_of(argv, {"RIKLET_RUN_DIR": "/r/other", **env}, "/r/run") is None
    assert takeover.role_of(argv, env, "/r/run") is None


def test_role_of_follows_symlinks(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "run")
    env = {"RIKLET_RUN_DIR": str(tmp_path / "link"), "SUPERVISOR_ENABLED": "1"}
    assert takeover.role_of(["py", "riklet-manager"], env, str(tmp_path / "run")) == "manager"


def _sleeper(ignore_term: bool = False) -> subprocess.Popen[bytes]:
    code = "import signal, time\n"
    if ignore_term:
        code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\n"
    code += "time.sleep(60)"
    proc = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE)
    if ignore_term:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    return proc


def test_stop_escalates_to_sigkill_after_the_grace() -> None:
    polite, stubborn = _sleeper(), _sleeper(ignore_term=True)
    try:
        procs = [takeover.Proc(p.pid, takeover.start_time(p.pid) or 0, "memory") for p in (polite, stubborn)]
        started = time.monotonic()
        assert takeover.stop(procs, grace=1.0) == [procs[1]]
        assert 1.0 <= time.monotonic() - started < 5
        assert polite.wait(timeout=5) == -signal.SIGTERM
        assert stubborn.wait(timeout=5) == -signal.SIGKILL
    finally:
        _kill([polite.pid, stubborn.pid])


def test_stop_never_signals_a_process_that_reused_the_pid() -> None:
    other = _sleeper()
    try:
        start = takeover.start_time(other.pid)
        assert start is not None
        assert takeover.stop([takeover.Proc(other.pid, start + 1, "memory")], grace=0.2) == []
        assert other.poll() is None
    finally:
        _kill([other.pid])


def test_lock_holders_names_the_pid(tmp_path: Path) -> None:
    locked, free = tmp_path / "memory.lock", tmp_path / "other.lock"
    free.touch()
    code = ("import fcntl, sys, time; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([PY, "-c", code, str(locked)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        assert takeover.lock_holders([str(locked), str(free), str(tmp_path / "none")]) == \
            {str(locked): holder.pid}
    finally:
        _kill([holder.pid])
