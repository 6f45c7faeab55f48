"""The manager's CHaS client (services/manager/chas/client.py) against tests/chas_server.py, a
CHaS API server written from seed 003's contract. Intervals of 0.2 s, back-off of 0.05..0.4 s."""

from __future__ import annotations

import copy
import json
import logging
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from itertools import pairwise
from typing import Any

import pytest

from services.manager.chas.client import ChasReporter, format_size, resources_from_monitor
from services.manager.chas.stats import ChasStats
from tests.chas_server import ChasServer, Request
from tests.support import wait_for

INTERVAL = 0.2
RESOURCES = {"cpu_cores": 4, "memory_total": "8GB", "disk_total": "100GB"}
HEALTH = {"status": "healthy", "uptime": 86400,
          "resources": {"cpu_usage": 25.5, "memory_usage": 60.2, "disk_available": "50GB",
                        "container_count": 3}}
REGISTER = {"node_id": "node-worker-1", "hostname": "worker-1.local", "ip_address": "192.168.1.10",
            "port": 9090, "resources": RESOURCES}

Make = Callable[..., ChasReporter]


@pytest.fixture
def chas() -> Iterator[ChasServer]:
    """A CHaS server, not started yet; no test may leave a contract violation behind."""
    server = ChasServer()
    try:
        yield server
    finally:
        server.close()
    assert server.violations == []


@pytest.fixture
def reporter() -> Iterator[Make]:
    made: list[ChasReporter] = []

    def make(server: ChasServer, **kw: Any) -> ChasReporter:
        args: dict[str, Any] = {
            "api_url": server.url, "node_id": REGISTER["node_id"], "hostname": REGISTER["hostname"],
            "ip_address": REGISTER["ip_address"], "port": REGISTER["port"],
            "resources": lambda: dict(RESOURCES), "health": lambda: copy.deepcopy(HEALTH),
            "interval": INTERVAL, "stats": ChasStats(), "timeout": 1.0,
            "backoff_initial": 0.05, "backoff_max": 0.4, **kw}
        r = ChasReporter(**args)
        made.append(r)
        r.start()
        return r

    yield make
    for r in made:
        r.stop()
        assert not r.is_alive()


@pytest.fixture
def chas_logs(caplog: pytest.LogCaptureFixture) -> Callable[[str], list[logging.LogRecord]]:
    """Records of logger riklet.chas whose message contains a text."""
    caplog.set_level(logging.DEBUG, logger="riklet.chas")
    return lambda text: [r for r in caplog.records if r.name == "riklet.chas" and text in r.getMessage()]


def gaps(requests: list[Request]) -> list[float]:
    return [b.at - a.at for a, b in pairwise(requests)]


def after(requests: list[Request], t: float) -> list[Request]:
    return [r for r in requests if r.at > t]


# --- the sizes ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("size", "text"), [
    (0, "0B"), (512, "512B"), (1024, "1KB"), (8 * 1024**3, "8GB"), (100 * 1024**3, "100GB"),
    (16_500_000_000, "15.4GB"), (int(7.5 * 1024**3), "7.5GB"), (1024**4 - 1, "1TB"), (3 * 1024**4, "3TB"),
])
def test_sizes_are_written_like_the_seed(size: int, text: str) -> None:
    assert format_size(size) == text


def test_register_resources_come_from_the_monitor() -> None:
    node = {"id": "n", "cpu": 4, "memory": 8 * 1024**3, "disksize": 200 * 1024**3, "distrib": "debian"}
    assert resources_from_monitor(node, 100 * 1024**3) == RESOURCES
    assert resources_from_monitor(node)["disk_total"] == "200GB"
    with pytest.raises(ValueError, match="memory"):
        resources_from_monitor({"cpu": 4, "memory": None, "disksize": 1})


def test_bad_urls_are_refused() -> None:
    for url in ("ftp://x", "http://", "http://user:secret@x", "http://x/?a=1"):
        with pytest.raises(ValueError):
            ChasReporter(url, "n", "h", "127.0.0.1", 9090, dict, dict, 1.0, ChasStats())


# --- registration and the health schedule ------------------------------------------------------

def test_registers_with_the_contract_body_then_reports_health_at_the_interval(
        chas: ChasServer, reporter: Make) -> None:
    def health() -> dict[str, Any]:
        time.sleep(0.1)  # figures gathered over IPC take time: the schedule must not drift by it
        return copy.deepcopy(HEALTH)

    chas.start()
    stats = ChasStats()
    r = reporter(chas, stats=stats, health=health)
    healths = wait_for(lambda: len(chas.healths()) >= 6 and chas.healths(), what="6 health reports")
    [register] = chas.registers()
    assert register.body == REGISTER and register.status == 201
    assert register.headers["content-type"] == "application/json"
    assert "authorization" not in register.headers
    assert all(h.path == "/nodes/node-worker-1/health" and h.body == HEALTH and h.status == 200
               for h in healths)
    assert healths[0].at - register.at < INTERVAL  # the first report follows the registration
    assert all(0.1 <= g <= 0.6 for g in gaps(healths)), gaps(healths)
    # Fixed slots: a drifting loop would average interval + 0.1 s (the time health() takes).
    average = (healths[-1].at - healths[0].at) / (len(healths) - 1)
    assert 0.17 <= average <= 0.27, average
    assert r.state == "registered"
    # The server records a report before the reporter has read the answer and counted it.
    wait_for(lambda: stats.snapshot()["reports"]["success"] >= 6, what="6 reports counted")
    snap = stats.snapshot()
    assert snap["registered"] is True and snap["reports"]["failure"] == 0


