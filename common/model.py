"""The workload format riklet accepts, and its validation.

Input is RIK's workload JSON (or the same in YAML)::

    {"apiVersion": "v1", "kind": "Pod", "name": "web", "replicas": 1,
     "spec": {"containers": [{"name": "app", "image": "nginx:1.25",
                              "env": [{"name": "K", "value": "V"}],
                              "ports": {"port": 8080, "target_port": 80, "protocol": "TCP"}}]}}

plus extensions for the process runtime (``command``, ``args``, ``workingDir``, ``resources``,
``restartPolicy``, ``terminationGracePeriodSeconds``, ``ports`` as a list). :func:`parse_workload`
turns it into one normalized spec per replica (the form stored in memory); every rejection names
the field at fault.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from common.errors import InvalidArgument
from common.units import parse_cpu, parse_duration, parse_memory

MAX_MANIFEST_BYTES = 256 * 1024
MAX_CONTAINERS = 16
MAX_REPLICAS = 64
MAX_ENV = 512
MAX_ARGV = 1024
RESTART_POLICIES = ("Always", "OnFailure", "Never")
PROTOCOLS = ("TCP", "UDP", "SCTP")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")

_TOP_KEYS = {"apiVersion", "kind", "name", "replicas", "spec", "metadata"}
_SPEC_KEYS = {"containers", "restartPolicy", "terminationGracePeriodSeconds", "hostNetwork"}
_CONTAINER_KEYS = {"name", "image", "env", "ports", "command", "args", "workingDir", "resources",
                   "runtime"}
_PORT_KEYS = {"port", "target_port", "targetPort", "protocol", "type", "name", "balance"}
BALANCES = ("round_robin", "least_connections")


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str
    pods: tuple[tuple[str, dict[str, Any]], ...]   # (pod name, normalized spec) per replica


def dns_label(value: object, field: str) -> str:
    if not isinstance(value, str) or len(value) > 63 or not _DNS_LABEL.fullmatch(value):
        raise InvalidArgument(
            f"{value!r} is not a DNS label (lower-case letters, digits and '-', 1-63 characters,"
            " starting and ending with a letter or digit)", field)
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def load_manifest(text: str | bytes, fmt: str = "") -> dict[str, Any]:
    """Decode a manifest in JSON or YAML (``fmt`` empty: JSON if it parses, else YAML)."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise InvalidArgument(f"manifest larger than {MAX_MANIFEST_BYTES} bytes", "manifest")
    if fmt not in ("", "json", "yaml"):
        raise InvalidArgument(f"unknown format {fmt!r} (json, yaml)", "format")
    data: Any
    if fmt in ("", "json"):
        try:
            data = json.loads(text, parse_constant=_no_constant)
        except ValueError as exc:
            if fmt == "json":
                raise InvalidArgument(f"not valid JSON: {exc}", "manifest") from exc
            data = None
    if fmt == "yaml" or (fmt == "" and data is None):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InvalidArgument(f"neither valid JSON nor YAML: {exc}", "manifest") from exc
    if not isinstance(data, dict):
        raise InvalidArgument("the workload must be an object", "manifest")
    return data


def _check_keys(obj: Mapping[str, Any], allowed: set[str], field: str) -> None:
    for key in obj:
        if key not in allowed:
            raise InvalidArgument(f"unknown field (allowed: {', '.join(sorted(allowed))})",
                                  f"{field}.{key}" if field else str(key))


