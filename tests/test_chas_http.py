"""The CHaS HTTP API on aiohttp (services/manager/chas/web.py): the routes are exactly those
openapi.json documents; inspect, list filters and paging, request ids, /livez and /readyz,
against a real agent over real HTTP."""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from services.manager.chas import api as chas_api
from services.manager.chas import web
from services.manager.chas.stats import ChasStats
from tests.stack import Agent, chas_agent
from tests.support import wait_for

HOST_PORTS = (24200, 24299)   # apart from test_chas_api's and test_chas_fuzz's
CONFIG = ("containerd:\n  address: /nonexistent/riklet-http/containerd.sock\n"
          f"chas:\n  host_ports: {HOST_PORTS[0]}-{HOST_PORTS[1]}\n")
HEX32 = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(scope="module")
def agent() -> Iterator[Agent]:
    with chas_agent(CONFIG) as a:
        yield a


def error_of(status: int, body: Any, expected: int, field: str | None = None) -> dict[str, Any]:
    assert status == expected, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    if field is not None:
        assert body["error"].get("field") == field, body
    return dict(body["error"])


def names(body: dict[str, Any]) -> list[str]:
    return [c["name"] for c in body["containers"]]


def test_openapi_documents_exactly_the_registered_routes() -> None:
    with open(chas_api.OPENAPI_PATH, encoding="utf-8") as fh:
        spec = json.load(fh)
    documented = {path: {m.upper() for m in item if m != "parameters"}
                  for path, item in spec["paths"].items()}
    app = web.make_app(None, None)  # type: ignore[arg-type]  # routes only: nothing is served
    assert web.registered(app) == documented
    public = {path for path, item in spec["paths"].items() if all(op.get("security") == [] for m, op in
                                                                  item.items() if m != "parameters")}
    assert public == set(web.PUBLIC)


def test_request_ids_on_every_answer_and_in_the_log(agent: Agent) -> None:
    status, headers, _ = agent.chas_request("GET", "/containers", headers={"X-Request-Id": "lb-42.a:b"})
    assert status == 200 and headers["x-request-id"] == "lb-42.a:b"
    status, headers, _ = agent.chas_request("GET", "/containers")
    assert status == 200 and HEX32.fullmatch(headers["x-request-id"])
    made = headers["x-request-id"]
    status, headers, body = agent.chas_request("GET", "/containers", token=False,
                                               headers={"X-Request-Id": "no-token-1"})
    error_of(status, body, 401)
    assert headers["x-request-id"] == "no-token-1"
    for bad in ("x" * 129, "has space", "semi;colon"):
        status, headers, body = agent.chas_request("GET", "/containers", headers={"X-Request-Id": bad})
        error_of(status, body, 400, "X-Request-Id")
        assert HEX32.fullmatch(headers["x-request-id"])   # a made-up one instead
    status, headers, body = agent.chas_request("GET", "/nowhere", headers={"X-Request-Id": "lost-7"})
    error_of(status, body, 404)
    assert headers["x-request-id"] == "lost-7"

    def logged() -> set[str] | None:
        with open(os.path.join(agent.state_dir, "log", "manager.log"), encoding="utf-8") as fh:
            ids = {json.loads(line).get("request_id") for line in fh if '"riklet.chas"' in line}
        want = {"lb-42.a:b", made, "no-token-1", "lost-7"}
        return ids if want <= ids else None
    wait_for(logged, 10, what="the requests' log lines with their ids")


def test_livez_and_readyz_need_no_token_and_readyz_follows_memory(agent: Agent) -> None:
    for path, want in (("/livez", "ok"), ("/readyz", "ready")):
        status, headers, body = agent.chas_request("GET", path, token=False)
        assert status == 200 and body["status"] == want, body
        assert headers["x-request-id"]
    error_of(*agent.chas_request("GET", "/health", token=False)[::2], 401)
    error_of(*agent.chas_request("GET", "/readyz?x=1", token=False)[::2], 400, "query.x")
    agent.supervisorctl("stop", "riklet:memory")
    try:
        status, _, body = agent.chas_request("GET", "/readyz", token=False)
        assert status == 503 and body["status"] == "not_ready", body
        assert any(p.startswith("memory") for p in body["problems"])
        assert agent.chas_request("GET", "/livez", token=False)[0] == 200
    finally:
        agent.supervisorctl("start", "riklet:memory")
    wait_for(lambda: agent.chas_request("GET", "/readyz", token=False)[0] == 200, 30, what="ready again")


