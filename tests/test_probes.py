"""Health probes: the spec's validation, single checks, and through a real agent readiness
gating the proxy's traffic, a startup probe holding the liveness probe, and a liveness failure
restarting the container with its reason."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from common import rik
from common.errors import InvalidArgument
from common.model import parse_workload
from services.manager.chas.deploy import container_health, parse_deploy
from services.manager.probes import checks
from tests.stack import Agent
from tests.support import free_port, free_ports, wait_for

PY = sys.executable


def pod_doc(**container: Any) -> dict[str, Any]:
    return {"name": "p", "spec": {"containers": [{"name": "c", "command": ["sleep", "1000"],
                                                  **container}]}}


# -- the spec -----------------------------------------------------------------------------------

def test_a_probe_gets_kubernetes_defaults_and_a_named_port_its_number() -> None:
    doc = pod_doc(ports=[{"port": 8080, "target_port": 8000, "name": "http"}],
                  readinessProbe={"httpGet": {"path": "/healthz", "port": "http"}},
                  livenessProbe={"tcpSocket": {"port": 8000}, "periodSeconds": 5},
                  startupProbe={"exec": {"command": ["true"]}, "failureThreshold": 30})
    c = parse_workload(doc).pods[0][1]["containers"][0]
    assert c["readinessProbe"] == {
        "httpGet": {"path": "/healthz", "port": 8000, "host": None, "scheme": "HTTP", "httpHeaders": []},
        "initialDelaySeconds": 0, "periodSeconds": 10, "timeoutSeconds": 1, "successThreshold": 1,
        "failureThreshold": 3}
    assert c["livenessProbe"]["tcpSocket"]["port"] == 8000 and c["livenessProbe"]["periodSeconds"] == 5
    assert c["startupProbe"]["exec"] == {"command": ["true"]}
    assert "livenessProbe" not in parse_workload(pod_doc()).pods[0][1]["containers"][0]


@pytest.mark.parametrize(("probe", "field"), [
    ({"kind": "readinessProbe", "value": {}}, "spec.containers[0].readinessProbe"),
    ({"kind": "readinessProbe", "value": {"exec": {"command": ["a"]}, "tcpSocket": {"port": 1}}},
     "spec.containers[0].readinessProbe"),
    ({"kind": "livenessProbe", "value": {"httpGet": {"port": "web"}}},
     "spec.containers[0].livenessProbe.httpGet.port"),
    ({"kind": "livenessProbe", "value": {"httpGet": {"port": 80, "path": "healthz"}}},
     "spec.containers[0].livenessProbe.httpGet.path"),
    ({"kind": "livenessProbe", "value": {"tcpSocket": {"port": 70000}}},
     "spec.containers[0].livenessProbe.tcpSocket.port"),
    ({"kind": "livenessProbe", "value": {"exec": {"command": []}}},
     "spec.containers[0].livenessProbe.exec.command"),
    ({"kind": "livenessProbe", "value": {"exec": {"command": ["x"]}, "successThreshold": 2}},
     "spec.containers[0].livenessProbe.successThreshold"),
    ({"kind": "startupProbe", "value": {"exec": {"command": ["x"]}, "periodSeconds": 0}},
     "spec.containers[0].startupProbe.periodSeconds"),
    ({"kind": "readinessProbe", "value": {"exec": {"command": ["x"]}, "timeoutSeconds": 20}},
     "spec.containers[0].readinessProbe.timeoutSeconds"),
    ({"kind": "readinessProbe", "value": {"httpGet": {"port": 80, "httpHeaders": [{"name": "a b"}]}}},
     "spec.containers[0].readinessProbe.httpGet.httpHeaders[0].name"),
    ({"kind": "readinessProbe", "value": {"grpc": {"port": 80}}}, "spec.containers[0].readinessProbe.grpc"),
])
def test_bad_probes_are_refused_naming_the_field(probe: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_workload(pod_doc(**{probe["kind"]: probe["value"]}))
    assert err.value.field == field


def test_the_chas_deploy_body_takes_probes_and_names_a_bad_one() -> None:
    req = parse_deploy({"name": "w", "image": "nginx", "readinessProbe": {"httpGet": {"port": 80}}})
    assert req.document["spec"]["containers"][0]["readinessProbe"] == {"httpGet": {"port": 80}}
    with pytest.raises(InvalidArgument) as err:
        parse_deploy({"name": "w", "image": "nginx", "livenessProbe": {"tcpSocket": {}}})
    assert err.value.field == "livenessProbe.tcpSocket.port"


def test_not_ready_pods_are_not_healthy_to_rik_and_chas() -> None:
    running = {"desired": "running", "status": {"phase": "Running", "ready": True}}
    unready = {"desired": "running", "status": {"phase": "Running", "ready": False,
                                                "containers": [{"name": "c", "started": True}]}}
    starting = {"desired": "running", "status": {"phase": "Running", "ready": False,
                                                 "containers": [{"name": "c", "started": False}]}}
    assert rik.status_of(running) == rik.cpb.RUNNING and rik.status_of(unready) == rik.cpb.CREATING
    assert [container_health(r) for r in (running, unready, starting)] == ["healthy", "unhealthy", "starting"]


# -- single checks --------------------------------------------------------------------------------

@pytest.fixture
def http_server() -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code = 200 if self.path == "/ok" else 302 if self.path == "/moved" else 500
            self.send_response(code)
            self.send_header("X-Seen", self.headers.get("X-Probe", ""))
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def probe(kind: str, **spec: Any) -> dict[str, Any]:
    return {kind: spec, "timeoutSeconds": 1}


def test_http_tcp_and_exec_checks_say_what_failed(http_server: int) -> None:
    closed = free_port()

    async def run(p: dict[str, Any]) -> tuple[bool, str]:
        async def runner(argv: list[str], timeout: float) -> tuple[int, bytes]:
            return (0 if argv == ["true"] else 3), b"not there\n"
        return await checks.run_check(p, "127.0.0.1", runner)

    def http(path: str) -> dict[str, Any]:
        return probe("httpGet", path=path, port=http_server, scheme="HTTP", httpHeaders=[])
    assert asyncio.run(run(http("/ok"))) == (True, "")
    assert asyncio.run(run(http("/moved"))) == (True, "")
    assert asyncio.run(run(http("/broken"))) == (False, "HTTP probe failed with statuscode: 500")
    ok, message = asyncio.run(run(probe("tcpSocket", port=closed)))
    assert not ok and f"127.0.0.1:{closed}" in message and "refused" in message
    assert asyncio.run(run(probe("tcpSocket", port=http_server))) == (True, "")
    assert asyncio.run(run({"exec": {"command": ["true"]}, "timeoutSeconds": 1})) == (True, "")
    assert asyncio.run(run({"exec": {"command": ["check"]}, "timeoutSeconds": 1})) == (
        False, "command 'check' exited with 3: not there")


def test_a_silent_server_times_the_probe_out() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        p = probe("httpGet", path="/", port=listener.getsockname()[1], scheme="HTTP", httpHeaders=[])
        assert asyncio.run(checks.run_check(p, "127.0.0.1", None)) == (False, "timeout: no answer within 1s")


# -- through a real agent --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def probing_agent() -> Iterator[Agent]:
    a = Agent().start()
    try:
        yield a
    finally:
        a.close()


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def ask(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(1000):
            data += chunk
        return data.decode(errors="replace")


SERVER = """
import http.server, os, sys
flag = sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path != "/healthz" or os.path.exists(flag)
        self.send_response(200 if ok else 503)
        self.end_headers()
        self.wfile.write(b"hello from web")
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def apply(agent: Agent, tmp_path: Any, doc: dict[str, Any]) -> None:
    path = tmp_path / f"{doc['name']}.json"
    path.write_text(json.dumps(doc))
    agent.ctl("apply", "-f", str(path))


