"""The CHaS HTTP API (services/manager/chas/api.py) against a real agent, over real HTTP.

Workloads run on the process runtime (no containerd needed); the agent's containerd socket
points nowhere, so a deploy with an image shows what a node without containerd answers.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

from common import auth, config
from common.errors import InvalidArgument, NotFound, Unavailable
from common.zmqutil import RequestClient
from services.manager.chas import api as chas_api
from services.manager.chas.stats import ChasStats
from tests.stack import Agent, chas_agent
from tests.support import free_port, need, wait_for

pytestmark = pytest.mark.integration

PY = sys.executable
HOST_PORTS = (24000, 24099)   # below the ephemeral range: free_ports() of other tests never lands here
CONFIG = ("containerd:\n  address: /nonexistent/riklet-test/containerd.sock\n"
          f"chas:\n  host_ports: {HOST_PORTS[0]}-{HOST_PORTS[1]}\n")


@pytest.fixture(scope="module")
def agent() -> Iterator[Agent]:
    with chas_agent(CONFIG) as a:
        yield a


# -- helpers ------------------------------------------------------------------------------------

def deploy(agent: Agent, body: Any, **kw: Any) -> tuple[int, dict[str, str], Any]:
    return agent.chas_request("POST", "/containers/deploy", body, **kw)


def containers(agent: Agent) -> dict[str, dict[str, Any]]:
    status, _, body = agent.chas_request("GET", "/containers")
    assert status == 200, body
    return {c["name"]: c for c in body["containers"]}


def wait_status(agent: Agent, name: str, status: str, timeout: float = 30.0) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        c = containers(agent).get(name)
        return c if c is not None and c["status"] == status else None
    return wait_for(check, timeout, what=f"container {name} {status}")


def wait_gone(agent: Agent, name: str, timeout: float = 30.0) -> None:
    wait_for(lambda: name not in containers(agent), timeout, what=f"container {name} gone")


def assert_error(status: int, body: Any, expected: int, code: str | None = None,
                 field: str | None = None) -> None:
    assert status == expected, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err["code"], str) and isinstance(err["message"], str) and err["message"]
    assert set(err) <= {"code", "message", "field"}
    if code is not None:
        assert err["code"] == code, err
    if field is not None:
        assert err.get("field") == field, err


def server_cmd(port: int) -> list[str]:
    return [PY, "-m", "http.server", str(port), "--bind", "127.0.0.1"]


def ticker_cmd() -> list[str]:
    return ["sh", "-c", "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.1; done"]


def raw_exchange(agent: Agent, data: bytes, timeout: float = 10.0) -> bytes:
    """Send bytes as they are; read the answer until the server closes."""
    host, port = agent.chas.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def parse_raw(answer: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, json.loads(body) if body else None


def fetch(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def token_of(agent: Agent) -> str:
    with open(os.path.join(agent.state_dir, "api-token"), encoding="utf-8") as fh:
        return fh.read().strip()


# -- no agent: the request mapping ------------------------------------------------------------

def test_parse_deploy_maps_the_seed_body_to_a_workload() -> None:
    req = chas_api.parse_deploy({
        "image": "nginx:latest", "name": "web-server-1",
        "exposed_ports": [{"container": 80, "protocol": "tcp"},
                          {"container": 53, "protocol": "UDP", "host": 5353}],
        "resources": {"cpu": "0.5", "memory": "512m"}, "environment": {"ENV_VAR": "value", "N": 3}})
    assert req.name == "web-server-1" and req.image == "nginx:latest"
    assert req.document == {"apiVersion": "v1", "kind": "Pod", "name": "web-server-1", "spec": {
        "containers": [{
            "name": "web-server-1", "image": "nginx:latest",
            "ports": [{"target_port": 80, "protocol": "TCP"},
                      {"target_port": 53, "protocol": "UDP", "port": 5353}],
            "resources": {"cpu": "500m", "memory": 512 << 20}, "env": {"ENV_VAR": "value", "N": "3"}}]}}
    # The same request written differently is the same request.
    again = chas_api.parse_deploy({"name": "web-server-1", "environment": {"N": 3, "ENV_VAR": "value"},
                                   "resources": {"memory": "512m", "cpu": "0.5"}, "image": "nginx:latest",
                                   "exposed_ports": [{"protocol": "tcp", "container": 80},
                                                     {"container": 53, "protocol": "UDP", "host": 5353}]})
    assert again.digest == req.digest
    assert chas_api.parse_deploy({"name": "p", "command": ["true"]}).document["spec"]["containers"][0] == {
        "name": "p", "command": ["true"]}


@pytest.mark.parametrize(("body", "field"), [
    ({"name": "x", "command": ["true"], "extra": 1}, "extra"),
    ({"command": ["true"]}, "name"),
    ({"name": "Not_A_Label", "command": ["true"]}, "name"),
    ({"name": "x" * 64, "command": ["true"]}, "name"),
    ({"name": "x"}, "image"),
    ({"name": "x", "image": "with space"}, "image"),
    ({"name": "x", "command": "true"}, "command"),
    ({"name": "x", "command": []}, "command"),
    ({"name": "x", "command": ["true", 1]}, "command[1]"),
    ({"name": "x", "command": [""]}, "command[0]"),
    ({"name": "x", "command": ["true"], "args": [None]}, "args[0]"),
    ({"name": "x", "command": ["true"], "exposed_ports": {"container": 80}}, "exposed_ports"),
    ({"name": "x", "command": ["true"], "exposed_ports": [80]}, "exposed_ports[0]"),
    ({"name": "x", "command": ["true"], "exposed_ports": [{"host": 80}]}, "exposed_ports[0].container"),
    ({"name": "x", "command": ["true"], "exposed_ports": [{"container": 0}]}, "exposed_ports[0].container"),
    ({"name": "x", "command": ["true"], "exposed_ports": [{"container": True}]},
     "exposed_ports[0].container"),
    ({"name": "x", "command": ["true"], "exposed_ports": [{"container": 1, "protocol": "sctp"}]},
     "exposed_ports[0].protocol"),
    ({"name": "x", "command": ["true"], "exposed_ports": [{"container": 1, "host": 70000}]},
     "exposed_ports[0].host"),
    ({"name": "x", "command": ["true"],
      "exposed_ports": [{"container": 1, "host": 9}, {"container": 2, "host": 9}]},
     "exposed_ports[1].host"),
    ({"name": "x", "command": ["true"], "exposed_ports": [{"container": 1, "hostPort": 9}]},
     "exposed_ports[0].hostPort"),
    ({"name": "x", "command": ["true"], "resources": {"cpu": "lots"}}, "resources.cpu"),
    ({"name": "x", "command": ["true"], "resources": {"cpu": "9" * 400}}, "resources.cpu"),
    ({"name": "x", "command": ["true"], "resources": {"memory": "9" * 400 + "g"}}, "resources.memory"),
    ({"name": "x", "command": ["true"], "resources": {"memory": 0}}, "resources.memory"),
    ({"name": "x", "command": ["true"], "resources": {"gpu": 1}}, "resources.gpu"),
    ({"name": "x", "command": ["true"], "resources": "1cpu"}, "resources"),
    ({"name": "x", "command": ["true"], "environment": ["A=1"]}, "environment"),
    ({"name": "x", "command": ["true"], "environment": {"1BAD": "x"}}, "environment.1BAD"),
    ({"name": "x", "command": ["true"], "environment": {"A": {"x": 1}}}, "environment.A"),
    ({"name": "x", "command": ["true"], "environment": {"A": True}}, "environment.A"),
    ([], "body"),
])
def test_parse_deploy_names_the_field(body: Any, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        chas_api.parse_deploy(body)
    assert info.value.field == field


def test_small_pieces() -> None:
    assert chas_api.format_gb(50 << 30) == "50GB"
    assert chas_api.format_gb(15 << 29) == "7.5GB"
    assert chas_api.format_gb(0) == "0GB"
    assert chas_api.body_field("spec.containers[0].env.A.value") == "environment.A.value"
    assert chas_api.body_field("spec.containers.resources.memory") == "resources.memory"
    assert chas_api.body_field("spec.containers.ports.port") == "exposed_ports"
    assert chas_api.body_field("spec.hostNetwork") == "body"
    assert chas_api.body_field("args.spec") == "body"
    assert chas_api.body_field("name") == "name"
    for phase, status in [("Pending", "pending"), ("Creating", "creating"), ("Running", "running"),
                          ("Error", "error"), ("Terminating", "terminating"), ("Terminated", "stopped")]:
        assert chas_api.container_status({"desired": "running", "status": {"phase": phase}}) == status
    assert chas_api.container_status({"desired": "deleted", "status": {"phase": "Running"}}) == "terminating"
    with open(chas_api.OPENAPI_PATH, encoding="utf-8") as fh:
        doc = json.load(fh)
    assert set(doc["components"]["schemas"]["Container"]["properties"]["status"]["enum"]) == {
        *chas_api.STATUSES.values(), "unknown"}


# -- ChasApi alone: TLS, a taken port, start_from_config ------------------------------------------

class _FakeMemory:
    endpoint = "ipc:///nonexistent/riklet-test/memory.sock"

    def list(self) -> list[dict[str, Any]]:
        return []

    def get(self, name: str) -> dict[str, Any]:
        raise NotFound(f"no pod {name}", "name")


class _FakeMonitor:
    def call(self, op: str, **kw: Any) -> Any:
        raise Unavailable("the monitor is not running in this test", "monitor")


class _FakeService:
    memory = _FakeMemory()
    monitor = _FakeMonitor()
    mirror = None


@pytest.fixture(scope="module")
def cert() -> Iterator[tuple[str, str]]:
    need(shutil.which("openssl") is not None, "openssl is needed")
    d = tempfile.mkdtemp(prefix="rkchas", dir="/tmp")
    crt, key = os.path.join(d, "server.pem"), os.path.join(d, "server.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", crt,
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    yield crt, key
    shutil.rmtree(d, ignore_errors=True)


def test_tls_a_taken_port_and_stop(cert: tuple[str, str], tmp_path: Any) -> None:
    crt, key = cert
    token = "t" * 32
    stats = ChasStats()

    def make(port: int) -> chas_api.ChasApi:
        return chas_api.ChasApi(_FakeService(), stats, host="127.0.0.1", port=port,  # type: ignore[arg-type]
                                token=lambda: token, host_ports=HOST_PORTS,
                                ssl_context=auth.server_ssl_context(crt, key, None),
                                started_at=time.time() - 5, disk_path=str(tmp_path / "not" / "yet"))

    api = make(0)
    api.start()
    try:
        assert api.port > 0
        client = ssl.create_default_context(cafile=crt)
        conn = http.client.HTTPSConnection("127.0.0.1", api.port, context=client, timeout=10)
        conn.request("GET", "/containers", headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read()) == {"containers": []}
        conn.request("GET", "/health", headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        health = json.loads(resp.read())
        assert resp.status == 200 and health["status"] == "unhealthy" and health["uptime"] >= 5
        assert {p.split(":")[0] for p in health["problems"]} == {"monitor", "memory"}
        assert health["resources"]["disk_available_bytes"] > 0  # of the nearest existing parent
        conn.close()
        assert stats.snapshot()["healthy"] is False
        # Clear text on the TLS port gets nothing, and the server carries on.
        with socket.create_connection(("127.0.0.1", api.port), timeout=10) as plain:
            plain.sendall(b"GET /containers HTTP/1.1\r\nHost: x\r\n\r\n")
            with contextlib.suppress(ConnectionResetError):
                assert not plain.recv(100).startswith(b"HTTP/")
        conn = http.client.HTTPSConnection("127.0.0.1", api.port, context=client, timeout=10)
        conn.request("GET", "/openapi.json")
        assert conn.getresponse().status == 200
        conn.close()
        # The same port twice: Unavailable naming the setting.
        with pytest.raises(Unavailable) as info:
            make(api.port).start()
        assert info.value.field == "chas.port"
    finally:
        api.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", api.port), timeout=2).close()


def test_start_from_config(tmp_path: Any) -> None:
    env = {"RIKLET_RUN_DIR": str(tmp_path / "run"), "RIKLET_STATE_DIR": str(tmp_path / "state")}
    assert chas_api.start_from_config(config.load(environ={**env, "NODE_PORT": "0"}), _FakeService(),
                                      ChasStats()) is None  # type: ignore[arg-type]
    exposed = config.load(environ={**env, "NODE_PORT": str(free_port()),
                                   "RIKLET_CHAS_BIND_ADDRESS": "0.0.0.0"})
    with pytest.raises(InvalidArgument) as info:
        chas_api.start_from_config(exposed, _FakeService(), ChasStats())  # type: ignore[arg-type]
    assert info.value.field == "chas.bind_address"
    port = free_port()
    api = chas_api.start_from_config(config.load(environ={**env, "NODE_PORT": str(port)}), _FakeService(),
                                     ChasStats())  # type: ignore[arg-type]
    assert api is not None
    try:
        assert api.port == port and api.host_ports == (30000, 32767)
        token = auth.read_token(str(tmp_path / "state" / "api-token"))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/containers", headers={"Authorization": f"Bearer {token}"})
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        api.stop()


# -- the real agent -----------------------------------------------------------------------------

def test_openapi_needs_no_token_and_is_the_repo_file(agent: Agent) -> None:
    status, headers, body = agent.chas_request("GET", "/openapi.json", token=False)
    assert status == 200 and headers["content-type"] == "application/json"
    with open(chas_api.OPENAPI_PATH, encoding="utf-8") as fh:
        assert body == json.load(fh)
    assert body["openapi"].startswith("3.0")
    assert set(body["paths"]) == {"/containers/deploy", "/containers", "/containers/{container_id}",
                                  "/containers/{container_id}/logs", "/health", "/openapi.json",
                                  "/livez", "/readyz"}
    status, headers, body = agent.chas_request("POST", "/openapi.json", {}, token=False)
    assert_error(status, body, 405, "method_not_allowed")
    assert headers["allow"] == "GET"


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/containers"), ("GET", "/health"), ("POST", "/containers/deploy"),
    ("DELETE", "/containers/anything"), ("GET", "/containers/anything/logs"), ("GET", "/nowhere")])
def test_every_other_path_needs_the_token(agent: Agent, method: str, path: str) -> None:
    body = {"name": "never", "command": ["true"]} if method == "POST" else None
    for token in (False, "wrong-token-of-enough-length", token_of(agent) + "x"):
        status, headers, answer = agent.chas_request(method, path, body, token=token)
        assert_error(status, answer, 401, "unauthenticated")
        assert headers["www-authenticate"].startswith("Bearer")
    assert "never" not in containers(agent)
    # Other schemes than Bearer are refused too.
    status, _, answer = agent.chas_request("GET", "/containers", token=False,
                                           headers={"Authorization": f"Basic {token_of(agent)}"})
    assert_error(status, answer, 401)


def test_health_reports_real_figures(agent: Agent) -> None:
    status, _, body = agent.chas_request("GET", "/health")
    assert status == 200, body
    assert body["status"] == "healthy" and body["problems"] == []
    res = body["resources"]
    assert isinstance(res["cpu_usage"], float) and 0 <= res["cpu_usage"] <= 100
    assert isinstance(res["memory_usage"], float) and 0 < res["memory_usage"] <= 100
    assert res["disk_available"] == chas_api.format_gb(res["disk_available_bytes"])
    assert res["disk_available"].endswith("GB") and res["disk_available_bytes"] > 0
    free = os.statvfs(agent.state_dir)
    assert abs(res["disk_available_bytes"] - free.f_bavail * free.f_frsize) < 1 << 30
    assert isinstance(res["container_count"], int) and res["container_count"] >= 0
    assert isinstance(body["uptime"], int) and 0 <= body["uptime"] < 3600
    status, _, body = agent.chas_request("GET", "/health?verbose=1")
    assert_error(status, body, 400, "invalid_argument", "query.verbose")


def test_deploy_process_reach_it_through_the_proxy_logs_and_delete(agent: Agent) -> None:
    target = free_port()
    body = {"name": "chas-web", "command": server_cmd(target), "exposed_ports": [{"container": target}],
            "resources": {"cpu": "0.5", "memory": "256m"}, "environment": {"GREETING": "hi"}}
    status, headers, created = deploy(agent, body)
    assert status == 201, created
    assert set(created) >= {"id", "name", "image", "status", "ports"}
    assert created["name"] == "chas-web" and created["image"] is None
    assert created["status"] in ("pending", "creating", "running")
    [port] = created["ports"]
    assert port["container"] == target and HOST_PORTS[0] <= port["host"] <= HOST_PORTS[1]
    assert headers["location"] == f"/containers/{created['id']}"

    running = wait_status(agent, "chas-web", "running")
    assert running["id"] == created["id"] and running["ports"] == created["ports"]
    reply = wait_for(lambda: fetch(port["host"]), 15, what="an answer through the proxy")
    assert reply.startswith(b"HTTP/1.0 200"), reply[:100]
    # http.server logs each request on stderr: the container's log.
    wait_for(lambda: b'"GET / HTTP/1.0" 200' in agent.chas_request(
        "GET", f"/containers/{created['id']}/logs")[2], what="the request in the log")
    status, headers, by_name = agent.chas_request("GET", "/containers/chas-web/logs?tail=1")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert by_name.count(b"\n") == 1 and b"GET / HTTP/1.0" in by_name

    status, _, deleted = agent.chas_request("DELETE", f"/containers/{created['id']}")
    assert status == 200 and deleted == {"id": created["id"], "name": "chas-web", "status": "terminating"}
    assert containers(agent).get("chas-web", {"status": "terminating"})["status"] == "terminating"
    status, _, again = agent.chas_request("DELETE", "/containers/chas-web")
    assert status in (200, 404), again  # still terminating, or already gone
    wait_gone(agent, "chas-web")
    wait_for(lambda: not _connects(port["host"]), 15, what="the host port released")
    status, _, body = agent.chas_request("DELETE", f"/containers/{created['id']}")
    assert_error(status, body, 404, "not_found", "container_id")


def _connects(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_host_ports_are_allocated_lowest_free_first(agent: Agent) -> None:
    claimed = {p["host"] for c in containers(agent).values() for p in c["ports"] if p["host"]}

    def bindable(port: int) -> bool:  # as the agent probes (and the proxy binds): SO_REUSEADDR
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                return False
        return True

    def lowest_free(skip: set[int]) -> int:
        for p in range(HOST_PORTS[0], HOST_PORTS[1] + 1):
            if p not in claimed and p not in skip and bindable(p):
                return p
        raise AssertionError("the test range is full")

    # A program on the node holds the lowest free port: the allocation skips it.
    busy = lowest_free(set())
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("0.0.0.0", busy))
    holder.listen()
    try:
        expected = lowest_free({busy})
        status, _, first = deploy(agent, {"name": "alloc-a", "command": ["sleep", "300"],
                                          "exposed_ports": [{"container": free_port()}]})
        assert status == 201, first
        assert first["ports"][0]["host"] == expected
        # UDP and TCP are counted apart; two ports of one request get two ports.
        status, _, second = deploy(agent, {"name": "alloc-b", "command": ["sleep", "300"], "exposed_ports": [
            {"container": 7001}, {"container": 7002, "protocol": "udp"}, {"container": 7003}]})
        assert status == 201, second
        hosts = [p["host"] for p in second["ports"]]
        assert [p["protocol"] for p in second["ports"]] == ["tcp", "udp", "tcp"]
        assert hosts[0] not in (busy, expected) and hosts[2] not in (busy, expected, hosts[0])
        assert all(HOST_PORTS[0] <= h <= HOST_PORTS[1] for h in hosts)
        # An explicit host port another pod has: 409, and nothing is written.
        before = containers(agent)
        status, _, body = deploy(agent, {"name": "alloc-c", "command": ["sleep", "300"],
                                         "exposed_ports": [{"container": 80, "host": expected}]})
        assert_error(status, body, 409, "conflict", "exposed_ports")
        # An explicit host port a program on the node holds: 409 too.
        status, _, body = deploy(agent, {"name": "alloc-c", "command": ["sleep", "300"],
                                         "exposed_ports": [{"container": 80, "host": busy}]})
        assert_error(status, body, 409, "conflict", "exposed_ports")
        assert set(containers(agent)) <= set(before)
    finally:
        holder.close()
    for name in ("alloc-a", "alloc-b"):
        assert agent.chas_request("DELETE", f"/containers/{name}")[0] == 200


def test_deploy_is_idempotent_and_never_updates(agent: Agent) -> None:
    body = {"name": "idem", "command": ["sleep", "300"], "exposed_ports": [{"container": 7100}],
            "environment": {"A": "1", "B": "2"}}
    status, _, first = deploy(agent, body)
    assert status == 201, first
    reordered = {"environment": {"B": "2", "A": "1"}, "exposed_ports": [{"container": 7100}],
                 "command": ["sleep", "300"], "name": "idem"}
    status, headers, again = deploy(agent, reordered)
    assert status == 200, again
    assert again["id"] == first["id"] and again["ports"] == first["ports"] and "location" not in headers
    status, _, body409 = deploy(agent, {**body, "environment": {"A": "changed"}})
    assert_error(status, body409, 409, "conflict", "name")
    assert containers(agent)["idem"]["id"] == first["id"]
    # While it is being deleted the name stays taken; once it is gone, the same request makes
    # a new container.
    assert agent.chas_request("DELETE", "/containers/idem")[0] == 200
    status, _, fresh = deploy(agent, body)
    if status == 409:
        assert_error(status, fresh, 409, "conflict", "name")
        assert "deleted" in fresh["error"]["message"]
        wait_gone(agent, "idem")
        status, _, fresh = deploy(agent, body)
    assert status == 201 and fresh["id"] != first["id"], fresh
    assert agent.chas_request("DELETE", "/containers/idem")[0] == 200


def test_names_of_pods_made_elsewhere_are_taken(agent: Agent) -> None:
    agent.ctl("run", "grpc-made", "--", "sleep", "300")
    status, _, body = deploy(agent, {"name": "grpc-made", "command": ["sleep", "300"]})
    assert_error(status, body, 409, "conflict", "name")
    listed = containers(agent)["grpc-made"]
    assert listed["image"] is None and listed["status"] in ("pending", "creating", "running")
    # A workload of replicas owns its name too: a deploy must not scale it down.
    multi = {"apiVersion": "v1", "kind": "Pod", "name": "multi", "replicas": 2,
             "spec": {"containers": [{"name": "m", "command": ["sleep", "300"]}]}}
    agent.ctl("apply", "-f", "-", input=json.dumps(multi))
    status, _, body = deploy(agent, {"name": "multi", "command": ["sleep", "300"]})
    assert_error(status, body, 409, "conflict", "name")
    assert {"multi-0", "multi-1"} <= set(containers(agent))
    # A pod of two containers: its logs need ?container=.
    duo = {"apiVersion": "v1", "kind": "Pod", "name": "duo", "spec": {"containers": [
        {"name": "one", "command": ["sh", "-c", "echo from-one; exec sleep 300"]},
        {"name": "two", "command": ["sh", "-c", "echo from-two; exec sleep 300"]}]}}
    agent.ctl("apply", "-f", "-", input=json.dumps(duo))
    status, _, body = agent.chas_request("GET", "/containers/duo/logs")
    assert_error(status, body, 400, "invalid_argument", "query.container")
    wait_for(lambda: agent.chas_request("GET", "/containers/duo/logs?container=two")[2] == b"from-two\n",
             what="the second container's log")
    for name in ("grpc-made", "multi-0", "multi-1", "duo"):
        assert agent.chas_request("DELETE", f"/containers/{name}")[0] == 200


def test_deploy_with_an_image_on_a_node_without_containerd(agent: Agent) -> None:
    status, _, created = deploy(agent, {"image": "nginx:latest", "name": "web-server-1",
                                        "exposed_ports": [{"container": 80, "protocol": "tcp"}],
                                        "resources": {"cpu": "0.5", "memory": "512m"},
                                        "environment": {"ENV_VAR": "value"}})
    assert status == 201, created
    assert created["image"] == "nginx:latest" and created["ports"][0]["container"] == 80
    failed = wait_status(agent, "web-server-1", "error")
    assert failed["reason"]
    assert agent.chas_request("DELETE", f"/containers/{created['id']}")[0] == 200
    wait_gone(agent, "web-server-1")


@pytest.mark.parametrize(("body", "field"), [
    ({"name": "bad", "command": ["true"], "unknown": 1}, "unknown"),
    ({"name": "Bad Name", "command": ["true"]}, "name"),
    ({"name": "bad"}, "image"),
    ({"name": "bad", "command": ["true"], "exposed_ports": [{"container": "80"}]},
     "exposed_ports[0].container"),
    ({"name": "bad", "command": ["true"], "resources": {"memory": "lots"}}, "resources.memory"),
    ({"name": "bad", "command": ["true"], "environment": {"BAD NAME": "x"}}, "environment.BAD NAME"),
    (b"{not json", "body"),
    (b'{"name": "bad", "command": ["true"], "resources": {"cpu": NaN}}', "body"),
    (b"\xff\xfe\x00", "body"),
    (b'["a list"]', "body"),
    (b"", "body"),
])
def test_invalid_bodies_answer_400_and_change_nothing(agent: Agent, body: Any, field: str) -> None:
    before = containers(agent)
    status, _, answer = deploy(agent, body)
    assert_error(status, answer, 400, "invalid_argument", field)
    assert set(containers(agent)) <= set(before)  # pods deleted earlier may leave meanwhile


def test_body_size_and_framing(agent: Agent) -> None:
    token = token_of(agent)
    head = f"POST /containers/deploy HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
    # Over 1 MiB: refused from the Content-Length, before the body is read.
    too_big = f"Content-Type: application/json\r\nContent-Length: {(1 << 20) + 1}\r\n\r\n"
    status, headers, body = parse_raw(raw_exchange(agent, (head + too_big).encode()))
    assert_error(status, body, 413, "too_large", "body")
    assert headers["connection"] == "close"
    # A real oversized body through http.client: the same answer (or the server closes first).
    big = json.dumps({"name": "big", "command": ["true"], "args": ["x" * (1 << 20)]}).encode()
    try:
        status, _, body = deploy(agent, big)
        assert_error(status, body, 413, "too_large")
    except (BrokenPipeError, ConnectionResetError):
        pass
    # Chunked, or no length at all: 411.
    status, _, body = parse_raw(raw_exchange(agent, (head + "Transfer-Encoding: chunked\r\n\r\n"
                                                     "2\r\n{}\r\n0\r\n\r\n").encode()))
    assert_error(status, body, 411, "length_required")
    status, _, body = parse_raw(raw_exchange(agent, (head + "Connection: close\r\n\r\n").encode()))
    assert_error(status, body, 411, "length_required", "Content-Length")
    status, _, body = parse_raw(raw_exchange(agent, (head + "Content-Length: -5\r\n\r\n").encode()))
    assert_error(status, body, 400, "invalid_argument", "Content-Length")
    # A body just under the limit is read and judged on its content.
    padded = json.dumps({"name": "padded", "command": ["true"], "args": ["x" * ((1 << 20) - 100)]}).encode()
    assert len(padded) <= 1 << 20
    status, _, body = deploy(agent, padded)
    assert_error(status, body, 400, "invalid_argument", "body")
    assert "big" not in containers(agent) and "padded" not in containers(agent)


def test_unknown_paths_and_wrong_methods(agent: Agent) -> None:
    for path in ("/", "/nowhere", "/containers/", "/containers/a/b/c", "/containers/x/logs/more"):
        status, _, body = agent.chas_request("GET", path)
        assert_error(status, body, 404, "not_found")
    for method, path, allow in [("PUT", "/containers", "GET"), ("POST", "/containers", "GET"),
                                ("GET", "/containers/deploy", "POST"),
                                ("DELETE", "/containers/deploy", "POST"),
                                ("POST", "/health", "GET"), ("PUT", "/containers/some-id", "DELETE, GET"),
                                ("PATCH", "/containers/some-id", "DELETE, GET"),
                                ("POST", "/containers/some-id/logs", "GET"), ("BREW", "/containers", "GET")]:
        status, headers, body = agent.chas_request(method, path)
        assert_error(status, body, 405, "method_not_allowed")
        assert headers["allow"] == allow
    status, headers, body = agent.chas_request("HEAD", "/health")
    assert status == 405 and headers["allow"] == "GET" and body == b""
    for method, path in [("DELETE", "/containers/no-such-pod"), ("GET", "/containers/no-such-pod/logs"),
                         ("DELETE", "/containers/" + "a" * 300), ("DELETE", "/containers/%00")]:
        status, _, body = agent.chas_request(method, path)
        assert_error(status, body, 404, "not_found", "container_id")


def test_logs_tail_follow_and_their_end(agent: Agent) -> None:
    status, _, created = deploy(agent, {"name": "ticker", "command": ticker_cmd()})
    assert status == 201, created
    wait_status(agent, "ticker", "running")
    logs = f"/containers/{created['id']}/logs"
    wait_for(lambda: agent.chas_request("GET", logs)[2].count(b"\n") >= 5, what="five lines")
    status, _, two = agent.chas_request("GET", logs + "?tail=2")
    assert status == 200 and two.count(b"\n") == 2 and two.startswith(b"tick ")
    assert agent.chas_request("GET", logs + "?tail=0")[2] == b""
    for query, field in [("tail=-1", "query.tail"), ("tail=abc", "query.tail"), ("tail=1.5", "query.tail"),
                         ("follow=maybe", "query.follow"), ("since=yesterday", "query.since"),
                         ("timestamps=maybe", "query.timestamps"), ("since=" + "1" * 65, "query.since"),
                         ("tail=1&tail=2", "query.tail"), ("container=Not_A_Label", "query.container")]:
        status, _, body = agent.chas_request("GET", f"{logs}?{query}")
        assert_error(status, body, 400, "invalid_argument", field)
    status, _, body = agent.chas_request("GET", logs + "?container=other")
    assert_error(status, body, 404, "not_found", "container")
    assert agent.chas_request("GET", logs + "?container=ticker")[0] == 200

    host, port = agent.chas.rsplit(":", 1)
    auth = {"Authorization": f"Bearer {token_of(agent)}"}
    # A follower that goes away: the server carries on.
    gone = http.client.HTTPConnection(host, int(port), timeout=10)
    gone.request("GET", logs + "?follow=true&tail=1", headers=auth)
    assert gone.getresponse().status == 200
    gone.close()
    # A follower that stays: the tail, then new lines as they come, until the pod is deleted.
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", logs + "?follow=true&tail=1", headers=auth)
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Transfer-Encoding") == "chunked"
        assert resp.getheader("Content-Type", "").startswith("text/plain")
        seen = b""
        while seen.count(b"\n") < 6:
            chunk = resp.read1(4096)
            assert chunk, "the stream ended early"
            seen += chunk
        numbers = [int(line.split()[1]) for line in seen.splitlines()[:6]]
        assert numbers == list(range(numbers[0], numbers[0] + 6)), numbers
        assert agent.chas_request("GET", "/health")[0] == 200  # other requests are served meanwhile
        assert agent.chas_request("DELETE", logs.removesuffix("/logs"))[0] == 200
        while resp.read1(65536):
            pass  # ends (chunked terminator) once the pod is gone; a hang fails on the timeout
        assert resp.isclosed()
    finally:
        conn.close()
    wait_gone(agent, "ticker")


def test_keep_alive_survives_errors(agent: Agent) -> None:
    host, port = agent.chas.rsplit(":", 1)
    auth = {"Authorization": f"Bearer {token_of(agent)}", "Content-Type": "application/json"}
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        for _ in range(2):
            conn.request("GET", "/health", headers=auth)
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["status"] in ("healthy", "unhealthy")
        conn.request("POST", "/containers/deploy", body=b"{broken", headers=auth)
        resp = conn.getresponse()
        assert resp.status == 400 and resp.getheader("Connection") is None
        resp.read()
        conn.request("GET", "/containers", headers=auth)
        resp = conn.getresponse()
        assert resp.status == 200 and "containers" in json.loads(resp.read())
        # A body the server does not read (refused before it): the connection is closed after.
        conn.request("POST", "/containers/deploy", body=b'{"name": "x"}',
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 401 and resp.getheader("Connection") == "close"
        resp.read()
    finally:
        conn.close()


def test_protocol_garbage_gets_json_errors_and_the_server_lives(agent: Agent) -> None:
    status, _, body = parse_raw(raw_exchange(agent, b"GET /health HTTP/7.0\r\n\r\n"))
    assert status in (400, 505) and set(body) == {"error"}
    status, _, body = parse_raw(raw_exchange(agent, b"GET /health\r\n\r\n"))  # HTTP/0.9
    assert status == 400 and body["error"]["code"] == "invalid_argument"
    too_many = "".join(f"X-{i}: {i}\r\n" for i in range(150))
    status, _, body = parse_raw(raw_exchange(agent, f"GET /health HTTP/1.1\r\n{too_many}\r\n".encode()))
    assert status == 431 and body["error"]["code"] == "too_large"
    status, _, body = parse_raw(raw_exchange(agent, b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n"))
    assert status == 414 and body["error"]["code"] == "too_large"
    # A client that connects and says nothing, one that sends half a request, and the API still answers.
    host, port = agent.chas.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as idle, \
            socket.create_connection((host, int(port))) as half:
        half.sendall(b"POST /containers/deploy HTTP/1.1\r\nContent-Length: 100\r\n")
        assert agent.chas_request("GET", "/health")[0] == 200
        assert idle.fileno() >= 0


def test_policy_refusal_is_403() -> None:
    a = Agent(CONFIG + "policy:\n  max_memory: 64m\n").start()
    try:
        wait_for(lambda: a.chas_request("GET", "/health")[0] == 200, 30, what="the CHaS API")
        for resources in ({}, {"memory": "128m"}):
            status, _, body = deploy(a, {"name": "hungry", "command": ["sleep", "300"],
                                         "resources": resources})
            assert_error(status, body, 403, "permission_denied", "resources.memory")
            assert "max_memory" in body["error"]["message"]
        assert "hungry" not in containers(a)
        status, _, body = deploy(a, {"name": "modest", "command": ["sleep", "300"],
                                     "resources": {"memory": "32m"}})
        assert status == 201, body
        assert a.chas_request("DELETE", "/containers/modest")[0] == 200
        wait_gone(a, "modest")
    except BaseException:
        a.dump_logs()
        raise
    finally:
        a.close()


def test_stats_and_request_log(agent: Agent) -> None:
    agent.chas_request("GET", "/containers", token=False)
    agent.chas_request("GET", "/health")
    assert deploy(agent, {"name": "counted"})[0] == 400
    assert deploy(agent, {"name": "counted", "command": ["sleep", "300"]})[0] == 201
    assert agent.chas_request("DELETE", "/containers/counted")[0] == 200
    stats = RequestClient(f"ipc://{agent.run_dir}/manager.sock", timeout=5.0, retries=0).call("stats")
    requests = {(r["method"], r["endpoint"], r["status"]): r["count"] for r in stats["requests"]}
    assert requests.get(("GET", "/containers", 401), 0) >= 1
    assert requests.get(("GET", "/health", 200), 0) >= 1
    assert requests.get(("POST", "/containers/deploy", 201), 0) >= 1
    assert all(not e.startswith("/containers/") or e in ("/containers/deploy", "/containers/{container_id}",
                                                          "/containers/{container_id}/logs")
               for _, e, _ in requests), "ids never become endpoint labels"
    assert stats["deployments"]["success"] >= 1 and stats["deployments"]["failure"] >= 1
    assert stats["errors"].get("unauthenticated", 0) >= 1
    assert stats["healthy"] is True
    assert "/containers/{container_id}" in stats["latency"]

    with open(os.path.join(agent.state_dir, "log", "manager.log"), encoding="utf-8") as fh:
        text = fh.read()
    assert token_of(agent) not in text
    lines = [json.loads(line) for line in text.splitlines() if '"riklet.chas"' in line]
    requests_logged = [entry for entry in lines if entry.get("msg") == "request"]
    assert requests_logged
    last = requests_logged[-1]
    assert {"method", "path", "status", "duration_ms"} <= set(last)
    assert all("authorization" not in json.dumps(entry).lower() for entry in requests_logged)


def test_memory_down_is_503_and_unhealthy(agent: Agent) -> None:
    agent.supervisorctl("stop", "riklet:memory")
    try:
        status, _, body = deploy(agent, {"name": "while-down", "command": ["sleep", "300"]})
        assert_error(status, body, 503, "unavailable")
        status, _, health = agent.chas_request("GET", "/health")
        assert status == 200 and health["status"] == "unhealthy"
        assert any(p.startswith("memory") for p in health["problems"])
    finally:
        agent.supervisorctl("start", "riklet:memory")
    wait_for(lambda: agent.chas_request("GET", "/health")[2]["status"] == "healthy", 30, what="healthy again")
    assert "while-down" not in containers(agent)
