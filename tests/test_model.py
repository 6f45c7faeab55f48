"""The workload format: what is accepted, how it is normalized, and what is refused (naming the field)."""

from __future__ import annotations

import json
import time

import pytest

from common.errors import InvalidArgument
from common.model import MAX_DEPTH, MAX_LENGTHS, load_json, load_manifest, parse_workload

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


# -- input limits: small inputs must not cost gigabytes or crash -------------------------------

def alias_bomb(levels: int = 9) -> str:
    """Billion laughs: each level is nine references to the one before, ``kind`` the last."""
    lines = ["metadata:", "  a0: &a0 [x,x,x,x,x,x,x,x,x]"]
    lines += [f"  a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join([*lines, f"kind: *a{levels - 1}", ""])


def test_a_yaml_alias_bomb_is_refused_at_once_with_a_short_message() -> None:
    text = alias_bomb()
    assert len(text) == 434              # the manifest from the report: 9**9 x's once expanded
    started = time.monotonic()
    with pytest.raises(InvalidArgument) as err:
        parse_workload(load_manifest(text))
    assert time.monotonic() - started < 1.0
    assert err.value.field == "manifest" and "aliases" in err.value.message
    assert len(str(err.value)) < 200


@pytest.mark.parametrize("text", [
    "name: &n web\nmetadata: {name: *n}\n",
    "base: &b {cpu: 1}\nspec: {containers: [{name: a, command: [x], resources: {<<: *b}}]}\n",
])
def test_any_alias_is_refused_naming_where(text: str) -> None:
    with pytest.raises(InvalidArgument, match=r"aliases .* not accepted \(line \d+, column \d+\)") as err:
        load_manifest(text, "yaml")
    assert err.value.field == "manifest"


def _nested(depth: int, fmt: str) -> str:
    """A pod whose metadata holds ``depth`` levels in all (the document itself is the first)."""
    inner = "[" * (depth - 2) + "]" * (depth - 2) if depth > 2 else "1"
    doc = f'{{"name": "web", "metadata": {{"x": {inner}}}}}'
    return doc if fmt == "json" else doc.replace('"', "")


@pytest.mark.parametrize("fmt", ["json", "yaml", ""])
def test_nesting_is_bounded_and_the_error_names_the_limit(fmt: str) -> None:
    assert load_manifest(_nested(MAX_DEPTH, fmt or "json"), fmt)["name"] == "web"
    with pytest.raises(InvalidArgument, match=f"deeper than {MAX_DEPTH} levels") as err:
        load_manifest(_nested(MAX_DEPTH + 1, fmt or "yaml"), fmt)
    assert err.value.field == "manifest"


@pytest.mark.parametrize(("text", "fmt"), [
    ("[" * 100_000, ""), ("[" * 100_000, "json"), ("[" * 100_000, "yaml"),
    ("kind: " + "[" * 100_000, ""), ('{"a": ' * 40_000, ""),
    ("a:\n" + "".join("  " * i + "b:\n" for i in range(1, 100)), "yaml"),   # block style
    ("- " * 50_000 + "x", "yaml"),
])
def test_deep_nesting_is_refused_without_recursing(text: str, fmt: str) -> None:
    with pytest.raises(InvalidArgument, match=f"deeper than {MAX_DEPTH} levels") as err:
        load_manifest(text, fmt)
    assert err.value.field == "manifest"


def test_brackets_inside_json_strings_do_not_count_as_nesting() -> None:
    text = json.dumps({"name": "web", "metadata": {"note": "[{\\\"" * 1000}})
    assert load_manifest(text, "json")["name"] == "web"
    assert load_json('["\\\\", [[]]]', "body") == ["\\", [[]]]


@pytest.mark.parametrize("text", [
    '{"kind": ' + "9" * 5000 + "}",        # past Python's 4300-digit int conversion limit
    "kind: " + "9" * 5000,
    "kind: " + "1:" * 80_000 + "1",         # a YAML 1.1 base-60 int: quadratic to build
    "kind: 2020-13-45",                     # a timestamp no calendar has
])
def test_numbers_the_decoders_choke_on_are_refused_quickly(text: str) -> None:
    started = time.monotonic()
    with pytest.raises(InvalidArgument) as err:
        load_manifest(text)
    assert time.monotonic() - started < 1.0
    assert err.value.field == "manifest"


def _container_with(path: str, value: object) -> dict[str, object]:
    """A valid pod with ``value`` at the limits-table path (``[]`` meaning the first item)."""
    c: dict[str, object] = {"name": "app", "command": ["sleep", "60"]}
    doc: dict[str, object] = {"name": "web", "spec": {"containers": [c]}}
    key = path.removeprefix("spec.containers[].")
    if path == "name":
        doc["name"] = value
    elif path == "spec.terminationGracePeriodSeconds":
        doc["spec"]["terminationGracePeriodSeconds"] = value  # type: ignore[index]
    elif key in ("command[]", "args[]"):
        c[key[:-2]] = [value]
    elif key.startswith("env[]."):
        c["env"] = [{"name": "K", "value": "v", key.removeprefix("env[]."): value}]
    elif key.startswith("ports[]."):
        c["ports"] = [{"port": 8080, "target_port": 80, key.removeprefix("ports[]."): value}]
    elif key.startswith("resources."):
        c["resources"] = {key.removeprefix("resources."): value}
    else:
        c[key] = value
    if key == "image":
        c.pop("command")
    return doc


_FIELD = {"command[]": "command[0]", "args[]": "args[0]", "env[].name": "env[0].name",
          "env[].value": "env[0].value", "ports[].name": "ports[0].name", "ports[].type": "ports[0].type"}


def _long(path: str, n: int) -> str:
    if path.endswith(("workingDir",)):
        return "/" + "d" * (n - 1)
    return "a" * n


@pytest.mark.parametrize("path", sorted(MAX_LENGTHS))
def test_every_string_field_has_a_length_limit_named_in_the_error(path: str) -> None:
    limit = MAX_LENGTHS[path]
    doc = _container_with(path, _long(path, limit * 20 + 1))
    with pytest.raises(InvalidArgument) as err:
        parse_workload(doc)
    key = path.removeprefix("spec.containers[].")
    assert err.value.field == (path if key == path else f"spec.containers[0].{_FIELD.get(key, key)}")
    assert len(str(err.value)) < 300


@pytest.mark.parametrize("path", sorted(p for p in MAX_LENGTHS if "resources" not in p
                                        and "Grace" not in p and "name" not in p))
def test_a_string_at_its_limit_is_accepted_and_one_more_is_not(path: str) -> None:
    limit = MAX_LENGTHS[path]
    parse_workload(_container_with(path, _long(path, limit)))
    with pytest.raises(InvalidArgument, match=f"more than the {limit} allowed"):
        parse_workload(_container_with(path, _long(path, limit + 1)))


@pytest.mark.parametrize("name", ["x" * 20_000, "é" * 20_000, ["web"] * 100_000, {"k": "v" * 100_000}])
def test_a_huge_name_gets_a_short_error_naming_name(name: object) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_workload({"name": name, "spec": {"containers": [{"name": "a", "command": ["x"]}]}})
    assert err.value.field == "name"
    assert ("…" in err.value.message or "..." in err.value.message) and len(err.value.message) < 250


def test_an_unknown_huge_key_is_named_by_an_excerpt() -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_workload({"k" * 100_000: 1})
    assert err.value.field is not None and len(err.value.field) < 100 and "…" in err.value.field
