"""A real agent reporting to a test CHaS API server (tests/chas_server.py, written from the
contract): registration with the node's figures, then its own /health body every
HEALTH_INTERVAL; the counters on the monitor's /metrics."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest

from tests.chas_server import ChasServer
from tests.stack import Agent
from tests.support import parse_prometheus, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def reporting() -> Iterator[tuple[Agent, ChasServer]]:
    server = ChasServer().start()
    agent = Agent()
    agent.env.update({"CHAS_API_URL": server.url, "HEALTH_INTERVAL": "0.3", "NODE_ID": "worker-7"})
    try:
        agent.start()
        yield agent, server
    finally:
        agent.close()
        server.stop()
    assert server.violations == []


def metrics(agent: Agent) -> dict[str, dict[str, float]]:
    with urllib.request.urlopen(f"http://{agent.metrics}/metrics", timeout=5) as resp:
        return parse_prometheus(resp.read().decode())[1]


def test_registers_then_reports_health(reporting: tuple[Agent, ChasServer]) -> None:
    agent, server = reporting
    reg = wait_for(lambda: server.registers(), 20, "the registration")[0]
    assert reg.body["node_id"] == "worker-7"
    assert reg.body["port"] == int(agent.chas.rsplit(":", 1)[1])
    assert reg.body["resources"]["cpu_cores"] >= 1
    wait_for(lambda: len(server.healths(200)) >= 3, 20, "three health reports")
    body = server.healths(200)[-1].body
    assert body["status"] in ("healthy", "unhealthy")
    assert set(body["resources"]) >= {"cpu_usage", "memory_usage", "disk_available", "container_count"}
    # the same figures the node answers itself
    status, _, own = agent.chas_request("GET", "/health")
    assert status == 200 and set(own) >= set(body)

    m = wait_for(lambda: (s := metrics(agent)).get("riklet_chas_registered", {}).get("") == 1 and s, 15,
                 "riklet_chas_registered on /metrics")
    assert m["riklet_chas_health_reports_total"]['{result="success"}'] >= 1
    # the API's own requests are counted and timed per endpoint
    requests = m["riklet_chas_requests_total"]
    assert requests['{code="200",method="GET",route="/health"}'] >= 1
    assert m["riklet_chas_request_duration_seconds_count"]['{code="200",method="GET",route="/health"}'] >= 1


def test_keeps_serving_while_the_server_is_down_and_comes_back(reporting: tuple[Agent, ChasServer]) -> None:
    agent, server = reporting
    wait_for(lambda: server.healths(200), 20, "a first report")
    registrations = len(server.registers())
    server.stop()
    agent.ctl("run", "during", "--", "sleep", "300")      # the node goes on without its server
    agent.wait_phase("during", "Running")
    server.forget()
    server.start()
    # the server forgot the node: the agent registers again, then reports on
    reports = len(server.healths(200))
    wait_for(lambda: len(server.registers()) > registrations and len(server.healths(200)) > reports, 30,
             "re-registration and reports")
