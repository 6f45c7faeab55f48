"""The manager's metrics as the monitor reads them (services.manager.telemetry): Node API
latency by method and status code from a real gRPC server, pod start latency once per pod,
probe results; and how /metrics shows them."""

from __future__ import annotations

from concurrent import futures
from typing import Any

import grpc
import pytest

from services.manager.chas.stats import ChasStats
from services.manager.telemetry import Telemetry
from services.monitor import prom
from tests.support import parse_prometheus

NODE: Any = {"cpu": {"currentUsage": 0.0}, "memory": {"totalMemory": 1, "freeMemory": 1}, "disks": []}


def scraped(telemetry: Telemetry, chas: ChasStats | None = None) -> dict[str, dict[str, float]]:
    stats = {**(chas or ChasStats()).snapshot(), "manager": telemetry.snapshot()}
    return parse_prometheus(prom.render(NODE, [], 0, manager=stats))[1]


def test_node_api_calls_are_timed_by_method_and_status_code() -> None:
    telemetry = Telemetry()

    def get(request: bytes, context: grpc.ServicerContext) -> bytes:
        if request == b"missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such pod")
        return request

    handler = grpc.method_handlers_generic_handler("riklet.v1.Node", {
        "Get": grpc.unary_unary_rpc_method_handler(get)})
    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[telemetry.interceptor()],
                         handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/riklet.v1.Node/Get")
            assert call(b"web", timeout=5) == b"web"
            assert call(b"web", timeout=5) == b"web"
            with pytest.raises(grpc.RpcError) as raised:
                call(b"missing", timeout=5)
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        server.stop(None)
    counts = scraped(telemetry)["riklet_node_api_request_duration_seconds_count"]
    assert counts == {'{code="OK",method="riklet.v1.Node/Get"}': 2,
                      '{code="NOT_FOUND",method="riklet.v1.Node/Get"}': 1}


def test_a_pod_start_counts_once_from_its_apply_to_its_first_running() -> None:
    now = [1000.0]
    telemetry = Telemetry(clock=lambda: now[0])
    record = {"name": "web", "uid": "u1", "created_at": 997.5,
              "spec": {"containers": [{"name": "c", "runtime": "containerd"}]}}
    telemetry.pod_status(record, {"phase": "Pending"}, {"phase": "Creating"})
    telemetry.pod_status(record, {"phase": "Creating"}, {"phase": "Running"})
    now[0] = 1100.0   # a crash and a restart later: not a start again
    telemetry.pod_status(record, {"phase": "Running"}, {"phase": "Error"})
    telemetry.pod_status(record, {"phase": "Error"}, {"phase": "Running"})
    samples = scraped(telemetry)
    assert samples["riklet_pod_start_duration_seconds_count"] == {'{runtime="containerd"}': 1}
    assert samples["riklet_pod_start_duration_seconds_sum"] == {'{runtime="containerd"}': 2.5}
    assert samples["riklet_pod_start_duration_seconds_bucket"]['{le="2.5",runtime="containerd"}'] == 1


def test_probe_results_by_kind_and_result_and_chas_latency_by_method_route_and_code() -> None:
    telemetry = Telemetry()
    telemetry.probe("readinessProbe", True, 0.002)
    telemetry.probe("livenessProbe", False, 1.0)
    chas = ChasStats()
    chas.request("GET", "/health", 200, 0.003)
    chas.request("POST", "/containers", 400, 0.02)
    samples = scraped(telemetry, chas)
    results = samples["riklet_probe_results_total"]
    assert results['{kind="readiness",result="success"}'] == 1
    assert results['{kind="liveness",result="failure"}'] == 1
    assert results['{kind="startup",result="success"}'] == 0    # every kind shows, 0 until one ran
    assert samples["riklet_probe_duration_seconds_count"] == {'{kind="liveness"}': 1, '{kind="readiness"}': 1}
    assert samples["riklet_chas_request_duration_seconds_count"] == {
        '{code="200",method="GET",route="/health"}': 1, '{code="400",method="POST",route="/containers"}': 1}