def test_readiness_gates_the_proxy_traffic(probing_agent: Agent, tmp_path: Any) -> None:
    agent = probing_agent
    host, target = free_ports(2)
    flag = tmp_path / "ready"
    apply(agent, tmp_path, {"name": "web", "spec": {"containers": [{
        "name": "web", "command": [PY, "-c", SERVER, str(target), str(flag)],
        "ports": [{"port": host, "target_port": target, "name": "http"}],
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 1,
                           "failureThreshold": 1}}]}})
    pod = agent.wait_phase("web", "Running")
    assert pod["ready"] is False and pod["containers"][0]["ready"] is False
    assert {"type": "Ready", "status": "False", "reason": "ContainersNotReady",
            "message": "containers with unready status: [web]"} in pod["conditions"]
    row = agent.ctl("get", "pods").stdout.splitlines()[1].split()
    assert row[:3] == ["web", "0/1", "Running"]
    assert refused(host)    # a host port with no ready replica refuses, as a Service without endpoints

    flag.write_text("")
    wait_for(lambda: agent.pod("web")["ready"], timeout=15, what="web ready")
    assert agent.ctl("get", "pods").stdout.splitlines()[1].split()[1] == "1/1"
    assert "hello from web" in wait_for(lambda: ask(host) if not refused(host) else None,
                                        timeout=10, what="traffic through the proxy")

    flag.unlink()
    wait_for(lambda: refused(host), timeout=15, what="the proxy to stop routing to the unready pod")
    assert agent.pod("web")["ready"] is False and agent.pod("web")["phase"] == "Running"
    assert agent.pod("web")["restartCount"] == 0   # readiness never restarts anything


