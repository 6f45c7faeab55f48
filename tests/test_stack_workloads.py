"""Workload features through the real stack: YAML, replicas, logs rotation and follow."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
import yaml

from tests.stack import Agent
from tests.support import free_port, wait_for

pytestmark = pytest.mark.integration

PY = sys.executable


@pytest.fixture
def small_logs_agent() -> Iterator[Agent]:
    a = Agent("logs:\n  max_size: 64k\n  max_files: 3\n").start()
    try:
        yield a
    finally:
        a.close()


def test_logs_rotate_and_stay_bounded(small_logs_agent: Agent) -> None:
    agent = small_logs_agent
    writer = "import sys\nfor i in range(20000): print(f'line {i:06d} ' + 'x' * 60)\nsys.stdout.flush()\n"
    agent.ctl("run", "chatty", "--restart", "Never", "--", PY, "-c", writer)
    agent.wait_phase("chatty", "Terminated", timeout=30)
    logdir = os.path.join(agent.state_dir, "pods", "chatty", "logs")
    files = sorted(f for f in os.listdir(logdir) if not f.endswith(".times"))
    assert files == ["chatty.log", "chatty.log.1", "chatty.log.2"]
    indexes = sorted(f for f in os.listdir(logdir) if f.endswith(".times"))
    assert indexes == sorted(f"{f}.times" for f in files)
    assert sum(os.path.getsize(os.path.join(logdir, f)) for f in files) <= 3 * 64 * 1024
    last = agent.ctl("logs", "chatty", "--tail", "2").stdout.splitlines()
    assert [line.split()[1] for line in last] == ["019998", "019999"]


def test_logs_follow_streams_new_output(agent: Agent) -> None:
    agent.ctl("run", "ticker", "--", "sh", "-c", "i=0; while :; do echo tick $i; i=$((i+1)); sleep 0.2; done")
    agent.wait_phase("ticker", "Running")
    proc = subprocess.Popen([os.path.join(os.path.dirname(PY), "rikletctl"), "logs", "-f", "ticker"],
                            env=agent.env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        seen = [proc.stdout.readline() for _ in range(5)]
        assert all(line.startswith("tick ") for line in seen)
        numbers = [int(line.split()[1]) for line in seen]
        assert numbers == sorted(numbers) and numbers[-1] > numbers[0]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_yaml_replicas_balance_and_scale_down(agent: Agent, tmp_path) -> None:  # type: ignore[no-untyped-def]
    host = free_port()
    responder = ("import os, socket\ns = socket.socket()\n"
                 "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                 "s.bind(('127.0.0.1', int(os.environ['PORT']))); s.listen()\n"
                 "while True:\n    c, _ = s.accept(); c.sendall(os.environ['REPLICA'].encode()); c.close()\n")
    doc = {"apiVersion": "v1", "kind": "Pod", "name": "echo", "replicas": 3,
           "spec": {"containers": [{"name": "echo", "command": [PY, "-c", responder],
                                    "env": [{"name": "REPLICA", "value": "any"}],
                                    "ports": {"port": host, "target_port": 0}}]}}
    manifest = tmp_path / "echo.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    agent.ctl("apply", "-f", str(manifest))
    for i in range(3):
        agent.wait_phase(f"echo-{i}", "Running")

    def ask() -> str:
        with socket.create_connection(("127.0.0.1", host), timeout=2) as s:
            return s.recv(100).decode()
    wait_for(lambda: ask() == "any", what="a reply through the proxy")
    targets = {e["port"] for i in range(3) for e in agent.pod(f"echo-{i}")["endpoints"]}
    assert len(targets) == 3, "each replica has its own allocated port"

    doc["replicas"] = 1
    manifest.write_text(yaml.safe_dump(doc))
    agent.ctl("apply", "-f", str(manifest))
    wait_for(lambda: sorted(p["name"] for p in agent.pods()) == ["echo"], timeout=30,
             what="scaled down to one pod")
    agent.wait_phase("echo", "Running")
    wait_for(lambda: ask() == "any", what="still served after scaling down")


@pytest.mark.integration
def test_workloads_run_unprivileged_by_default() -> None:
    agent = Agent()
    del agent.env["RIKLET_WORKLOAD_USER"]
    try:
        agent.start()
        agent.ctl("run", "who", "--restart", "Never", "--", "sh", "-c", "id -u; id -g; exec sleep 300")
        agent.wait_phase("who", "Running")
        wait_for(lambda: agent.ctl("logs", "who").stdout.split() == ["65534", "65534"], 10,
                 "the workload's uid and gid")
    finally:
        agent.close()
