"""The monitor as other programs see it: a real `python -m services.monitor` process, real
ZeroMQ, a real HTTP scrape, and a stand-in memory service written from memory's contract."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from common import cgroups, ipc
from common.errors import RikletError
from common.zmqutil import RequestClient
from tests.memory_fake import FakeMemory
from tests.support import free_port, parse_prometheus, wait_for
from tests.test_monitor_sample import GROWER, STEP, make_group

ROOT = Path(__file__).resolve().parents[1]
NODE_ID = "node-639d7"


class Monitor:
    def __init__(self, **env_extra: str) -> None:
        self.base = tempfile.mkdtemp(prefix="rkm", dir="/tmp")
        self.run_dir = os.path.join(self.base, "run")
        self.metrics = f"127.0.0.1:{free_port()}"
        self.endpoint = f"ipc://{self.run_dir}/monitor.sock"
        self.memory_endpoint = f"ipc://{self.run_dir}/memory.sock"
        self.memory_events = f"ipc://{self.run_dir}/memory-events.sock"
        self.log = open(os.path.join(self.base, "monitor.log"), "wb")  # noqa: SIM115 - kept for the test
        env = {k: v for k, v in os.environ.items() if k != "RIKLET_CONFIG"}
        env.update(RIKLET_RUN_DIR=self.run_dir, RIKLET_STATE_DIR=os.path.join(self.base, "state"),
                   RIKLET_METRICS_ADDRESS=self.metrics, NODE_ID=NODE_ID, LOG_LEVEL="DEBUG", **env_extra)
        self.proc = subprocess.Popen([sys.executable, "-m", "services.monitor"], cwd=ROOT, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.client = RequestClient(self.endpoint, timeout=5.0, retries=0)
        probe = RequestClient(self.endpoint, timeout=0.3, retries=0)
        try:
            wait_for(lambda: self.proc.poll() is not None or probe.call("ping"), what="the monitor")
        finally:
            probe.close()
        assert self.proc.poll() is None, self.logs()
        wait_for(lambda: self.http("/healthz")[0] == 200, what="the metrics server")

    def call(self, op: str, **args: Any) -> Any:
        return self.client.call(op, **args)

    def http(self, path: str) -> tuple[int, str, str]:
        try:
            with urllib.request.urlopen(f"http://{self.metrics}{path}", timeout=10) as resp:
                return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()

    def logs(self) -> str:
        return Path(self.base, "monitor.log").read_text(errors="replace")

    def close(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def monitor() -> Iterator[Monitor]:
    m = Monitor()
    try:
        yield m
    finally:
        m.close()


@pytest.fixture
def workload() -> Iterator[subprocess.Popen[bytes]]:
    """A real process standing for a pod's container."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


def records(pid: int) -> list[dict[str, Any]]:
    spec = {"workload": "web", "containers": [
        {"name": "app", "image": None, "command": ["python3", "-m", "http.server"],
         "resources": {"cpu_millis": 500, "memory_bytes": 64 * 1024 * 1024}}]}
    return [
        {"name": "web", "uid": "u-web", "version": 3, "desired": "running", "created_at": 1700000000.1,
         "spec": spec,
         "status": {"phase": "Running", "cgroup": "riklet/ab12cd34/web", "pids": [pid], "restartCount": 2,
                    "internalIp": "127.0.0.1",
                    "containers": [{"name": "app", "state": "running", "pid": pid, "restartCount": 2,
                                    "cgroup": "riklet/ab12cd34/web/app"}]}},
        {"name": 'odd"pod', "uid": "u-odd", "version": 1, "desired": "running", "created_at": 1700000001,
         "spec": {**spec, "workload": "odd"},
         "status": {"phase": "Creating", "pids": [], "containers": []}},
    ]


@pytest.fixture
def memory(monitor: Monitor, workload: subprocess.Popen[bytes]) -> Iterator[FakeMemory]:
    fake = FakeMemory(monitor.memory_endpoint, monitor.memory_events, records(workload.pid))
    try:
        yield fake
    finally:
        fake.close()


@pytest.fixture
def slow_monitor() -> Iterator[Monitor]:
    """A monitor whose full sampling passes are an hour apart: what it measures in between, it
    measured because memory's change stream told it about a pod."""
    m = Monitor(RIKLET_METRIC_RESOLUTION="1h")
    try:
        yield m
    finally:
        m.close()


def error_of(call: Callable[[], Any]) -> RikletError:
    with pytest.raises(RikletError) as info:
        call()
    return info.value


def test_node_resources_and_realtime_answer_without_memory(monitor: Monitor) -> None:
    res = monitor.call("node.resources")
    assert res["id"] == NODE_ID
    assert set(res) == {"id", "cpu", "memory", "disksize", "distrib", "version", "type", "arch",
                        "kernelVersion", "networking"}
    node = monitor.call("node.realtime")
    assert set(node) == {"id", "state", "timestamp", "cpu", "memory", "disks"}
    assert node["id"] == NODE_ID and node["state"] == "RUNNING"