def test_startup_holds_liveness_and_a_liveness_failure_restarts_the_container(
        probing_agent: Agent, tmp_path: Any) -> None:
    agent = probing_agent
    started, trace, sick = tmp_path / "started", tmp_path / "trace", tmp_path / "sick"
    sick.write_text("")      # the liveness probe fails while this file exists
    startup = f"echo try >> {trace}; test -f {started}"
    apply(agent, tmp_path, {"name": "slow", "spec": {"restartPolicy": "Always", "containers": [{
        "name": "app", "command": ["sleep", "1000"],
        "startupProbe": {"exec": {"command": ["sh", "-c", startup]}, "periodSeconds": 1,
                         "failureThreshold": 60},
        # would kill the container at its first run: it must not run before startup passes
        "livenessProbe": {"exec": {"command": ["sh", "-c", f"test ! -f {sick}"]}, "periodSeconds": 1,
                          "failureThreshold": 1},
    }]}})
    agent.wait_phase("slow", "Running")
    wait_for(lambda: trace.exists() and len(trace.read_text().split()) >= 3, timeout=20,
             what="three startup probe attempts")
    pod = agent.pod("slow")
    c = pod["containers"][0]
    assert c["started"] is False and c["ready"] is False and c["restartCount"] == 0
    assert pod["ready"] is False
    first_pid = c["pid"]

    started.write_text("")   # startup passes; the liveness probe now runs, fails, and kills it
    pod = wait_for(lambda: (p := agent.pod("slow"))["containers"][0]["restartCount"] >= 1 and p,
                   timeout=30, what="the container restarted after its liveness failure")
    c = pod["containers"][0]
    assert "Unhealthy" in (c["reason"], c["lastTerminationReason"])
    sick.unlink()            # healthy again: the next run stays

    def running_again() -> dict[str, Any] | None:
        p = agent.pod("slow")
        c = p["containers"][0]
        return p if c["state"] == "running" and c["pid"] != first_pid and c["ready"] else None
    pod = wait_for(running_again, timeout=30, what="the container running again, started and ready")
    c = pod["containers"][0]
    assert c["lastTerminationReason"] == "Unhealthy" and c["started"] is True and pod["ready"] is True
    said = events_of(agent, "slow")
    unhealthy = [m for t, r, m in said if (t, r) == ("Warning", "Unhealthy")]
    assert any(m.startswith("Startup probe failed: command 'sh' exited with 1") for m in unhealthy)
    assert "Liveness probe failed: command 'sh' exited with 1" in unhealthy
    assert ("Normal", "Killing", "Container app failed liveness probe, will be restarted") in said


def events_of(agent: Agent, pod: str) -> list[tuple[str, str, str]]:
    """(type, reason, message) of each event, from `rikletctl events POD -o json`."""
    out = json.loads(agent.ctl("events", pod, "-o", "json").stdout)
    return [(e["type"], e["reason"], e["message"]) for e in out]


# -- in-place resize -------------------------------------------------------------------------------

def cgroup_limits(agent: Agent, pod: str, container: str) -> tuple[str, str]:
    """(cpu, memory) limits of a container's group as the kernel has them."""
    from common import cgroups
    from services.manager.runtime import PodLayout
    group = cgroups.Cgroup(f"{PodLayout(agent.state_dir).cgroup_parent(pod)}/{container}")
    dirs = group.dirs()
    def read(*names: str) -> str:
        for d in dirs:
            for n in names:
                path = os.path.join(d, n)
                if os.path.exists(path):
                    with open(path, encoding="ascii") as fh:
                        return fh.read().strip()
        return "?"
    return read("cpu.max", "cpu.cfs_quota_us"), read("memory.max", "memory.limit_in_bytes")