def test_node_id_is_percent_encoded_and_a_url_path_is_kept(reporter: Make) -> None:
    with ChasServer(prefix="/api/v1") as server:
        reporter(server, node_id="rack 1/node#2")
        health = wait_for(lambda: server.healths(200), what="a health report")[0]
        assert health.path == "/api/v1/nodes/rack%201%2Fnode%232/health"
        assert health.node_id == "rack 1/node#2"
        assert server.registers()[0].path == "/api/v1/nodes/register"
        assert server.violations == []


def test_server_down_at_start_is_retried_until_it_comes_up(
        chas: ChasServer, reporter: Make, chas_logs: Callable[[str], list[logging.LogRecord]]) -> None:
    r = reporter(chas)
    wait_for(lambda: r.state == "unreachable" and r.failures >= 4, what="failed attempts")
    assert chas.requests == []
    chas.start()
    wait_for(lambda: r.state == "registered" and chas.healths(200), what="registration")
    assert len(chas.registers()) == 1
    assert len(chas_logs("unreachable")) == 1
    assert len(chas_logs("reachable again")) == 1
    assert len(chas_logs("registered with CHaS")) == 1


def test_register_is_retried_with_backoff_while_the_server_fails(
        chas: ChasServer, reporter: Make, chas_logs: Callable[[str], list[logging.LogRecord]]) -> None:
    chas.set_mode("failing")
    chas.start()
    stats = ChasStats()
    r = reporter(chas, stats=stats)
    attempts = wait_for(lambda: len(chas.registers()) >= 6 and chas.registers(), what="6 attempts")
    assert r.state == "unreachable" and chas.healths() == [] and stats.registered is False
    for n, gap in enumerate(gaps(attempts)):  # equal jitter: within [d/2, d], d = min(max, initial*2^n)
        delay = min(0.4, 0.05 * 2**n)
        assert delay / 2 - 0.01 <= gap <= delay + 0.2, (n, gap)
    chas.set_mode("normal")
    wait_for(lambda: r.state == "registered" and chas.healths(200), what="registration")
    assert stats.registered is True
    assert len(chas_logs("unreachable")) == 1
    assert len(chas_logs("reachable again")) == 1


def test_a_failing_server_keeps_the_schedule_and_is_logged_once_per_episode(
        chas: ChasServer, reporter: Make, chas_logs: Callable[[str], list[logging.LogRecord]]) -> None:
    chas.start()
    stats = ChasStats()
    r = reporter(chas, stats=stats)
    wait_for(lambda: r.state == "registered" and chas.healths(200), what="registration")
    chas.set_mode("failing")
    failed = wait_for(lambda: len(chas.healths(500)) >= 4 and chas.healths(500), what="failed reports")
    assert r.state == "unreachable"
    assert all(g >= 0.1 for g in gaps(chas.healths())), gaps(chas.healths())  # never faster
    recovery = time.monotonic()
    chas.set_mode("normal")
    wait_for(lambda: r.state == "registered" and after(chas.healths(200), recovery), what="recovery")
    assert len(chas.registers()) == 1  # a failing server has not forgotten the node
    assert len(chas_logs("unreachable")) == 1
    assert len(chas_logs("reachable again")) == 1
    assert chas_logs("unreachable")[0].error == "HTTP 500"  # type: ignore[attr-defined]
    snap = stats.snapshot()
    assert snap["reports"]["failure"] >= len(failed) and snap["registered"] is True


def test_a_slow_server_is_a_failure_and_does_not_hold_the_reporter(
        chas: ChasServer, reporter: Make, chas_logs: Callable[[str], list[logging.LogRecord]]) -> None:
    chas.start()
    stats = ChasStats()
    r = reporter(chas, stats=stats, timeout=0.3)
    wait_for(lambda: r.state == "registered" and chas.healths(200), what="registration")
    chas.set_mode("slow", delay=1.0)
    slow = wait_for(lambda: len([h for h in chas.healths() if h.mode == "slow"]) >= 3
                    and [h for h in chas.healths() if h.mode == "slow"], what="3 slow reports")
    assert r.state == "unreachable" and chas_logs("unreachable")[0].error == "timed out"  # type: ignore[attr-defined]
    # Each attempt gives up after the timeout (0.3 s) and waits for the next free slot: a
    # reporter stuck until the answer would be 1 s apart.
    assert all(0.1 <= g <= 0.8 for g in gaps(slow)), gaps(slow)
    recovery = time.monotonic()
    chas.set_mode("normal")
    wait_for(lambda: r.state == "registered" and after(chas.healths(200), recovery), what="recovery")
    assert stats.snapshot()["reports"]["failure"] >= 3
    assert len(chas_logs("reachable again")) == 1