def test_pod_realtime_reads_the_pod_from_memory(monitor: Monitor, memory: FakeMemory) -> None:
    pod = monitor.call("pod.realtime", name="web")
    assert pod["appId"] == "web" and pod["state"] == "RUNNING" and pod["runsOn"] == NODE_ID
    assert pod["restartCount"] == 2 and pod["createdAt"] == 1700000000
    assert pod["deployment"] == {"app": "web", "repository": "python3", "version": ""}
    assert pod["cpu"]["totalCpu"] == 0.5
    assert pod["memory"]["totalMemory"] == 64 * 1024 * 1024
    # Its cgroup does not exist here, so the workload process is what is measured (a pod memory
    # just told about is measured by a catch-up pass, within about 0.1 s).
    measured = wait_for(lambda: (p := monitor.call("pod.realtime", name="web"))["memory"]["freeMemory"]
                        < 64 * 1024 * 1024 and p, 5, what="the new pod measured")
    assert 0 < measured["memory"]["totalMemory"] - measured["memory"]["freeMemory"] < 64 * 1024 * 1024


def test_pods_realtime_lists_every_pod(monitor: Monitor, memory: FakeMemory) -> None:
    pods = monitor.call("pods.realtime")["pods"]
    assert sorted(p["appId"] for p in pods) == ['odd"pod', "web"]
    assert {p["appId"]: p["state"] for p in pods} == {"web": "RUNNING", 'odd"pod': "CREATING"}


def test_an_unknown_pod_is_not_found_naming_args_name(monitor: Monitor, memory: FakeMemory) -> None:
    err = error_of(lambda: monitor.call("pod.realtime", name="nope"))
    assert (err.code.value, err.field) == ("not_found", "args.name")
    assert "nope" in err.message


@pytest.mark.parametrize(("op", "args", "field"), [
    ("pod.realtime", {}, "args.name"),
    ("pod.realtime", {"name": 7}, "args.name"),
    ("node.realtime", {"verbose": True}, "args.verbose"),
    ("node.reboot", {}, "op"),
])
def test_bad_requests_are_refused_naming_the_field(monitor: Monitor, op: str, args: dict[str, Any],
                                                   field: str) -> None:
    err = error_of(lambda: monitor.call(op, **args))
    assert (err.code.value, err.field) == ("invalid_argument", field)


def test_garbage_frames_get_error_replies(monitor: Monitor) -> None:
    sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(monitor.endpoint)
    try:
        cases: list[tuple[list[bytes], str]] = [
            ([b"junk"], "frames"),
            ([b"not-magic", b"{}"], "frames[0]"),
            ([ipc.MAGIC, b"\xff{not json"], "body"),
            ([ipc.MAGIC, json.dumps({"v": 99, "id": "x", "op": "node.realtime"}).encode()], "body.v"),
            ([ipc.MAGIC, json.dumps({"v": 1, "id": "x", "op": "pod.realtime", "args": []}).encode()],
             "body.args"),
        ]
        for frames, field in cases:
            sock.send_multipart(frames)
            assert sock.poll(5000), f"no reply to {frames!r}"
            reply = ipc.decode_reply(sock.recv_multipart())
            assert not reply.ok and reply.error is not None
            assert (reply.error["code"], reply.error.get("field")) == ("bad_frame", field)
    finally:
        sock.close()
    assert monitor.call("ping")["pong"] is True, "the monitor survives garbage"


def parse_exposition(text: str) -> dict[str, dict[str, float]]:
    """Prometheus text format 0.0.4 into {name: {labels: value}}; fails on any malformed line."""
    return parse_prometheus(text)[1]


