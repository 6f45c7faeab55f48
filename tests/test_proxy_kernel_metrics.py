"""The proxy mode's setting, its choice, and its display: /metrics and ``rikletctl node``."""

from __future__ import annotations

from typing import Any

import pytest

from cli.rikletctl import proxy_line
from common import config
from common.errors import InvalidArgument
from services.monitor import prom
from services.monitor.metrics import realtime_node
from services.monitor.sampler import CpuSampler
from services.proxy.kernel import mode, nft
from services.proxy.stats import Stats
from tests.support import parse_prometheus

PORT = {"protocol": "TCP", "port": 8080, "endpoints": 3, "ready": 2, "blocked": False, "flows": 7,
        "packets_in": 10, "bytes_in": 1000, "packets_out": 8, "bytes_out": 4000, "conntrack": 4}


def kernel_stats() -> dict[str, Any]:
    return {**Stats().as_dict(), "mode": "kernel", "mode_reason": "auto: nftables works",
            "ports": [PORT, {"port": "bad"}], "packets_in": 10, "conntrack_entries": 4, "syncs": 3}


def test_proxy_mode_setting_from_file_env_and_flag(tmp_path: Any) -> None:
    assert config.load(None, {}).proxy_mode == "auto"
    path = tmp_path / "riklet.yaml"
    path.write_text("proxy:\n  mode: userspace\n")
    assert config.load(None, {"RIKLET_CONFIG": str(path)}).proxy_mode == "userspace"
    assert config.load(None, {"RIKLET_PROXY_MODE": "Kernel"}).proxy_mode == "kernel"
    cfg, _ = config.parse_args("t", ["--proxy-mode", "userspace"])
    assert cfg.proxy_mode == "userspace"
    with pytest.raises(InvalidArgument) as err:
        config.load(None, {"RIKLET_PROXY_MODE": "ebpf"})
    assert err.value.field == "RIKLET_PROXY_MODE" and "auto, kernel, userspace" in err.value.message


def test_agent_id_names_the_table_per_state_dir() -> None:
    a = config.load(None, {"RIKLET_STATE_DIR": "/tmp/a"})
    b = config.load(None, {"RIKLET_STATE_DIR": "/tmp/b"})
    assert a.agent_id != b.agent_id and len(a.agent_id) == 8 and int(a.agent_id, 16) >= 0


def test_without_nft_auto_and_kernel_fall_back_to_userspace_saying_why(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nft, "binary", lambda: None)
    assert mode.choose("auto") == ("userspace", "auto: the nft command is not installed")
    assert mode.choose("kernel") == ("userspace", "kernel asked for, but the nft command is not installed")


def test_without_cap_net_admin_auto_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nft, "binary", lambda: "/usr/sbin/nft")
    monkeypatch.setattr(nft, "has_net_admin", lambda: False)
    assert mode.choose("auto") == ("userspace", "auto: the proxy lacks CAP_NET_ADMIN")


def test_metrics_show_the_mode_and_each_port() -> None:
    node = realtime_node("n1", CpuSampler())
    types, samples = parse_prometheus(prom.render(node, [], 0, kernel_stats(), with_proxy=True))
    assert samples["riklet_proxy_mode"] == {'{mode="kernel"}': 1, '{mode="userspace"}': 0}
    assert types["riklet_proxy_port_packets_total"] == "counter"
    assert samples["riklet_proxy_port_bytes_total"] == {
        '{direction="in",port="8080",protocol="TCP"}': 1000,
        '{direction="out",port="8080",protocol="TCP"}': 4000}
    assert samples["riklet_proxy_port_conntrack_entries"] == {'{port="8080",protocol="TCP"}': 4}
    assert samples["riklet_proxy_port_endpoints"] == {'{port="8080",protocol="TCP",state="ready"}': 2,
                                                      '{port="8080",protocol="TCP",state="unready"}': 1}
    assert samples["riklet_proxy_conntrack_entries"] == {"": 4}
    assert samples["riklet_proxy_port_flows_total"] == {'{port="8080",protocol="TCP"}': 7}
    assert samples["riklet_proxy_kernel_syncs_total"] == {"": 3}


def test_userspace_stats_show_their_mode_and_no_port_series() -> None:
    node = realtime_node("n1", CpuSampler())
    stats = {**Stats().as_dict(), "mode": "userspace"}
    _, samples = parse_prometheus(prom.render(node, [], 0, stats, with_proxy=True))
    assert samples["riklet_proxy_mode"] == {'{mode="kernel"}': 0, '{mode="userspace"}': 1}
    assert "riklet_proxy_port_packets_total" not in samples


def test_rikletctl_node_line() -> None:
    line = proxy_line({**kernel_stats(), "up": True, "ports": [PORT]})
    assert line == ("proxy: kernel mode (auto: nftables works), 1 host ports, 2/3 endpoints ready, "
                    "4 conntrack entries")
    assert proxy_line({"up": True, "mode": "userspace", "mode_reason": "proxy.mode is userspace"}) == \
        "proxy: userspace mode (proxy.mode is userspace)"
    assert proxy_line({"up": False}) == "proxy: not answering"
    assert proxy_line(None) == "proxy: unknown (the agent does not say)"