@pytest.mark.parametrize("how", ["forget", "unknown-node"])
def test_a_server_that_forgot_the_node_gets_a_new_registration(
        chas: ChasServer, reporter: Make, chas_logs: Callable[[str], list[logging.LogRecord]],
        how: str) -> None:
    chas.start()
    stats = ChasStats()
    r = reporter(chas, stats=stats)
    wait_for(lambda: r.state == "registered" and chas.healths(200), what="registration")
    if how == "forget":
        chas.forget()
    else:
        chas.set_mode("unknown-node")
    wait_for(lambda: len(chas.registers()) >= 2, what="a second registration")
    chas.set_mode("normal")
    second = chas.registers()[1]
    wait_for(lambda: after(chas.healths(200), second.at), what="a report after it")
    assert chas.healths(404) and all(h.at < second.at for h in chas.healths(404)[:1])
    assert chas.registers()[1].body == REGISTER
    assert all(g >= 0.1 for g in gaps(chas.healths())), gaps(chas.healths())  # still the schedule
    assert r.state == "registered" and stats.registered is True
    assert chas_logs("registering again")
    assert chas_logs("unreachable") == []


# --- token and stop ----------------------------------------------------------------------------

def test_the_token_is_sent_on_every_request_and_never_logged(
        chas: ChasServer, reporter: Make, caplog: pytest.LogCaptureFixture,
        chas_logs: Callable[[str], list[logging.LogRecord]]) -> None:
    token = "tok-" + secrets.token_hex(16)
    chas.token = token  # the server answers 401 and records a violation without it
    chas.start()
    r = reporter(chas, token=token)
    wait_for(lambda: r.state == "registered" and chas.healths(200), what="registration")
    chas.set_mode("failing")  # every state change logs something
    wait_for(lambda: r.state == "unreachable", what="failure")
    chas.set_mode("normal")
    chas.forget()
    wait_for(lambda: len(chas.registers()) == 2 and r.state == "registered", what="re-registration")
    assert all(q.headers["authorization"] == f"Bearer {token}" for q in chas.requests)
    assert len(chas_logs("")) >= 4
    for record in caplog.records:
        assert token not in record.getMessage()
        assert token not in json.dumps(vars(record), default=str)
    assert token not in caplog.text


def test_stop_returns_at_once_during_backoff(chas: ChasServer, reporter: Make) -> None:
    r = reporter(chas, backoff_initial=5.0, backoff_max=10.0)  # the server is down
    wait_for(lambda: r.state == "unreachable", what="a failed attempt")
    began = time.monotonic()
    r.stop()
    assert time.monotonic() - began < 1.0 and not r.is_alive()


def test_stop_cuts_a_request_in_flight(chas: ChasServer, reporter: Make,
                                        chas_logs: Callable[[str], list[logging.LogRecord]]) -> None:
    chas.set_mode("slow", delay=5.0)
    chas.start()
    r = reporter(chas, timeout=4.0)
    wait_for(lambda: chas.requests, what="a request in flight")
    began = time.monotonic()
    r.stop()
    assert time.monotonic() - began < 1.0 and not r.is_alive()
    assert chas_logs("unreachable") == []  # stopping is not an outage


def test_figures_that_cannot_be_gathered_skip_reports_and_are_logged_once(
        chas: ChasServer, reporter: Make, chas_logs: Callable[[str], list[logging.LogRecord]]) -> None:
    broken = {"on": False}

    def health() -> dict[str, Any]:
        if broken["on"]:
            raise RuntimeError("monitor not answering")
        return copy.deepcopy(HEALTH)

    chas.start()
    stats = ChasStats()
    r = reporter(chas, stats=stats, health=health)
    wait_for(lambda: chas.healths(200), what="a report")
    broken["on"] = True
    wait_for(lambda: stats.snapshot()["reports"]["failure"] >= 3, what="skipped reports")
    broken["on"] = False
    fixed = time.monotonic()
    wait_for(lambda: after(chas.healths(200), fixed), what="reports again")
    assert len(chas_logs("cannot build")) == 1 and len(chas_logs("built again")) == 1
    assert r.state == "registered" and chas.healths(500) == []


# --- the test server itself --------------------------------------------------------------------

def test_the_test_server_records_contract_violations() -> None:
    with ChasServer(token="t") as server:
        bad = {**REGISTER, "port": "9090", "extra": 1, "resources": {"cpu_cores": 4, "memory_total": 8}}
        request = urllib.request.Request(f"{server.url}/nodes/register", data=json.dumps(bad).encode(),
                                         method="POST", headers={"Content-Type": "text/plain"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=5)
        assert caught.value.code == 401
        text = "\n".join(server.violations)
        for problem in ("Authorization", "Content-Type", "register.port", "register.extra: unexpected",
                        "register.resources.memory_total", "register.resources.disk_total: missing"):
            assert problem in text, problem
