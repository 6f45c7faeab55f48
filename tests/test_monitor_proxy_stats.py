"""The proxy's counters on their way to /metrics: the histogram in Stats, the proxy's ``stats``
endpoint (a real ROUTER socket), and their Prometheus rendering in the monitor."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from common import ipc
from common.errors import RikletError, Unavailable
from common.stats_server import StatsServer
from common.zmqutil import RequestClient
from services.monitor import prom
from services.monitor.pods import ContainerUsage
from services.monitor.service import proxy_stats_reader
from services.proxy.stats import CONNECT_BUCKETS, Stats
from tests.support import parse_prometheus


def observed() -> Stats:
    s = Stats(connections_total=7, connections_active=2, bytes_in=100, bytes_out=2000)
    for seconds in (0.0001, 0.0004, 0.002, 0.04, 2.0, 10.0):
        s.observe_connect(seconds)
    return s


def test_histogram_buckets_are_cumulative_and_count_includes_overflow() -> None:
    hist = observed().as_dict()["connect_latency"]
    assert [le for le, _ in hist["buckets"]] == list(CONNECT_BUCKETS)
    counts = [n for _, n in hist["buckets"]]
    assert counts == sorted(counts) and counts[0] == 2 and counts[-1] == 5
    assert hist["count"] == 6 and hist["sum"] == pytest.approx(12.0425)
    boundary = Stats()
    boundary.observe_connect(0.001)  # le is inclusive
    assert dict((le, n) for le, n in boundary.as_dict()["connect_latency"]["buckets"])[0.001] == 1


def test_render_exports_proxy_families_in_text_format() -> None:
    node: Any = {"cpu": {"currentUsage": 1.5}, "memory": {"totalMemory": 10, "freeMemory": 4}, "disks": []}
    types, samples = parse_prometheus(prom.render(node, [], 0, observed().as_dict(), with_proxy=True))
    assert samples["riklet_proxy_up"] == {"": 1}
    assert types["riklet_proxy_connections_total"] == "counter"
    assert samples["riklet_proxy_connections_total"] == {"": 7}
    assert types["riklet_proxy_connections_active"] == "gauge"
    assert samples["riklet_proxy_bytes_out_total"] == {"": 2000}
    assert all(types[n] == "counter" for n in types if n.startswith("riklet_proxy") and n.endswith("_total"))
    name = "riklet_proxy_connect_duration_seconds"
    assert types[name] == "histogram"
    buckets = samples[f"{name}_bucket"]
    assert buckets['{le="0.0005"}'] == 2 and buckets['{le="3.0"}'] == 5 and buckets['{le="+Inf"}'] == 6
    assert len(buckets) == len(CONNECT_BUCKETS) + 1
    assert samples[f"{name}_count"] == {"": 6} and samples[f"{name}_sum"][""] == pytest.approx(12.0425)


def test_render_without_an_answering_proxy_keeps_only_up() -> None:
    node: Any = {"cpu": {"currentUsage": 0}, "memory": {"totalMemory": 1, "freeMemory": 1}, "disks": []}
    _, samples = parse_prometheus(prom.render(node, [], 3, None, with_proxy=True))
    assert samples["riklet_proxy_up"] == {"": 0}
    assert not [n for n in samples if n.startswith("riklet_proxy_") and n != "riklet_proxy_up"]
    _, samples = parse_prometheus(prom.render(node, [], 0, {"connections_total": "x", "connect_latency": {}},
                                   with_proxy=True))
    assert "riklet_proxy_connections_total" not in samples, "malformed values are left out"


@pytest.fixture
def stats_server() -> Iterator[tuple[StatsServer, Stats]]:
    run_dir = tempfile.mkdtemp(prefix="rkp", dir="/tmp")
    stats = observed()
    server = StatsServer(f"ipc://{run_dir}/proxy.sock", stats.as_dict)
    server.start()
    try:
        yield server, stats
    finally:
        server.stop()
        os.rmdir(run_dir)


def test_stats_endpoint_answers_and_the_reader_reads_it(stats_server: tuple[StatsServer, Stats]) -> None:
    server, stats = stats_server
    path = server.endpoint[len("ipc://"):]
    assert os.stat(path).st_mode & 0o777 == 0o600
    client = RequestClient(server.endpoint, timeout=5.0, retries=0)
    try:
        assert client.call("stats")["connections_total"] == 7
        stats.connections_total += 1
        assert proxy_stats_reader(client)()["connections_total"] == 8  # type: ignore[index]
        with pytest.raises(RikletError) as err:
            client.call("nope")
        assert "unknown op" in str(err.value)
    finally:
        client.close()


def test_stats_endpoint_answers_garbage_with_errors(stats_server: tuple[StatsServer, Stats]) -> None:
    server, _ = stats_server
    sock: zmq.Socket[Any] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    try:
        for frames in ([b"\xff\xfe"], [b"not-magic", b"{}"], [ipc.MAGIC, b"\xff{not json"]):
            sock.send_multipart(frames)
            assert sock.poll(5000), f"no reply to {frames!r}"
            reply = ipc.decode_reply(sock.recv_multipart())
            assert not reply.ok
    finally:
        sock.close()
    client = RequestClient(server.endpoint, timeout=5.0, retries=0)
    try:
        assert client.call("stats")["connections_total"] == 7, "the endpoint survives garbage"
    finally:
        client.close()


def test_stats_endpoint_unlinks_its_socket_and_the_reader_tells_absent_from_silent() -> None:
    run_dir = tempfile.mkdtemp(prefix="rkp", dir="/tmp")
    endpoint = f"ipc://{run_dir}/proxy.sock"
    server = StatsServer(endpoint, Stats().as_dict)
    server.start()
    server.stop()
    assert not os.path.exists(f"{run_dir}/proxy.sock")
    client = RequestClient(endpoint, timeout=0.3, retries=0)
    try:
        assert proxy_stats_reader(client)() is None, "no socket file: no proxy, no error"
        open(f"{run_dir}/proxy.sock", "w").close()  # a stale file, nobody behind it
        with pytest.raises(Unavailable):
            proxy_stats_reader(client)()
    finally:
        client.close()
        os.unlink(f"{run_dir}/proxy.sock")
        os.rmdir(run_dir)


def test_pods_rendered_once_read_the_same_as_pods_rendered_per_scrape() -> None:
    node: Any = {"cpu": {"currentUsage": 1.5}, "memory": {"totalMemory": 10, "freeMemory": 4}, "disks": []}
    pods: list[Any] = [{"appId": name, "state": state, "restartCount": n, "cpu": {"currentUsage": 12.5 * n},
                        "memory": {"totalMemory": 100, "freeMemory": 40 - n}}
                       for n, (name, state) in enumerate([("web", "RUNNING"), ('odd"pod', "CREATING")])]
    rows = {"web": (ContainerUsage("web", "app", 1.25, 4096, None),
                    ContainerUsage("web", "db", 2.0, 8192, 65536)), 'odd"pod': ()}
    per_scrape = prom.render(node, pods, 2, containers=[r for p in pods for r in rows[p["appId"]]])
    once = prom.render(node, [], 2, series=[prom.pod_series(p, rows[p["appId"]]) for p in pods])
    assert once == per_scrape
    _, samples = parse_prometheus(once)
    assert samples["riklet_pods"]['{phase="creating"}'] == 1
    assert samples["riklet_container_memory_limit_bytes"] == {'{container="db",pod="web"}': 65536}
