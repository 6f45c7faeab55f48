"""/metrics as Prometheus' own tool sees it: a live agent's scrape passes `promtool check
metrics` with nothing to say; the example alert rules pass `promtool check rules` and fire on
the series of their rules test; the Grafana dashboard and the rules use only metrics the agent
exports. promtool is Debian's `prometheus` package (.ci/run installs it; under CI=true its
absence fails these tests)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.monitor import procstats, prom
from services.monitor.pods import ContainerUsage
from services.monitor.promextra import PROXY_SERIES
from tests.stack import Agent, chas_agent
from tests.support import need, parse_prometheus, wait_for

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "riklet-dashboard.json"
NAME = re.compile(r"\b((?:riklet|process)_[a-zA-Z0-9_]+)\b")


def promtool(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    found = shutil.which("promtool")
    need(found is not None, "promtool (Debian package prometheus)")
    assert found is not None
    return subprocess.run([found, *args], input=input, capture_output=True, text=True, timeout=60,
                          check=False)


def scrape(agent: Agent, accept: str = "") -> tuple[str, str]:
    req = urllib.request.Request(f"http://{agent.metrics}/metrics",
                                 headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.headers["Content-Type"], resp.read().decode()


@pytest.mark.integration
def test_a_live_scrape_passes_promtool_check_metrics(tmp_path: Any) -> None:
    with chas_agent() as agent:   # its CHaS API has answered a GET /health
        (tmp_path / "p.json").write_text(json.dumps({"name": "probed", "spec": {"containers": [{
            "name": "main", "command": [sys.executable, "-c", "import time; time.sleep(600)"],
            "readinessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 1}}]}}))
        agent.ctl("apply", "-f", str(tmp_path / "p.json"))
        agent.wait_phase("probed", "Running")

        def probed() -> dict[str, dict[str, float]] | None:
            samples = parse_prometheus(scrape(agent)[1])[1]
            ok = samples.get("riklet_probe_results_total", {}).get('{kind="readiness",result="success"}', 0)
            return samples if ok >= 1 else None
        samples = wait_for(probed, 30, "a readiness probe result on /metrics")
        ctype, text = scrape(agent)

        check = promtool("check", "metrics", input=text)
        assert (check.returncode, check.stdout + check.stderr) == (0, "")
        assert ctype.startswith("text/plain; version=0.0.4")

        # what a user of these metrics relies on
        assert samples["riklet_pods"]['{phase="running"}'] == 1
        assert 0 <= samples["riklet_node_cpu_usage_ratio"][""] <= 1
        assert samples["riklet_pod_start_duration_seconds_count"]['{runtime="process"}'] == 1
        assert 0 < samples["riklet_pod_start_duration_seconds_sum"]['{runtime="process"}'] < 60
        assert samples["riklet_chas_request_duration_seconds_count"][
            '{code="200",method="GET",route="/health"}'] >= 1
        api = samples["riklet_node_api_request_duration_seconds_count"]
        assert any('code="OK"' in labels and "riklet.v1.Node/" in labels for labels in api), api
        services = {f'{{service="{s}"}}' for s in procstats.SERVICES}
        assert set(samples["process_resident_memory_bytes"]) == services
        assert samples["riklet_service_up"] == dict.fromkeys(services, 1)
        assert samples["process_start_time_seconds"]['{service="manager"}'] > 1.7e9
        (build,) = samples["riklet_build_info"]
        assert 'python_version="' in build and 'revision="' in build
        assert samples["riklet_build_info"][build] == 1

        ctype, text = scrape(agent, "application/openmetrics-text; version=1.0.0")
        assert ctype.startswith("application/openmetrics-text") and text.endswith("# EOF\n")


def test_the_alert_rules_pass_promtool_and_each_one_fires_in_its_test() -> None:
    check = promtool("check", "rules", str(RULES))
    assert check.returncode == 0, check.stdout + check.stderr
    test = promtool("test", "rules", str(RULES_TEST))
    assert test.returncode == 0, test.stdout + test.stderr
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    tested = {t["alertname"] for case in yaml.safe_load(RULES_TEST.read_text())["tests"]
              for t in case["alert_rule_test"] if t.get("exp_alerts")}
    assert {"RikletAgentDown", "RikletPodCrashLooping", "RikletProxyRefusing"} <= alerts == tested


def exported_names() -> set[str]:
    """Every sample name the monitor can export: each family built from inputs that have
    every optional part (a proxy in kernel mode, a manager with CHaS and probe figures)."""
    node: Any = {"cpu": {"currentUsage": 10.0}, "memory": {"totalMemory": 10, "freeMemory": 4},
                 "disks": [{"diskName": "sda", "total": 9, "used": 3, "available": 5}]}
    pod: Any = {"appId": "web", "state": "RUNNING", "restartCount": 1, "cpu": {"currentUsage": 5.0},
                "memory": {"totalMemory": 100, "freeMemory": 40}}
    hist = {"buckets": [[0.1, 1]], "sum": 0.05, "count": 1}
    proxy: dict[str, Any] = {key: 1 for key, *_ in PROXY_SERIES}
    proxy.update(mode="kernel", connect_latency=hist, ports=[{
        "protocol": "TCP", "port": 80, "packets_in": 1, "packets_out": 1, "bytes_in": 1, "bytes_out": 1,
        "conntrack": 1, "ready": 1, "endpoints": 1, "flows": 1}])
    row = {"labels": ["x", "OK"], "histogram": hist}
    manager = {"requests": [{"method": "GET", "endpoint": "/health", "status": 200, "count": 1,
                             "latency": hist}],
               "deployments": {"success": 1}, "errors": {"E": 1}, "healthy": True, "registered": True,
               "reports": {"success": 1},
               "manager": {"node_api": [row], "pod_start": [{**row, "labels": ["process"]}],
                           "probe_duration": [{**row, "labels": ["readiness"]}],
                           "probe_results": [["readiness", "success", 1]]}}
    fams = prom.all_families(node, [pod], 0, proxy, True, [ContainerUsage("web", "c", 1.0, 2, 3)], manager)
    fams += procstats.agent_families(lambda: dict.fromkeys(procstats.SERVICES, os.getpid()))
    _, samples = parse_prometheus(prom.exposition(fams)[0].decode())
    return set(samples)


def test_the_dashboard_and_the_rules_use_only_metrics_the_agent_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    exprs += [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    used = {name for e in exprs for name in NAME.findall(e)}
    assert len(used) >= 20 and not used - exported_names()
    rows = {p["title"] for p in dashboard["panels"] if p["type"] == "row"}
    assert {"Node", "Pods", "Proxy"} <= rows
    assert dashboard["templating"]["list"][0]["type"] == "datasource"
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"] if p["type"] != "row")



@pytest.mark.parametrize("accept", ["", "application/openmetrics-text; version=1.0.0"])
def test_the_pod_lines_riklet_writes_are_those_prometheus_client_writes(accept: str) -> None:
    """The per-pod families' sample lines are written by riklet (prometheus_client would spend
    ~5 us on each at every scrape): whole bodies in both formats are byte for byte what
    prometheus_client writes for the same samples, odd label values and large numbers included."""
    node: Any = {"cpu": {"currentUsage": 10.0}, "memory": {"totalMemory": 10, "freeMemory": 4}, "disks": []}
    odd = 'we"i\\rd\nname'
    pods: Any = [{"appId": name, "state": "RUNNING", "restartCount": n, "cpu": {"currentUsage": cpu},
                  "memory": {"totalMemory": 2**40, "freeMemory": 2**40 - mem}}
                 for name, n, cpu, mem in (("web", 0, 0.0, 0), (odd, 3, 12.5, 123456789),
                                           ("big", 2**53, 100.0, 2**40 - 1))]
    rows = [ContainerUsage("web", "c", 1.0, 2, 3), ContainerUsage(odd, "x\\y", 1e-9, 0, None),
            ContainerUsage("big", "z", 1.5e12, 2**40, 2**41)]
    def of_pods(value: Any) -> list[tuple[dict[str, str], float]]:
        return [({"pod": p["appId"]}, value(p)) for p in pods]

    def of_rows(value: Any) -> list[tuple[dict[str, str], float]]:
        return [({"container": r.container, "pod": r.pod}, value(r)) for r in rows if value(r) is not None]

    expected = {
        "riklet_pod_cpu_usage_ratio": of_pods(lambda p: p["cpu"]["currentUsage"] / 100),
        "riklet_pod_memory_usage_bytes": of_pods(lambda p: p["memory"]["totalMemory"]
                                                 - p["memory"]["freeMemory"]),
        "riklet_pod_restarts_total": of_pods(lambda p: p["restartCount"]),
        "riklet_container_cpu_seconds_total": of_rows(lambda r: r.cpu_seconds),
        "riklet_container_memory_working_set_bytes": of_rows(lambda r: r.memory_bytes),
        "riklet_container_memory_limit_bytes": of_rows(lambda r: r.memory_limit),
    }
    ours = prom.all_families(node, pods, 0, containers=rows)
    theirs = []
    for f in ours:
        if isinstance(f, prom.Written):
            samples = expected.pop(f.family.name + ("_total" if f.family.type == "counter" else ""))
            labels = sorted(samples[0][0])
            f = type(f.family)(f.family.name, f.family.documentation, labels=labels)
            for values, value in samples:
                f.add_metric([values[k] for k in labels], value)
        theirs.append(f)
    assert not expected, "every per-pod family is written by riklet"
    body, content_type = prom.exposition(ours, accept)
    reference, reference_type = prom.exposition(theirs, accept)
    assert content_type == reference_type
    assert body.decode() == reference.decode()
    assert body.count(b"# EOF") == (1 if accept else 0)
