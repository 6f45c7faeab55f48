"""riklet under systemd: the unit passes `systemd-analyze verify`, is more hardened than
containerd's, and the agent speaks the notify protocol (READY=1, STATUS=, the watchdog) to a
socket that plays systemd's."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from common import sdnotify
from common.zmqutil import RequestClient
from services.monitor import notify
from services.monitor.notify import Health, PodCounts, serve, status_line
from tests.stack import BIN, ROOT, Agent
from tests.support import need, wait_for

UNIT = os.path.join(ROOT, "deploy", "riklet.service")
CONTAINERD_UNIT = "/lib/systemd/system/containerd.service"
INSTALLED_RIKLET = "/opt/riklet/venv/bin/riklet"
FOUR = ("memory", "manager", "monitor", "proxy")
STATUS_UP = re.compile(r"^4/4 services up, \d+ pods \(\d+ ready\), proxy (kernel|userspace)$")


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    need(shutil.which("systemd-analyze") is not None, "systemd-analyze (Debian package systemd)")
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=120)


def test_unit_verifies(tmp_path: str) -> None:
    with open(UNIT, encoding="utf-8") as fh:
        text = fh.read()
    assert re.search(rf"^ExecStart={re.escape(INSTALLED_RIKLET)} run$", text, re.M)
    # verify checks that ExecStart exists: a copy whose binary is this checkout's.
    copy = os.path.join(tmp_path, "riklet.service")
    with open(copy, "w", encoding="utf-8") as fh:
        fh.write(text.replace(INSTALLED_RIKLET, os.path.join(BIN, "riklet")))
    res = analyze("verify", "--man=no", copy)
    ours = [line for line in (res.stdout + res.stderr).splitlines() if "riklet" in line]
    assert res.returncode == 0 and not ours, res.stdout + res.stderr


def exposure(unit: str) -> float:
    res = analyze("security", "--offline=true", "--no-pager", unit)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", res.stdout + res.stderr)
    assert found, res.stdout + res.stderr
    return float(found.group(1))


def test_unit_is_more_hardened_than_containerds() -> None:
    need(os.path.exists(CONTAINERD_UNIT), f"{CONTAINERD_UNIT} (Debian package containerd)")
    ours, theirs = exposure(UNIT), exposure(CONTAINERD_UNIT)
    assert ours < theirs, (ours, theirs)


# -- the protocol ---------------------------------------------------------------------------------


def test_watchdog_interval() -> None:
    env = {"WATCHDOG_USEC": "3000000"}
    assert sdnotify.watchdog_interval(env) == 1.5
    assert sdnotify.watchdog_interval({**env, "WATCHDOG_PID": str(os.getpid())}) == 1.5
    assert sdnotify.watchdog_interval({**env, "WATCHDOG_PID": "1"}, [1]) == 1.5   # our supervisord's
    assert sdnotify.watchdog_interval({**env, "WATCHDOG_PID": "1"}) is None     # someone else's
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert sdnotify.watchdog_interval({}) is None


def test_without_notify_socket_nothing_is_sent_nor_kept() -> None:
    notifier = sdnotify.Notifier({})
    assert not notifier.enabled and notifier.notify(READY=1) is False
    # Outside systemd supervisord.conf hands the monitor the variables empty: it takes them out
    # of its environment and starts no notifier.
    env = {"NOTIFY_SOCKET": "", "WATCHDOG_USEC": "", "WATCHDOG_PID": "", "PATH": "/bin"}
    given = notify.take_environment(env)
    assert given == {} and env == {"PATH": "/bin"}
    assert notify.start(None, None, None, given) is None  # type: ignore[arg-type]
    # Under systemd it keeps them for itself alone: nothing it starts inherits them.
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "", "HOME": "/root"}
    assert notify.take_environment(env) == {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "60000000"}
    assert env == {"HOME": "/root"}


class Listener:
    """Plays systemd's end of NOTIFY_SOCKET: an abstract datagram socket."""

    def __init__(self) -> None:
        self.name = f"@riklet-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.seen: list[dict[str, str]] = []

    def next(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return None
        msg = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.seen.append(msg)
        return msg

    def until(self, match: Callable[[dict[str, str]], bool], timeout: float, what: str,
              on_each: Callable[[dict[str, str]], None] | None = None) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self.next(left)
            if msg is None:
                break
            if on_each is not None:
                on_each(msg)
            if match(msg):
                return msg
        raise AssertionError(f"no {what} within {timeout}s; got {self.seen[-10:]}")

    def close(self) -> None:
        self.sock.close()


def test_notifier_sends_ready_only_when_all_four_answer() -> None:
    listener = Listener()
    rounds = iter([Health(frozenset({"memory"})), Health(frozenset(FOUR), PodCounts(2, 1), "userspace")])
    stop = threading.Event()

    class Prober:
        def round(self) -> Health:
            try:
                return next(rounds)
            except StopIteration:
                stop.set()
                return Health(frozenset(FOUR), PodCounts(2, 1), "userspace")

    notifier = sdnotify.Notifier({"NOTIFY_SOCKET": listener.name})
    try:
        serve(notifier, Prober(), 0.01, stop)  # type: ignore[arg-type]
        first = listener.next(1)
        assert first == {"STATUS": "starting: 1/4 services up (manager, monitor, proxy not answering)"}
        assert listener.next(1) == {"READY": "1", "WATCHDOG": "1",
                                    "STATUS": "4/4 services up, 2 pods (1 ready), proxy userspace"}
    finally:
        notifier.close()
        listener.close()
    assert status_line(Health(frozenset(FOUR) - {"monitor"}), True, True) == (
        "3/4 services up (monitor not answering); watchdog withheld")


@pytest.fixture
def notified() -> Iterator[tuple[Agent, Listener]]:
    listener = Listener()
    agent = Agent()
    agent.env.update({"NOTIFY_SOCKET": listener.name, "WATCHDOG_USEC": "2000000"})
    try:
        yield agent, listener
    finally:
        agent.close()
        listener.close()


def answers(agent: Agent, service: str) -> bool:
    endpoint = f"ipc://{agent.run_dir}/{service}.sock"
    client = RequestClient(endpoint, timeout=2, retries=0)
    try:
        client.call("stats" if service == "proxy" else "ping")
        return True
    finally:
        client.close()


@pytest.mark.integration
def test_agent_notifies_ready_status_and_watchdog(notified: tuple[Agent, Listener]) -> None:
    agent, listener = notified
    started = threading.Thread(target=agent.start, daemon=True)
    started.start()
    ready = listener.until(lambda m: m.get("READY") == "1", 90, "READY=1")
    # Sent only once all four answer: at that moment each one does.
    assert all(answers(agent, s) for s in FOUR)
    assert ready["STATUS"].startswith("4/4 services up")
    started.join(90)
    assert agent.proc is not None and agent.proc.poll() is None

    # The other services (and the helpers and shims they start) do not get systemd's variables.
    for service in ("memory", "manager", "proxy"):
        with open(f"/proc/{agent.service_pid(service)}/environ", "rb") as fh:
            names = {entry.split(b"=", 1)[0] for entry in fh.read().split(b"\0")}
        assert not names & {b"NOTIFY_SOCKET", b"WATCHDOG_USEC"}, service

    if not STATUS_UP.match(ready["STATUS"]):  # the pods' count follows once memory is mirrored
        listener.until(lambda m: bool(STATUS_UP.match(m.get("STATUS", ""))), 30, "a full STATUS=")
    watchdogs = 0

    def count(msg: dict[str, str]) -> None:
        nonlocal watchdogs
        watchdogs += msg.get("WATCHDOG") == "1"

    listener.until(lambda _: watchdogs >= 3, 30, "three WATCHDOG=1", count)

    manager = agent.service_pid("manager")
    os.kill(manager, signal.SIGSTOP)
    try:
        listener.until(lambda m: "manager not answering" in m.get("STATUS", ""), 30,
                       "STATUS= naming the stopped manager")
        # While it stays stopped, no round finds the four answering: no WATCHDOG=1 at all.
        window_end = time.monotonic() + 4
        while (left := window_end - time.monotonic()) > 0:
            msg = listener.next(left)
            assert msg is None or "WATCHDOG" not in msg, listener.seen[-5:]
    finally:
        os.kill(manager, signal.SIGCONT)
    listener.until(lambda m: bool(STATUS_UP.match(m.get("STATUS", ""))), 30, "STATUS= back to 4/4")
    listener.until(lambda m: m.get("WATCHDOG") == "1", 30, "WATCHDOG=1 again")
    wait_for(lambda: agent.statuses()["manager"] == "RUNNING", 30, what="manager still RUNNING")