def test_metrics_endpoint_serves_prometheus_text(monitor: Monitor, memory: FakeMemory) -> None:
    status, ctype, body = monitor.http("/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    samples = parse_exposition(body)
    assert {"riklet_node_cpu_usage_ratio", "riklet_node_memory_total_bytes",
            "riklet_node_memory_available_bytes", "riklet_node_disk_total_bytes",
            "riklet_node_disk_used_bytes", "riklet_node_disk_available_bytes",
            "riklet_pod_cpu_usage_ratio", "riklet_pod_memory_usage_bytes", "riklet_pod_restarts_total",
            "riklet_pods", "riklet_monitor_scrape_errors_total"} <= set(samples)
    assert 0 <= samples["riklet_node_cpu_usage_ratio"][""] <= 1
    memory = samples["riklet_node_memory_available_bytes"][""]
    assert 0 < memory <= samples["riklet_node_memory_total_bytes"][""]
    assert samples["riklet_pod_restarts_total"] == {'{pod="web"}': 2, '{pod="odd\\"pod"}': 0}
    assert samples["riklet_pods"]['{phase="running"}'] == 1
    assert samples["riklet_pods"]['{phase="creating"}'] == 1
    assert samples["riklet_monitor_scrape_errors_total"] == {"": 0}


def test_http_answers_only_known_paths_and_survives_bad_requests(monitor: Monitor) -> None:
    assert monitor.http("/healthz")[:1] == (200,)
    assert monitor.http("/nope")[0] == 404
    host, port = monitor.metrics.rsplit(":", 1)
    for garbage in (b"\x00\x01\x02 nonsense\r\n\r\n", b"GET\r\n\r\n", b"BREW /metrics HTTP/1.1\r\n\r\n"):
        with socket.create_connection((host, int(port)), timeout=5) as conn:
            conn.sendall(garbage)
            answer = conn.recv(4096)
            # A one-word request line is HTTP/0.9, answered without a status line: look for the code.
            assert b"400" in answer or b"501" in answer, answer
    assert monitor.http("/metrics")[0] == 200


def test_memory_down_makes_pod_ops_unavailable_but_not_node_ops(monitor: Monitor) -> None:
    for op, args in (("pod.realtime", {"name": "web"}), ("pods.realtime", {})):
        err = error_of(functools.partial(monitor.call, op, **args))
        assert err.code.value == "unavailable"
    assert monitor.call("node.realtime")["state"] == "RUNNING"
    status, _, body = monitor.http("/metrics")
    assert status == 200
    samples = parse_exposition(body)
    assert samples["riklet_monitor_scrape_errors_total"][""] >= 1
    assert "riklet_pod_cpu_usage_ratio" not in samples, "no pod series without memory"
    assert "riklet_node_cpu_usage_ratio" in samples


def test_socket_is_private_and_sigterm_exits_cleanly(monitor: Monitor) -> None:
    path = monitor.endpoint[len("ipc://"):]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(monitor.run_dir).st_mode) == 0o700
    monitor.proc.send_signal(signal.SIGTERM)
    assert monitor.proc.wait(timeout=10) == 0, monitor.logs()
    assert not os.path.exists(path)


def test_pods_come_and_go_with_memorys_change_stream(slow_monitor: Monitor,
                                                     workload: subprocess.Popen[bytes]) -> None:
    monitor = slow_monitor
    memory = FakeMemory(monitor.memory_endpoint, monitor.memory_events, records(workload.pid))
    try:
        def names() -> list[str]:
            return sorted(p["appId"] for p in monitor.call("pods.realtime")["pods"])

        def scraped() -> set[str]:
            return set(parse_exposition(monitor.http("/metrics")[2])["riklet_pod_memory_usage_bytes"])

        wait_for(lambda: names() == ['odd"pod', "web"], 5, what="memory's pods")
        memory.put({**records(workload.pid)[0], "name": "late", "uid": "u-late"})
        late = wait_for(lambda: (p := monitor.call("pod.realtime", name="late"))["memory"]["freeMemory"]
                        < 64 * 1024 * 1024 and p, 5, what="the new pod measured between full passes")
        assert late["state"] == "RUNNING"
        assert '{pod="late"}' in scraped()
        memory.remove("web")
        wait_for(lambda: names() == ["late", 'odd"pod'], 5, what="the removed pod dropped")
        assert '{pod="web"}' not in scraped()
        assert error_of(lambda: monitor.call("pod.realtime", name="web")).code.value == "not_found"
        assert "pod.list" not in memory.requests, "pods come from the change stream, not from listing"
        assert memory.requests["snapshot"] <= 2, "one snapshot (and another, were an event lost)"
    finally:
        memory.close()


def test_a_scrape_serves_the_last_sample_not_the_cgroup_now(slow_monitor: Monitor) -> None:
    """Between full passes (an hour apart here) the pod's figures stay those of its sample,
    however its cgroup changes: no request reads the cgroup."""
    monitor, relpath = slow_monitor, f"riklet-test/scrape-{uuid.uuid4().hex[:8]}"
    app = make_group(f"{relpath}/app")
    proc = subprocess.Popen([sys.executable, "-c", GROWER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            preexec_fn=lambda: app.add(os.getpid()))
    assert proc.stdin is not None and proc.stdout is not None
    memory = None
    try:
        assert proc.stdout.readline() == b"ok\n"
        rec = records(proc.pid)[0]
        rec["status"]["cgroup"] = relpath
        memory = FakeMemory(monitor.memory_endpoint, monitor.memory_events, [rec])

        def used() -> float:
            scraped = parse_exposition(monitor.http("/metrics")[2])
            return scraped["riklet_pod_memory_usage_bytes"]['{pod="web"}']

        first = wait_for(used, 5, what="the pod measured")
        proc.stdin.write(b"more\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"ok\n"
        assert cgroups.Cgroup(relpath).usage().memory_bytes >= first + STEP * 0.9, "the group did grow"
        assert used() == first
        pod = monitor.call("pod.realtime", name="web")
        assert pod["memory"]["totalMemory"] - pod["memory"]["freeMemory"] == first
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if memory is not None:
            memory.close()
        cgroups.prune(relpath)