def _obj(value: object, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument("expected an object", field)
    return value


def _int(value: object, field: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidArgument(f"expected an integer from {lo} to {hi}", field)
    return value


def _argv(value: object, field: str) -> list[str]:
    if isinstance(value, str):
        # A bare string is one program name, not a shell line: we never add a shell.
        value = [value]
    if not isinstance(value, list) or len(value) > MAX_ARGV:
        raise InvalidArgument(f"expected a list of at most {MAX_ARGV} strings", field)
    for i, item in enumerate(value):
        if not isinstance(item, str) or "\0" in item:
            raise InvalidArgument("expected a string without NUL bytes", f"{field}[{i}]")
    return list(value)


def _env(value: object, field: str) -> dict[str, str]:
    items: list[tuple[object, object, str]]
    if isinstance(value, dict):
        items = [(k, v, f"{field}.{k}") for k, v in value.items()]
    elif isinstance(value, list):
        items = []
        for i, entry in enumerate(value):
            entry = _obj(entry, f"{field}[{i}]")
            _check_keys(entry, {"name", "value"}, f"{field}[{i}]")
            items.append((entry.get("name"), entry.get("value", ""), f"{field}[{i}]"))
    else:
        raise InvalidArgument("expected a list of {name, value} or a map", field)
    if len(items) > MAX_ENV:
        raise InvalidArgument(f"more than {MAX_ENV} variables", field)
    env: dict[str, str] = {}
    for name, val, where in items:
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise InvalidArgument(f"{name!r} is not a valid variable name", f"{where}.name")
        if isinstance(val, bool) or not isinstance(val, (str, int, float)) or "\0" in str(val):
            raise InvalidArgument("expected a string", f"{where}.value")
        env[name] = str(val)
    return env


def _ports(value: object, field: str, container: str) -> list[dict[str, Any]]:
    entries = value if isinstance(value, list) else [value]
    out = []
    for i, raw in enumerate(entries):
        where = f"{field}[{i}]" if isinstance(value, list) else field
        entry = _obj(raw, where)
        _check_keys(entry, _PORT_KEYS, where)
        target = entry.get("target_port", entry.get("targetPort"))
        port = entry.get("port")
        if target is None and port is None:
            raise InvalidArgument("a port needs port or target_port", where)
        target_v = _int(target if target is not None else port, f"{where}.target_port", 0, 65535)
        host_v = _int(port, f"{where}.port", 1, 65535) if port is not None else 0
        proto = entry.get("protocol", "TCP")
        if not isinstance(proto, str) or proto.upper() not in PROTOCOLS:
            raise InvalidArgument(f"expected one of {', '.join(PROTOCOLS)}", f"{where}.protocol")
        port_v: dict[str, Any] = {"port": host_v, "target_port": target_v, "protocol": proto.upper(),
                                  "container": container}
        balance = entry.get("balance")
        if balance is not None:
            # Kept only when given: specs stored before the field existed stay equal.
            if balance not in BALANCES:
                raise InvalidArgument(f"expected one of {', '.join(BALANCES)}", f"{where}.balance")
            port_v["balance"] = balance
        out.append(port_v)
    return out


def _resources(value: object, field: str) -> dict[str, int | None]:
    res = _obj(value, field)
    _check_keys(res, {"cpu", "memory", "limits", "requests"}, field)
    if "limits" in res:  # Kubernetes-style resources.limits is accepted as the limit
        return _resources(res["limits"], f"{field}.limits")
    cpu = res.get("cpu")
    mem = res.get("memory")
    return {"cpu_millis": parse_cpu(cpu, f"{field}.cpu") if cpu is not None else None,
            "memory_bytes": parse_memory(mem, f"{field}.memory") if mem is not None else None}


def _container(raw: object, field: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    c = _obj(raw, field)
    _check_keys(c, _CONTAINER_KEYS, field)
    name = dns_label(c.get("name"), f"{field}.name")
    image = c.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise InvalidArgument("expected a non-empty image reference", f"{field}.image")
    runtime = c.get("runtime") or ("containerd" if image else "process")
    if runtime not in ("process", "containerd"):
        raise InvalidArgument(f"unknown runtime {runtime!r} (process, containerd)", f"{field}.runtime")
    if runtime == "containerd" and not image:
        raise InvalidArgument("the containerd runtime needs an image", f"{field}.image")
    command = _argv(c["command"], f"{field}.command") if "command" in c else []
    args = _argv(c["args"], f"{field}.args") if "args" in c else []
    if runtime == "process" and not command:
        raise InvalidArgument("a container without an image runs a command: give a non-empty command",
                              f"{field}.command")
    if runtime == "process" and command and not command[0]:
        raise InvalidArgument("the program name is empty", f"{field}.command[0]")
    workdir = c.get("workingDir")
    if workdir is not None and (not isinstance(workdir, str) or not workdir.startswith("/")):
        raise InvalidArgument("expected an absolute path", f"{field}.workingDir")
    spec = {
        "name": name, "image": image, "runtime": runtime, "command": command, "args": args,
        "env": _env(c["env"], f"{field}.env") if "env" in c else {},
        "workingDir": workdir,
        "resources": _resources(c["resources"], f"{field}.resources") if "resources" in c
        else {"cpu_millis": None, "memory_bytes": None},
    }
    ports = _ports(c["ports"], f"{field}.ports", name) if c.get("ports") is not None else []
    return spec, ports


def parse_workload(data: Mapping[str, Any], default_grace: float = 10.0) -> Workload:
    """Validate a workload document and normalize it into one spec per replica."""
    _check_keys(data, _TOP_KEYS, "")
    kind = data.get("kind", "Pod")
    if kind != "Pod":
        raise InvalidArgument(f"unsupported kind {kind!r} (this node runs Pod)", "kind")
    api = data.get("apiVersion", "v1")
    if api != "v1":
        raise InvalidArgument(f"unsupported apiVersion {api!r} (v1)", "apiVersion")
    name = data.get("name")
    if name is None and isinstance(data.get("metadata"), dict):
        name = data["metadata"].get("name")
    name = dns_label(name, "name")
    replicas = _int(data.get("replicas", 1), "replicas", 1, MAX_REPLICAS)
    spec = _obj(data.get("spec"), "spec")
    _check_keys(spec, _SPEC_KEYS, "spec")
    raw_containers = spec.get("containers")
    if not isinstance(raw_containers, list) or not raw_containers:
        raise InvalidArgument("expected a non-empty list of containers", "spec.containers")
    if len(raw_containers) > MAX_CONTAINERS:
        raise InvalidArgument(f"more than {MAX_CONTAINERS} containers", "spec.containers")
    containers: list[dict[str, Any]] = []
    ports: list[dict[str, Any]] = []
    for i, raw in enumerate(raw_containers):
        container, container_ports = _container(raw, f"spec.containers[{i}]")
        if any(prev["name"] == container["name"] for prev in containers):
            raise InvalidArgument(f"duplicate container name {container['name']!r}",
                                  f"spec.containers[{i}].name")
        containers.append(container)
        ports.extend(container_ports)
    if len({c["runtime"] for c in containers}) > 1:
        raise InvalidArgument("all containers of a pod run on one runtime: give every container an image, "
                              "or none", "spec.containers")
    seen: set[tuple[str, int]] = set()
    for port in ports:
        key = (port["protocol"], port["port"])
        if port["port"] and key in seen:
            raise InvalidArgument(f"host port {port['port']}/{port['protocol']} given twice",
                                  f"spec.containers.ports[{port['container']}].port")
        seen.add(key)
    policy = spec.get("restartPolicy", "Always")
    if policy not in RESTART_POLICIES:
        raise InvalidArgument(f"expected one of {', '.join(RESTART_POLICIES)}", "spec.restartPolicy")
    grace = spec.get("terminationGracePeriodSeconds", default_grace)
    grace = parse_duration(grace, "spec.terminationGracePeriodSeconds")
    if grace > 3600:
        raise InvalidArgument("at most 3600 seconds", "spec.terminationGracePeriodSeconds")
    host_network = spec.get("hostNetwork", False)
    if not isinstance(host_network, bool):
        raise InvalidArgument("expected true or false", "spec.hostNetwork")
    base = {"workload": name, "kind": kind, "restartPolicy": policy, "gracePeriod": grace,
            "hostNetwork": host_network, "containers": containers, "ports": ports}
    names = [name] if replicas == 1 else [f"{name}-{i}" for i in range(replicas)]
    for pod in names:
        dns_label(pod, "name")  # the replica suffix must still fit a DNS label
    return Workload(name=name, kind=kind,
                    pods=tuple((pod, {**base, "replica": i}) for i, pod in enumerate(names)))


def host_ports(spec: Mapping[str, Any]) -> set[tuple[str, int]]:
    """The node ports a pod spec claims, whether the proxy or the workload itself binds them."""
    return {(p["protocol"], p["port"]) for p in spec.get("ports", []) if p.get("port")}
