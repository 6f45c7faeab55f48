"""The workload format: what is accepted, how it is normalized, and what is refused (naming the field)."""

from __future__ import annotations

import json

import pytest

from common.errors import InvalidArgument
from common.model import load_manifest, parse_workload

RIK_POD = {
    "apiVersion": "v1", "kind": "Pod", "name": "web", "replicas": 1,
    "spec": {"containers": [{
        "name": "app", "image": "nginx:1.25",
        "env": [{"name": "MODE", "value": "prod"}],
        "ports": {"port": 8080, "target_port": 80, "protocol": "TCP", "type": "NodePort"},
    }]},
}


def process_pod(**container: object) -> dict[str, object]:
    c: dict[str, object] = {"name": "app", "command": ["sleep", "60"], **container}
    return {"apiVersion": "v1", "kind": "Pod", "name": "job", "spec": {"containers": [c]}}


def test_rik_workload_is_accepted_as_is() -> None:
    w = parse_workload(RIK_POD)
    [(name, spec)] = w.pods
    assert name == "web"
    c = spec["containers"][0]
    assert c["runtime"] == "containerd" and c["image"] == "nginx:1.25"
    assert c["env"] == {"MODE": "prod"}
    assert spec["ports"] == [{"port": 8080, "target_port": 80, "protocol": "TCP", "container": "app"}]
    assert spec["restartPolicy"] == "Always"


def test_yaml_and_json_give_the_same_spec() -> None:
    import yaml

    as_json = parse_workload(load_manifest(json.dumps(RIK_POD)))
    as_yaml = parse_workload(load_manifest(yaml.safe_dump(RIK_POD), "yaml"))
    assert as_json == as_yaml


def test_process_extensions_are_normalized() -> None:
    w = parse_workload({**process_pod(args=["--x"], workingDir="/tmp", env={"A": 1},
                                      resources={"cpu": "500m", "memory": "64m"},
                                      ports=[{"port": 9000, "target_port": 0, "protocol": "udp"}]),
                        "replicas": 3})
    assert [n for n, _ in w.pods] == ["job-0", "job-1", "job-2"]
    spec = w.pods[0][1]
    c = spec["containers"][0]
    assert c["runtime"] == "process" and c["command"] == ["sleep", "60"] and c["args"] == ["--x"]
    assert c["resources"] == {"cpu_millis": 500, "memory_bytes": 64 * 2**20}
    assert c["env"] == {"A": "1"}
    assert spec["ports"][0]["protocol"] == "UDP"


def test_a_port_may_ask_for_least_connections_and_round_robin_is_left_implicit() -> None:
    w = parse_workload(process_pod(ports=[{"port": 9000, "target_port": 1, "balance": "least_connections"},
                                          {"port": 9001, "target_port": 2}]))
    ports = w.pods[0][1]["ports"]
    assert ports[0]["balance"] == "least_connections"
    assert "balance" not in ports[1]   # specs stored before the field existed stay equal


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda d: d.update(name="Bad_Name"), "name"),
    (lambda d: d.update(name="x" * 64), "name"),
    (lambda d: d.update(kind="Function"), "kind"),
    (lambda d: d.update(replicas=0), "replicas"),
    (lambda d: d.update(replicas="2"), "replicas"),
    (lambda d: d.update(surprise=1), "surprise"),
    (lambda d: d["spec"].update(containers=[]), "spec.containers"),
    (lambda d: d["spec"]["containers"].append(dict(d["spec"]["containers"][0])), "spec.containers[1].name"),
    (lambda d: d["spec"]["containers"][0].update(command=[]), "spec.containers[0].command"),
    (lambda d: d["spec"]["containers"][0].update(command=[1]), "spec.containers[0].command[0]"),
    (lambda d: d["spec"]["containers"][0].update(ports={"port": 70000, "target_port": 1}),
     "spec.containers[0].ports.port"),
    (lambda d: d["spec"]["containers"][0].update(ports=[{"port": 80, "protocol": "ICMP"}]),
     "spec.containers[0].ports[0].protocol"),
    (lambda d: d["spec"]["containers"][0].update(ports=[{"port": 80, "balance": "random"}]),
     "spec.containers[0].ports[0].balance"),
    (lambda d: d["spec"]["containers"][0].update(resources={"cpu": "lots"}),
     "spec.containers[0].resources.cpu"),
    (lambda d: d["spec"]["containers"][0].update(resources={"memory": "12 parsecs"}),
     "spec.containers[0].resources.memory"),
    (lambda d: d["spec"]["containers"][0].update(env=[{"name": "1BAD", "value": "x"}]),
     "spec.containers[0].env[0].name"),
    (lambda d: d["spec"].update(restartPolicy="Sometimes"), "spec.restartPolicy"),
    (lambda d: d["spec"]["containers"][0].update(workingDir="relative"), "spec.containers[0].workingDir"),
])
def test_invalid_specs_name_the_field(mutate, field) -> None:  # type: ignore[no-untyped-def]
    doc = process_pod()
    mutate(doc)
    with pytest.raises(InvalidArgument) as err:
        parse_workload(doc)
    assert err.value.field == field


def test_oversized_and_garbage_manifests_are_refused() -> None:
    with pytest.raises(InvalidArgument) as err:
        load_manifest("{" + " " * 300_000 + "}")
    assert err.value.field == "manifest"
    for text in ("[1, 2]", "name: [unclosed", "42"):
        with pytest.raises(InvalidArgument):
            load_manifest(text)


def test_the_same_host_port_twice_is_refused() -> None:
    doc = process_pod(ports=[{"port": 8080, "target_port": 1}, {"port": 8080, "target_port": 2}])
    with pytest.raises(InvalidArgument, match="8080"):
        parse_workload(doc)