def test_resize_changes_limits_in_place_and_refuses_below_usage(probing_agent: Agent) -> None:
    agent = probing_agent
    hog = "x = bytearray(48 << 20); import time; time.sleep(1000)"   # holds 48 MiB
    agent.ctl("run", "sized", "--cpu", "0.5", "--memory", "256m", "--", PY, "-c", hog)
    pod = agent.wait_phase("sized", "Running")
    pid, restarts = pod["containers"][0]["pid"], pod["restartCount"]
    assert cgroup_limits(agent, "sized", "sized")[1] == str(256 << 20)

    out = agent.ctl("resize", "sized", "--cpu", "1", "--memory", "128m").stdout
    assert "resized" in out
    wait_for(lambda: cgroup_limits(agent, "sized", "sized")[1] == str(128 << 20), timeout=15,
             what="the new memory limit in the container's cgroup")
    cpu = cgroup_limits(agent, "sized", "sized")[0]
    assert cpu.split()[0] == "100000"      # 1 core of a 100 ms period, in place
    pod = wait_for(lambda: (p := agent.pod("sized"))["containers"][0].get("pid") == pid and p,
                   what="the pod as it was")
    assert pod["restartCount"] == restarts and pod["phase"] == "Running"
    wait_for(lambda: agent.pod("sized")["containers"][0]["resources"] == {
        "cpu_millis": 1000, "memory_bytes": 128 << 20}, what="the limits in effect in the status")
    assert json.loads(agent.ctl("get", "pod", "sized", "-o", "json").stdout)["spec"]["containers"][0][
        "resources"] == {"cpu_millis": 1000, "memory_bytes": 128 << 20}

    # wait until the hog's 48 MiB show as used, then ask for less: refused with the figures
    wait_for(lambda: (agent_usage(agent) or 0) > 40 << 20, what="the container's memory in use")
    low = agent.ctl("resize", "sized", "--memory", "16m", check=False)
    assert low.returncode == 1 and "below what container 'sized' uses now" in low.stderr
    assert "16.0 MiB" in low.stderr
    assert cgroup_limits(agent, "sized", "sized")[1] == str(128 << 20)
    wait_for(lambda: ("Normal", "Resized", "limits set in place: cpu 1000m, memory 128Mi")
             in events_of(agent, "sized"), what="a Resized event")
    bad = agent.ctl("resize", "sized", "-c", "nope", "--cpu", "1", check=False)
    assert bad.returncode == 1 and "no container 'nope'" in bad.stderr


def agent_usage(agent: Agent) -> int | None:
    from services.manager.runtime import PodLayout
    return PodLayout(agent.state_dir).memory_usage("sized", "sized")


def test_a_restarted_manager_keeps_what_the_probes_had_found() -> None:
    """The prober of a manager that restarted starts from the stored status of the same run of
    the container: a ready pod stays ready (and routed) until its probe says otherwise; a new
    run of the container starts not ready, as Kubernetes does."""
    from services.manager.probes import Prober
    from services.manager.runtime import Observed
    probed = {"name": "c", "command": ["x"],
              "readinessProbe": {"tcpSocket": {"port": 1, "host": None}, "initialDelaySeconds": 0,
                                 "periodSeconds": 10, "timeoutSeconds": 1, "successThreshold": 1,
                                 "failureThreshold": 3},
              "startupProbe": {"exec": {"command": ["true"]}, "initialDelaySeconds": 0, "periodSeconds": 10,
                               "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3}}
    running = {"name": "c", "state": "running", "pid": 4242, "startedAt": 100.0}
    record = {"name": "p", "uid": "u", "spec": {"containers": [probed]},
              "status": {"containers": [{**running, "ready": True, "started": True}]}}
    obs = Observed(alive=True, spec_hash="s", stopped=False, lost=False, containers=[running])
    seen = Prober(lambda name: None).adjust(record, obs, "running").containers[0]
    assert (seen["ready"], seen["started"]) == (True, True)
    another_run = Observed(alive=True, spec_hash="s", stopped=False, lost=False,
                           containers=[{**running, "pid": 4243, "startedAt": 200.0}])
    seen = Prober(lambda name: None).adjust(record, another_run, "running").containers[0]
    assert (seen["ready"], seen["started"]) == (False, False)