def test_inspect_filters_and_pages(agent: Agent) -> None:
    created = {}
    for name in ("pg-a", "pg-b", "pg-c", "other-x"):
        status, _, body = agent.chas_request("POST", "/containers/deploy", {
            "name": name, "command": ["sleep", "300"], "exposed_ports": [{"container": 8080}],
            "environment": {"WHO": name}})
        assert status == 201, body
        created[name] = body["id"]
    wait_for(lambda: all(c["status"] == "running" for c in
                         agent.chas_request("GET", "/containers")[2]["containers"]), 30, what="running")

    # Inspect: by id or by name, the summary plus the details.
    status, _, one = agent.chas_request("GET", f"/containers/{created['pg-a']}")
    assert status == 200, one
    assert one["id"] == created["pg-a"] and one["name"] == "pg-a" and one["status"] == "running"
    assert one["ready"] is True and one["restarts"] == 0 and one["desired"] == "running"
    assert one["ports"][0]["container"] == 8080 and HOST_PORTS[0] <= one["ports"][0]["host"] <= HOST_PORTS[1]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", one["created_at"]), one["created_at"]
    assert one["started_at"] and one["containers"][0]["started_at"]
    assert "WHO" in json.dumps(one["spec"]["containers"][0]) and "chas" not in one["spec"], one["spec"]
    assert agent.chas_request("GET", "/containers/pg-a")[2]["id"] == created["pg-a"]
    error_of(*agent.chas_request("GET", "/containers/no-such")[::2], 404, "container_id")
    error_of(*agent.chas_request("GET", "/containers/pg-a?x=1")[::2], 400, "query.x")

    # Filters.
    assert names(agent.chas_request("GET", "/containers?name=pg-b")[2]) == ["pg-b"]
    assert names(agent.chas_request("GET", "/containers?name_prefix=pg-")[2]) == ["pg-a", "pg-b", "pg-c"]
    assert "other-x" in names(agent.chas_request("GET", "/containers?status=running,pending")[2])
    assert names(agent.chas_request("GET", "/containers?status=stopped")[2]) == []
    whole = agent.chas_request("GET", "/containers?name_prefix=pg-")[2]
    assert set(whole) == {"containers"}   # the seed's shape when no page is asked for

    # Pages: limit and the continue token, until it is null.
    seen: list[str] = []
    path = "/containers?name_prefix=pg-&limit=2"
    status, _, page = agent.chas_request("GET", path)
    assert status == 200 and names(page) == ["pg-a", "pg-b"] and page["continue"]
    seen += names(page)
    status, _, page = agent.chas_request("GET", f"{path}&continue={page['continue']}")
    assert status == 200 and names(page) == ["pg-c"] and page["continue"] is None
    for query, field in [("limit=0", "query.limit"), ("limit=1001", "query.limit"),
                         ("limit=x", "query.limit"), ("limit=2&continue=garbage!", "query.continue"),
                         ("continue=bi1wZy1h", "query.continue"),
                         ("status=sleeping", "query.status"), ("name=Not_A_Name", "query.name"),
                         ("name_prefix=-x", "query.name_prefix"), ("label=a", "query.label")]:
        error_of(*agent.chas_request("GET", f"/containers?{query}")[::2], 400, field)

    for cid in created.values():
        assert agent.chas_request("DELETE", f"/containers/{cid}")[0] == 200


def test_expect_continue_only_for_a_body_that_would_be_read(agent: Agent) -> None:
    host, port = agent.chas.rsplit(":", 1)
    body = json.dumps({"name": "x"}).encode()

    def first_answer(token: bool) -> bytes:
        bearer = f"Authorization: Bearer {auth_token(agent)}\r\n" if token else ""
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(f"POST /containers/deploy HTTP/1.1\r\nHost: x\r\n{bearer}Expect: 100-continue\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode())
            return s.recv(65536)
    assert first_answer(True).startswith(b"HTTP/1.1 100 Continue\r\n")
    refused = first_answer(False)
    assert refused.startswith(b"HTTP/1.1 401 ") and b"Server: riklet-chas" in refused


def auth_token(agent: Agent) -> str:
    with open(agent.token_path, encoding="utf-8") as fh:
        return fh.read().strip()


class _NoCore:
    """A core that is never reached: the requests below wait for their bodies."""

    memory = None
    monitor = None
    mirror = None


def test_at_the_cap_with_every_connection_busy_a_new_one_gets_503() -> None:
    token = "t" * 32
    api = chas_api.ChasApi(_NoCore(), ChasStats(), host="127.0.0.1", port=0,  # type: ignore[arg-type]
                           token=lambda: token, host_ports=HOST_PORTS, ssl_context=None,
                           started_at=time.time(), disk_path="/tmp", max_connections=2, header_timeout=30)
    api.start()
    busy: list[socket.socket] = []
    try:
        for _ in range(2):   # deploys whose bodies never come: in a request, so never shed
            s = socket.create_connection(("127.0.0.1", api.port), timeout=10)
            s.sendall(f"POST /containers/deploy HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                      "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode())
            busy.append(s)
        assert api._server is not None
        live = api._server.connections._live
        wait_for(lambda: len(live) == 2 and all(c.busy for c in live.values()), 10,
                 what="both connections in a request")
        with socket.create_connection(("127.0.0.1", api.port), timeout=10) as extra:
            answer = b""
            while chunk := extra.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 503 ") and b'"code": "unavailable"' in answer, answer
        for s in busy:   # the busy ones were left alone
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(1)
    finally:
        for s in busy:
            s.close()
        api.stop()
