"""The proxy's data paths through the real stack: kernel mode (nftables DNAT) end to end, kill -9
of every proxy process under load, and a second "host" (a network namespace on a veth pair)
reaching a pod through its host port in both modes."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from services.proxy.kernel import nft
from tests.stack import Agent, session_processes
from tests.support import host_ports, need, wait_for


def free_port() -> int:
    return host_ports(1)[0]   # a host port the kernel DNATs, with no flows of earlier tests


PY = sys.executable
KERNEL = "proxy:\n  mode: kernel\n"
USERSPACE = "proxy:\n  mode: userspace\n  bind_address: 0.0.0.0\n"
# An HTTP server on $PORT answering every GET with its pid.
HTTP_POD = ("import os, http.server\n"
            "class H(http.server.BaseHTTPRequestHandler):\n"
            "    def do_GET(self):\n"
            "        body = str(os.getpid()).encode()\n"
            "        self.send_response(200); self.send_header('Content-Length', str(len(body)))\n"
            "        self.end_headers(); self.wfile.write(body)\n"
            "    def log_message(self, *a): pass\n"
            "http.server.ThreadingHTTPServer(('127.0.0.1', int(os.environ['PORT'])), H).serve_forever()\n")


def get(port: int, host: str = "127.0.0.1", timeout: float = 2.0) -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/", timeout=timeout) as resp:
        return str(resp.read().decode())


def chains(agent: Agent) -> set[str]:
    items = nft.listing(agent.kernel_table) or []
    return {i["chain"]["name"] for i in items if "chain" in i}


def run_http(agent: Agent, tmp_path: Any, name: str, host: int, replicas: int = 1) -> list[str]:
    doc = {"apiVersion": "v1", "kind": "Pod", "name": name, "replicas": replicas,
           "spec": {"containers": [{"name": "web", "command": [PY, "-c", HTTP_POD],
                                    "ports": {"port": host, "target_port": 0}}]}}
    manifest = tmp_path / f"{name}.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    agent.ctl("apply", "-f", str(manifest))
    names = [name] if replicas == 1 else [f"{name}-{i}" for i in range(replicas)]
    for n in names:
        agent.wait_phase(n, "Running")
    return names


def agent_with(config: str) -> Iterator[Agent]:
    need(nft.unavailable() is None, f"the kernel data path: {nft.unavailable()}")
    a = Agent(config).start()
    try:
        yield a
    finally:
        a.close()
    assert nft.listing(a.kernel_table) is None, "the test's table is gone"


@pytest.fixture
def kagent() -> Iterator[Agent]:
    yield from agent_with(KERNEL)


@pytest.fixture
def uagent() -> Iterator[Agent]:
    yield from agent_with(USERSPACE)


def metrics(agent: Agent) -> str:
    with urllib.request.urlopen(f"http://{agent.metrics}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


@pytest.mark.integration
def test_kernel_mode_forwards_balances_counts_and_removes_a_deleted_pods_rules(
        kagent: Agent, tmp_path: Any) -> None:
    host, other = host_ports(2)
    run_http(kagent, tmp_path, "web", host, replicas=2)
    run_http(kagent, tmp_path, "solo", other)
    wait_for(lambda: get(host), 10, what="a reply through the kernel")
    pids = {c["pid"] for n in ("web-0", "web-1") for c in kagent.pod(n)["containers"]}
    seen = Counter(int(get(host)) for _ in range(100))
    assert set(seen) <= pids and len(seen) == 2, seen
    # The kernel carries it: nothing of ours listens on the host port.
    with socket.socket() as s:
        s.bind(("0.0.0.0", host))
    assert f"svc_tcp_{host}" in chains(kagent)
    # The mode and the counters, in rikletctl node and in the metrics.
    node = kagent.ctl("node").stdout
    assert "proxy: kernel mode (proxy.mode is kernel), 2 host ports, 3/3 endpoints ready" in node, node
    text = wait_for(lambda: (m := metrics(kagent)) and f'port="{host}"' in m and m, 10, what="metrics")
    assert 'riklet_proxy_mode{mode="kernel"} 1.0' in text
    assert 'riklet_proxy_mode{mode="userspace"} 0.0' in text
    line = next(x for x in text.splitlines() if x.startswith("riklet_proxy_port_packets_total")
                and f'port="{host}"' in x and 'direction="in"' in x)
    assert float(line.split()[-1]) >= 500, line     # ~6 packets per request, 100 requests
    # Deleting a pod removes its rules; the other's stay.
    kagent.ctl("delete", "pod", "solo")
    wait_for(lambda: not any(f"_{other}" in c for c in chains(kagent)), 15, what="solo's rules gone")
    assert f"svc_tcp_{host}" in chains(kagent)
    with pytest.raises(OSError):
        get(other, timeout=1)


class Client:
    """A loop of HTTP requests (a new connection each), counting failures."""

    def __init__(self, port: int) -> None:
        self.port, self.done, self.failed = port, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Client:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                get(self.port)
                self.done += 1
            except OSError:
                self.failed += 1


@pytest.mark.integration
def test_kill_9_of_the_keeper_and_the_worker_refuses_nothing(kagent: Agent, tmp_path: Any) -> None:
    host = free_port()
    run_http(kagent, tmp_path, "web", host, replicas=2)
    wait_for(lambda: get(host), 10, what="a reply through the kernel")
    wait_for(lambda: len(kagent.proxy_workers()) == 1, 10, what="one proxy worker")
    keeper, [worker] = kagent.service_pid("proxy"), list(kagent.proxy_workers())
    with Client(host) as client:
        wait_for(lambda: client.done > 20, 10, what="requests before the kill")
        os.kill(worker, signal.SIGKILL)
        os.kill(keeper, signal.SIGKILL)
        killed = client.done
        wait_for(lambda: kagent.statuses().get("proxy") == "RUNNING"
                 and kagent.service_pid("proxy") != keeper, 20, what="a new keeper")
        wait_for(lambda: (w := list(kagent.proxy_workers())) and worker not in w, 10, what="a new worker")
        wait_for(lambda: "kernel mode" in kagent.ctl("node").stdout, 10, what="the new worker's stats")
        wait_for(lambda: client.done > killed + 50, 10, what="requests after the restart")
    print(f"kill -9 of keeper and worker: {client.done} requests, {client.failed} failed")
    assert client.failed == 0


# --- a second host --------------------------------------------------------------------------------

class OtherHost:
    """A network namespace joined to this one by a veth pair: another machine on a /30."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.ns, self.outer, self.inner = f"rkt{tag}", f"rka{tag}", f"rkb{tag}"
        net = random.randrange(0, 250)
        self.node_ip, self.peer_ip = f"10.251.{net}.1", f"10.251.{net}.2"
        for cmd in (["ip", "netns", "add", self.ns],
                    ["ip", "link", "add", self.outer, "type", "veth", "peer", "name", self.inner],
                    ["ip", "link", "set", self.inner, "netns", self.ns],
                    ["ip", "addr", "add", f"{self.node_ip}/30", "dev", self.outer],
                    ["ip", "link", "set", self.outer, "up"],
                    ["ip", "-n", self.ns, "addr", "add", f"{self.peer_ip}/30", "dev", self.inner],
                    ["ip", "-n", self.ns, "link", "set", self.inner, "up"],
                    ["ip", "-n", self.ns, "link", "set", "lo", "up"]):
            subprocess.run(cmd, check=True, capture_output=True, timeout=10)

    def get(self, port: int) -> str:
        code = (f"import urllib.request; print(urllib.request.urlopen('http://{self.node_ip}:{port}/', "
                "timeout=2).read().decode())")
        res = subprocess.run(["ip", "netns", "exec", self.ns, PY, "-c", code], capture_output=True,
                             text=True, timeout=15)
        return res.stdout.strip() if res.returncode == 0 else ""

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.outer], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True, timeout=10)


