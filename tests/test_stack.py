"""The whole agent, really started: supervisord, the four services, rikletctl, real workloads."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest

from tests.stack import Agent, npb, pid_alive
from tests.support import free_port, free_ports, wait_for

pytestmark = pytest.mark.integration

PY = sys.executable


def serve_cmd(port: int) -> list[str]:
    return ["--", PY, "-m", "http.server", "--bind", "127.0.0.1", str(port)]


def test_run_get_logs_delete(agent: Agent) -> None:
    agent.ctl("run", "hello", "--env", "GREETING=hi", "--restart", "Never", "--",
              "sh", "-c", 'echo "$GREETING from riklet"; exec sleep 300')
    pod = agent.wait_phase("hello", "Running")
    for key in ("name", "uid", "phase", "containers", "restartCount", "exitCode", "createdAt",
                "ports", "endpoints"):
        assert key in pod
    [c] = pod["containers"]
    assert c["state"] == "running" and pid_alive(c["pid"])
    wait_for(lambda: "hi from riklet" in agent.ctl("logs", "hello").stdout, what="log line")
    table = agent.ctl("get", "pods").stdout
    assert "hello" in table and "Running" in table

    agent.ctl("delete", "pod", "hello")
    wait_for(lambda: not agent.pods(), what="pod gone")
    wait_for(lambda: not pid_alive(c["pid"]), what="workload process gone")


def fetch(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def test_restarts_keep_workloads_and_records(agent: Agent) -> None:
    port, host = free_ports(2)
    agent.ctl("run", "web", "--port", f"{host}:{port}", *serve_cmd(port))
    agent.ctl("run", "crashy", "--restart", "Always", "--", "sh", "-c", "sleep 0.2; exit 3")
    web = agent.wait_phase("web", "Running")
    wait_for(lambda: agent.pod("crashy")["restartCount"] >= 2, what="crashy restarting")
    pid = web["containers"][0]["pid"]

    def snapshot() -> dict[str, tuple[str, int, int | None]]:
        return {p["name"]: (p["phase"], p["restartCount"], p["containers"][0]["pid"])
                for p in agent.pods() if p["name"] == "web"}

    before = snapshot()
    for service in ("manager", "memory", "monitor", "proxy"):
        old = agent.service_pid(service)
        agent.supervisorctl("restart", f"riklet:{service}")
        assert agent.service_pid(service) != old
        agent.wait_ready()
        assert snapshot() == before, f"after restarting {service}"
        assert wait_for(lambda: fetch(host).startswith(b"HTTP/1.0 200"), 5,
                        what=f"traffic through the proxy after restarting {service}")
    for service in ("manager", "memory", "monitor", "proxy"):
        old = agent.service_pid(service)
        os.kill(old, signal.SIGKILL)
        wait_for(lambda s=service, o=old: agent.statuses().get(s) == "RUNNING"  # type: ignore[misc]
                 and agent.service_pid(s) != o, what=f"{service} back after kill -9")
        agent.wait_ready()
        assert snapshot() == before, f"after kill -9 of {service}"
    assert pid_alive(pid)
    names = sorted(p["name"] for p in agent.pods())
    assert names == ["crashy", "web"]


def test_kill_everything_then_start_again_readopts(agent: Agent) -> None:
    agent.ctl("run", "keeper", "--", "sleep", "600")
    pod = agent.wait_phase("keeper", "Running")
    pid = pod["containers"][0]["pid"]
    victims = [agent.supervisord_pid(), *(agent.service_pid(s) for s in
                                          ("memory", "manager", "monitor", "proxy"))]
    for v in victims:
        os.kill(v, signal.SIGKILL)
    wait_for(lambda: not any(pid_alive(v) for v in victims), what="agent processes dead")
    assert agent.proc is not None
    agent.proc.wait(timeout=10)
    assert pid_alive(pid), "the workload must survive its agent"
    agent.start()
    again = agent.wait_phase("keeper", "Running")
    assert again["uid"] == pod["uid"]
    assert again["containers"][0]["pid"] == pid
    assert again["restartCount"] == pod["restartCount"]
    assert [p["name"] for p in agent.pods()] == ["keeper"]


def test_stop_escalates_to_sigkill_and_apply_starts_again(agent: Agent) -> None:
    agent.ctl("run", "stubborn", "--grace", "1", "--", "sh", "-c", "trap '' TERM; while :; do sleep 1; done")
    pid = agent.wait_phase("stubborn", "Running")["containers"][0]["pid"]
    started = time.monotonic()
    agent.ctl("stop", "stubborn")
    agent.wait_phase("stubborn", "Terminated")
    assert not pid_alive(pid)
    assert time.monotonic() - started < 10
    # the same spec again: the pod runs again, under the same uid
    uid = agent.pod("stubborn")["uid"]
    agent.ctl("run", "stubborn", "--grace", "1", "--", "sh", "-c",
              "trap '' TERM; while :; do sleep 1; done")
    assert agent.wait_phase("stubborn", "Running")["uid"] == uid


def test_memory_limit_kills_and_reports_oom(agent: Agent) -> None:
    hog = "b = bytearray(0)\nwhile True: b += bytearray(8 * 1024 * 1024)"
    agent.ctl("run", "hog", "--memory", "32m", "--restart", "Never", "--", PY, "-c", hog)
    pod = agent.wait_phase("hog", "Error", timeout=30)
    assert pod["reason"] == "OOMKilled"
    assert pod["exitCode"] == 137
    told = wait_for(lambda: [e for e in json.loads(agent.ctl("events", "hog", "-o", "json").stdout)
                             if e["reason"] == "OOMKilled"], 10, what="the OOM kill told")
    assert told[0]["type"] == "Warning" and "lack of memory" in told[0]["message"]


def test_restart_policy_on_failure_counts_restarts(agent: Agent) -> None:
    agent.ctl("run", "flaky", "--restart", "OnFailure", "--", "sh", "-c", "exit 7")
    pod = wait_for(lambda: (p := agent.pod("flaky"))["restartCount"] >= 2 and p, what="restarts")
    assert pod["containers"][0]["exitCode"] == 7 or pod["phase"] in ("Running", "Error")
    agent.ctl("run", "done", "--restart", "OnFailure", "--", "true")
    pod = agent.wait_phase("done", "Terminated")
    assert pod["exitCode"] == 0 and pod["restartCount"] == 0


def test_proxy_forwards_host_port_to_workload(agent: Agent) -> None:
    target, host = free_ports(2)
    agent.ctl("run", "site", "--port", f"{host}:{target}", *serve_cmd(target))
    pod = agent.wait_phase("site", "Running")
    assert pod["endpoints"] == [{"host_port": host, "protocol": "TCP", "address": "127.0.0.1",
                                 "port": target}]

    assert wait_for(lambda: fetch(host).startswith(b"HTTP/1.0 200"), what="a reply through the proxy")
    agent.ctl("delete", "site")
    wait_for(lambda: not agent.pods(), what="pod gone")

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", host), timeout=1).close()
        except OSError:
            return True
        return False
    wait_for(refused, what="the host port closed")


def test_bad_input_is_refused_and_changes_nothing(agent: Agent) -> None:
    agent.ctl("run", "anchor", "--", "sleep", "300")
    agent.wait_phase("anchor", "Running")
    before = agent.pods()
    bad = [
        {"kind": "Pod", "name": "Bad_Name", "spec": {"containers": [{"name": "a", "command": ["x"]}]}},
        {"kind": "Pod", "name": "x", "spec": {"containers": [{"name": "a", "command": []}]}},
        {"kind": "Pod", "name": "x", "spec": {"containers": [{"name": "a", "command": ["x"],
                                                              "resources": {"memory": "lots"}}]}},
        {"kind": "Pod", "name": "x", "spec": {"containers": [{"name": "a", "command": ["x"]},
                                                             {"name": "a", "command": ["y"]}]}},
    ]
    fields = ["name", "spec.containers[0].command", "spec.containers[0].resources.memory",
              "spec.containers[1].name"]
    for doc, field in zip(bad, fields, strict=True):
        res = agent.ctl("apply", "-f", "-", input=json.dumps(doc), check=False)
        assert res.returncode == 1 and field in res.stderr, res.stderr
    res = agent.ctl("apply", "-f", "-", input="{not json", check=False)
    assert res.returncode == 1 and "manifest" in res.stderr
    # a port another program holds
    holder = socket.socket()
    holder.bind(("0.0.0.0", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    res = agent.ctl("run", "clash", "--port", f"{taken}:{free_port()}", "--", "sleep", "5", check=False)
    holder.close()
    assert res.returncode == 1 and str(taken) in res.stderr
    # raw bytes that are not a valid protobuf message, straight to the method
    call = agent.channel.unary_unary("/riklet.v1.Node/Apply")
    with pytest.raises(grpc.RpcError):
        call(b"\xff\xff\xff\xff\x0f", timeout=5)
    with pytest.raises(grpc.RpcError) as err:
        agent.stub.Get(npb.GetRequest(name="../etc"), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        agent.stub.Get(npb.GetRequest(name="nope"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    after = agent.pods()
    assert [(p["name"], p["uid"], p["version"]) for p in after] == \
        [(p["name"], p["uid"], p["version"]) for p in before]
    assert all(s == "RUNNING" for s in agent.statuses().values())


def test_garbage_frames_to_memory_socket(agent: Agent) -> None:
    import zmq

    agent.ctl("run", "anchor", "--", "sleep", "300")
    agent.wait_phase("anchor", "Running")
    before = agent.pods()
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"ipc://{agent.run_dir}/memory.sock")
    garbage = [[b"x"], [b"a", b"b", b"c"], [b"riklet.ipc.v1", b"\x00\xff"],
               [b"riklet.ipc.v1", b'{"v":1,"id":"q","op":"pod.apply","args":{"name":"EVIL"}}'],
               [b"riklet.ipc.v1", b'{"v":1,"id":"r","op":"pod.remove","args":{}}']]
    for frames in garbage:
        sock.send_multipart(frames)
        assert sock.poll(5000), f"no answer to {frames!r}"
        reply = json.loads(sock.recv_multipart()[-1])
        assert reply["ok"] is False and reply["error"]["code"] in ("bad_frame", "invalid_argument")
    sock.close()
    assert agent.pods() == before or [p["name"] for p in agent.pods()] == [p["name"] for p in before]
    assert agent.statuses()["memory"] == "RUNNING"


def test_node_reports_resources(agent: Agent) -> None:
    data = json.loads(agent.ctl("node", "-o", "json").stdout)
    res, rt = data["resources"], data["realtime"]
    assert res["cpu"] == os.cpu_count() and res["memory"] > 0 and res["type"] == "linux"
    assert {"totalCpu", "currentUsage"} <= set(rt["cpu"])
    assert {"totalMemory", "currentUsage"} <= set(rt["memory"])


def test_two_agents_side_by_side(agent: Agent) -> None:
    other = Agent().start()
    try:
        other.ctl("run", "twin", "--", "sleep", "300")
        other.wait_phase("twin", "Running")
        assert [p["name"] for p in agent.pods()] == []
    finally:
        other.close()


def test_rikletctl_unreachable_agent_is_a_clear_error() -> None:
    res = subprocess.run([os.path.join(os.path.dirname(PY), "rikletctl"), "--endpoint",
                          f"127.0.0.1:{free_port()}", "get", "pods"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 3 and "unavailable" in res.stderr


def test_health_reflection_and_watch(agent: Agent) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    health = health_pb2_grpc.HealthStub(agent.channel)
    for service in ("", "riklet.v1.Node"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(agent.channel)
    [answer] = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")]), timeout=5))
    names = {s.name for s in answer.list_services_response.service}
    assert {"riklet.v1.Node", "grpc.health.v1.Health"} <= names

    stream = agent.stub.Watch(npb.WatchRequest(name="watched"), timeout=30)
    agent.ctl("run", "watched", "--", "sleep", "300")
    phases = []
    for ev in stream:
        phases.append(ev.pod.phase)
        if ev.pod.phase == "Running":
            break
    stream.cancel()
    assert phases[0] == "Pending" and "Running" in phases


def test_ctrl_c_stops_the_agent_but_not_the_workloads(agent: Agent) -> None:
    agent.ctl("run", "survivor", "--", "sleep", "600")
    pid = agent.wait_phase("survivor", "Running")["containers"][0]["pid"]
    services = [agent.supervisord_pid(), *(agent.service_pid(s) for s in
                                           ("memory", "manager", "monitor", "proxy"))]
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGINT)
    agent.proc.wait(timeout=30)
    wait_for(lambda: not any(pid_alive(p) for p in services), what="every agent process gone")
    assert pid_alive(pid)
    agent.start()
    assert agent.wait_phase("survivor", "Running")["containers"][0]["pid"] == pid


def scrape(agent: Agent) -> dict[str, float]:
    """Unlabelled samples and histogram buckets of the agent's /metrics, by full sample text."""
    import urllib.request
    with urllib.request.urlopen(f"http://{agent.metrics}/metrics", timeout=5) as resp:
        body = resp.read().decode()
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