@pytest.fixture
def other_host() -> Iterator[OtherHost]:
    need(subprocess.run(["ip", "netns", "list"], capture_output=True).returncode == 0, "ip netns")
    h = OtherHost()
    yield h
    h.close()


@pytest.fixture(params=["kernel", "userspace"])
def any_agent(request: pytest.FixtureRequest) -> Iterator[tuple[str, Agent]]:
    for agent in agent_with(KERNEL if request.param == "kernel" else USERSPACE):
        yield request.param, agent


@pytest.mark.integration
def test_another_host_reaches_a_pod_through_its_host_port(
        any_agent: tuple[str, Agent], other_host: OtherHost, tmp_path: Any) -> None:
    mode, agent = any_agent
    host = free_port()
    [name] = run_http(agent, tmp_path, "web", host)
    pid = str(agent.pod(name)["containers"][0]["pid"])
    wait_for(lambda: get(host) == pid, 10, what="a local reply")
    answer = wait_for(lambda: other_host.get(host), 15, what="a reply to the other host")
    assert answer == pid
    assert f"proxy: {mode} mode" in agent.ctl("node").stdout


def test_auto_picks_the_kernel_where_nftables_works_and_leaves_no_scratch_table() -> None:
    from services.proxy.kernel import mode
    need(nft.unavailable() is None, f"the kernel data path: {nft.unavailable()}")
    assert mode.choose("userspace") == ("userspace", "proxy.mode is userspace")
    assert mode.choose("auto")[0] == "kernel" and mode.choose("kernel")[0] == "kernel"
    assert "riklet_probe_" not in subprocess.run(["nft", "list", "tables"], capture_output=True,
                                                 text=True).stdout


@pytest.mark.integration
def test_switching_to_userspace_retires_the_kernel_rules_without_a_gap(kagent: Agent, tmp_path: Any) -> None:
    host = free_port()
    [name] = run_http(kagent, tmp_path, "web", host)
    pid = str(kagent.pod(name)["containers"][0]["pid"])
    wait_for(lambda: get(host) == pid, 10, what="a reply through the kernel")
    assert f"svc_tcp_{host}" in chains(kagent)
    with open(kagent.config, "w", encoding="utf-8") as fh:
        fh.write(USERSPACE)
    with Client(host) as client:
        kagent.supervisorctl("restart", "riklet:proxy")
        wait_for(lambda: not any(c.startswith("svc_") for c in chains(kagent)), 15,
                 what="the kernel table's rules retired")
        wait_for(lambda: client.done > 50, 10, what="requests in user space")
    assert client.failed == 0
    assert "proxy: userspace mode" in kagent.ctl("node").stdout
    with pytest.raises(OSError), socket.socket() as s:
        s.bind(("0.0.0.0", host))          # the user-space proxy holds the port now


@pytest.mark.integration
def test_kill_9_of_the_whole_agent_refuses_nothing_and_the_next_start_reconciles(
        kagent: Agent, tmp_path: Any) -> None:
    host = free_port()
    run_http(kagent, tmp_path, "web", host, replicas=2)
    wait_for(lambda: get(host), 10, what="a reply through the kernel")
    sid = kagent.supervisord_pid()
    with Client(host) as client:
        wait_for(lambda: client.done > 20, 10, what="requests before the kill")
        for pid in session_processes(sid):          # supervisord, the services, the proxy worker
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert kagent.proc is not None
        kagent.proc.wait(10)
        wait_for(lambda: not session_processes(sid), 10, what="every agent process gone")
        down = client.done
        wait_for(lambda: client.done > down + 100, 10, what="requests with no agent at all")
        kagent.start()
        kagent.wait_phase("web-0", "Running")
        wait_for(lambda: "kernel mode" in kagent.ctl("node").stdout, 15, what="the new proxy")
        after = client.done
        wait_for(lambda: client.done > after + 50, 10, what="requests after the restart")
    print(f"kill -9 of the whole agent: {client.done} requests, {client.failed} failed")
    assert client.failed == 0


@pytest.fixture
def fast_health() -> Iterator[Agent]:
    yield from agent_with(KERNEL + "  health_interval: 200ms\n  health_timeout: 200ms\n  health_fall: 2\n")


# The first replica to take the lock file serves HTTP; the other runs but refuses connections.
ONE_SERVES = ("import os, sys, time\n"
              "try:\n    os.close(os.open(sys.argv[1], os.O_CREAT | os.O_EXCL))\n"
              "except FileExistsError:\n    time.sleep(3600)\n" + HTTP_POD)


@pytest.mark.integration
def test_a_replica_that_refuses_leaves_the_kernel_map_within_the_fall_time(
        fast_health: Agent, tmp_path: Any) -> None:
    agent, host = fast_health, free_port()
    doc = {"apiVersion": "v1", "kind": "Pod", "name": "web", "replicas": 2,
           "spec": {"containers": [{"name": "web", "command": [PY, "-c", ONE_SERVES, str(tmp_path / "lock")],
                                    "ports": {"port": host, "target_port": 0}}]}}
    (tmp_path / "web.yaml").write_text(yaml.safe_dump(doc))
    agent.ctl("apply", "-f", str(tmp_path / "web.yaml"))
    pods = [agent.wait_phase(f"web-{i}", "Running") for i in range(2)]
    started = time.monotonic()
    wait_for(lambda: os.path.exists(tmp_path / "lock"), 10, what="one replica serving")
    ports = {p["endpoints"][0]["port"] for p in pods}
    assert len(ports) == 2
    in_map = {p for p in ports if f"ep_tcp_{host}__127.0.0.1_{p}" in chains(agent)}
    assert in_map == ports or len(in_map) == 1
    left = wait_for(lambda: (m := {p for p in ports if f"ep_tcp_{host}__127.0.0.1_{p}" in chains(agent)})
                    and len(m) == 1 and m, 10, what="the refusing replica out of the map", interval=0.01)
    took = time.monotonic() - started
    print(f"refusing replica out of the kernel map {took * 1000:.0f} ms after both ran "
          "(interval 200 ms, timeout 200 ms, fall 2)")
    assert took < 2.0
    pids = {str(c["pid"]) for p in pods for c in p["containers"]}
    answers = {get(host) for _ in range(50)}
    assert len(answers) == 1 and answers <= pids
    assert "1/2 endpoints ready" in agent.ctl("node").stdout
    assert left