@pytest.fixture
def uagent() -> Iterator[Agent]:
    """An agent forwarding in user space: the connect latency histogram is its proxy's."""
    a = Agent("proxy:\n  mode: userspace\n").start()
    try:
        yield a
    finally:
        a.close()


def test_proxy_counters_reach_the_metrics_endpoint(uagent: Agent) -> None:
    agent = uagent
    target, host = free_ports(2)
    agent.ctl("run", "web", "--port", f"{host}:{target}", *serve_cmd(target))
    agent.wait_phase("web", "Running")
    assert wait_for(lambda: fetch(host).startswith(b"HTTP/1.0 200"), what="a reply through the proxy")
    before = wait_for(lambda: (m := scrape(agent)).get("riklet_proxy_up") == 1 and m,
                      what="the proxy's series on /metrics")
    requests = 5
    for _ in range(requests):
        assert fetch(host).startswith(b"HTTP/1.0 200")

    def moved() -> dict[str, float] | None:
        m = scrape(agent)
        done = (m["riklet_proxy_connections_total"] >= before["riklet_proxy_connections_total"] + requests
                and m["riklet_proxy_connect_duration_seconds_count"]
                >= before["riklet_proxy_connect_duration_seconds_count"] + requests)
        return m if done else None
    after = wait_for(moved, what="the proxy's counters moving")
    assert after["riklet_proxy_connections_total"] >= requests + 1
    assert after['riklet_proxy_connect_duration_seconds_bucket{le="+Inf"}'] \
        == after["riklet_proxy_connect_duration_seconds_count"]
    assert after["riklet_proxy_connect_duration_seconds_sum"] > 0
    assert after["riklet_proxy_bytes_out_total"] > before["riklet_proxy_bytes_out_total"]
