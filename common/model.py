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

from common.errors import InvalidArgument, excerpt
from common.fields import check_int as _int
from common.fields import check_object as _obj
from common.probespec import PROBES, parse_probes
from common.units import parse_cpu, parse_duration, parse_memory
from common.volumes import parse_mounts, parse_volumes

MAX_MANIFEST_BYTES = 256 * 1024
MAX_DEPTH = 32          # levels of nested objects and lists in a manifest (a pod needs about 6)
MAX_CONTAINERS = 16
MAX_REPLICAS = 64
MAX_ENV = 512
MAX_ARGV = 1024
MAX_PORTS = 128         # per container

# The longest each string field may be, in characters: the one table the README documents.
# Names follow Kubernetes (a DNS label); an argument or an environment value is bounded well
# under Linux's 128 KiB per argument, and a path by PATH_MAX.
MAX_LENGTHS: dict[str, int] = {
    "name": 63,                                   # also metadata.name and each replica's pod name
    "spec.containers[].name": 63,
    "spec.containers[].image": 512,
    "spec.containers[].command[]": 32 * 1024,
    "spec.containers[].args[]": 32 * 1024,
    "spec.containers[].env[].name": 256,
    "spec.containers[].env[].value": 32 * 1024,
    "spec.containers[].workingDir": 4096,
    "spec.containers[].ports[].name": 63,
    "spec.containers[].ports[].type": 63,
    "spec.containers[].resources.cpu": 32,
    "spec.containers[].resources.memory": 32,
    "spec.terminationGracePeriodSeconds": 32,
}
MAX_NAME = MAX_LENGTHS["name"]
MAX_IMAGE = MAX_LENGTHS["spec.containers[].image"]
MAX_ARG = MAX_LENGTHS["spec.containers[].args[]"]
MAX_ENV_NAME = MAX_LENGTHS["spec.containers[].env[].name"]
MAX_ENV_VALUE = MAX_LENGTHS["spec.containers[].env[].value"]
MAX_PATH = MAX_LENGTHS["spec.containers[].workingDir"]
MAX_PORT_LABEL = MAX_LENGTHS["spec.containers[].ports[].name"]
MAX_QUANTITY = MAX_LENGTHS["spec.containers[].resources.cpu"]

RESTART_POLICIES = ("Always", "OnFailure", "Never")
PROTOCOLS = ("TCP", "UDP", "SCTP")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")

_TOP_KEYS = {"apiVersion", "kind", "name", "replicas", "spec", "metadata"}
_SPEC_KEYS = {"containers", "restartPolicy", "terminationGracePeriodSeconds", "hostNetwork",
              "volumes"}
_CONTAINER_KEYS = {"name", "image", "env", "ports", "command", "args", "workingDir", "resources",
                   "runtime", "volumeMounts", *PROBES}
_PORT_KEYS = {"port", "target_port", "targetPort", "protocol", "type", "name", "balance"}
BALANCES = ("round_robin", "least_connections")


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str
    pods: tuple[tuple[str, dict[str, Any]], ...]   # (pod name, normalized spec) per replica


def dns_label(value: object, field: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_NAME or not _DNS_LABEL.fullmatch(value):
        raise InvalidArgument(
            f"{excerpt(value)} is not a DNS label (lower-case letters, digits and '-', 1-{MAX_NAME}"
            " characters, starting and ending with a letter or digit)", field)
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def too_deep(field: str) -> InvalidArgument:
    return InvalidArgument(f"nested deeper than {MAX_DEPTH} levels of objects and lists", field)


# JSON's structure characters, plus the two that decide whether a bracket is inside a string.
_JSON_SPECIAL = re.compile(r'[\[\]{}"\\]')


def json_depth_exceeds(text: str, limit: int = MAX_DEPTH) -> bool:
    """Whether JSON ``text`` nests objects/lists deeper than ``limit``: a linear scan that stops
    at the first level too deep, so ``[[[[...`` costs nothing and the decoder (which recurses)
    never sees it. Brackets inside strings do not count."""
    depth, in_string, skip = 0, False, -1
    for m in _JSON_SPECIAL.finditer(text):
        ch, at = m.group(), m.start()
        if at == skip:          # the character after a backslash in a string is escaped
            continue
        if in_string:
            if ch == "\\":
                skip = at + 1
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def load_json(text: str | bytes, field: str, max_bytes: int = MAX_MANIFEST_BYTES) -> Any:
    """Decode untrusted JSON: size first, then depth (:data:`MAX_DEPTH`), then the decoder;
    every failure is an InvalidArgument naming ``field``. The CHaS body and RIK definitions can
    share this with manifests."""
    if isinstance(text, bytes):
        if len(text) > max_bytes:
            raise InvalidArgument(f"larger than {max_bytes} bytes", field)
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidArgument(f"not UTF-8: {exc.reason} at byte {exc.start}", field) from exc
    elif len(text) > max_bytes or len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise InvalidArgument(f"larger than {max_bytes} bytes", field)
    if json_depth_exceeds(text):
        raise too_deep(field)
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError as exc:  # cannot happen after the scan; kept so it can never crash
        raise too_deep(field) from exc
    except ValueError as exc:       # also integers longer than Python converts (4300 digits)
        raise InvalidArgument(f"not valid JSON: {exc}", field) from exc


def load_yaml(text: str, field: str = "manifest") -> Any:
    """Decode untrusted YAML (:func:`common.manifestyaml.load_yaml`); failures name ``field``.
    PyYAML is imported on the first YAML manifest: the proxy and the monitor use this module
    and never read one."""
    from common import manifestyaml

    return manifestyaml.load_yaml(text, field)


def load_manifest(text: str | bytes, fmt: str = "") -> dict[str, Any]:
    """Decode a manifest in JSON or YAML (``fmt`` empty: JSON if it parses, else YAML), refusing
    more than :data:`MAX_MANIFEST_BYTES`, more than :data:`MAX_DEPTH` levels, and YAML aliases."""
    if fmt not in ("", "json", "yaml"):
        raise InvalidArgument(f"unknown format {excerpt(fmt)} (json, yaml)", "format")
    if isinstance(text, bytes):
        if len(text) > MAX_MANIFEST_BYTES:
            raise InvalidArgument(f"manifest larger than {MAX_MANIFEST_BYTES} bytes", "manifest")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidArgument(f"not UTF-8: {exc.reason} at byte {exc.start}", "manifest") from exc
    if len(text) > MAX_MANIFEST_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_MANIFEST_BYTES:
        raise InvalidArgument(f"manifest larger than {MAX_MANIFEST_BYTES} bytes", "manifest")
    data: Any = None
    if fmt == "json":
        data = load_json(text, "manifest")
    elif fmt == "yaml":
        data = load_yaml(text)
    else:
        try:
            data = load_json(text, "manifest")
        except InvalidArgument:
            # Not JSON (or JSON too deep, which YAML, a superset, then refuses the same way).
            try:
                data = load_yaml(text)
            except InvalidArgument as exc:
                if not exc.message.startswith("not valid YAML: "):
                    raise
                raise InvalidArgument("neither valid JSON nor YAML: " + exc.message.split(": ", 1)[1],
                                      "manifest") from exc
    if not isinstance(data, dict):
        raise InvalidArgument("the workload must be an object", "manifest")
    return data


def _key(field: str, key: object) -> str:
    """The path of ``field``'s member ``key``; a key that is not a short string is excerpted."""
    name = key if isinstance(key, str) and len(key) <= MAX_NAME else excerpt(key)
    return f"{field}.{name}" if field else name


def _check_keys(obj: Mapping[str, Any], allowed: set[str], field: str) -> None:
    for key in obj:
        if key not in allowed:
            raise InvalidArgument(f"unknown field (allowed: {', '.join(sorted(allowed))})",
                                  _key(field, key))


def _text(value: object, field: str, limit: int, what: str = "a string") -> str:
    """A string of at most ``limit`` characters and without NUL bytes."""
    if not isinstance(value, str) or "\0" in value:
        raise InvalidArgument(f"expected {what} (text without NUL bytes)", field)
    if len(value) > limit:
        raise InvalidArgument(f"{len(value)} characters, more than the {limit} allowed", field)
    return value


def _one_of(value: object, choices: tuple[str, ...], field: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise InvalidArgument(f"{excerpt(value)} is not one of {', '.join(choices)}", field)
    return value


def _argv(value: object, field: str) -> list[str]:
    if isinstance(value, str):
        # A bare string is one program name, not a shell line: we never add a shell.
        value = [value]
    if not isinstance(value, list) or len(value) > MAX_ARGV:
        raise InvalidArgument(f"expected a list of at most {MAX_ARGV} strings", field)
    return [_text(item, f"{field}[{i}]", MAX_ARG) for i, item in enumerate(value)]


def _env(value: object, field: str) -> dict[str, str]:
    items: list[tuple[object, object, str]]
    if isinstance(value, dict):
        items = [(k, v, _key(field, k)) for k, v in value.items()]
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
        key = _text(name, f"{where}.name", MAX_ENV_NAME, "a variable name")
        if not _ENV_NAME.fullmatch(key):
            raise InvalidArgument(f"{excerpt(key)} is not a valid variable name", f"{where}.name")
        if isinstance(val, bool) or not isinstance(val, (str, int, float)):
            raise InvalidArgument("expected a string", f"{where}.value")
        env[key] = _text(str(val), f"{where}.value", MAX_ENV_VALUE)
    return env


def _ports(value: object, field: str, container: str) -> list[dict[str, Any]]:
    entries = value if isinstance(value, list) else [value]
    if len(entries) > MAX_PORTS:
        raise InvalidArgument(f"more than {MAX_PORTS} ports", field)
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
        for label in ("name", "type"):  # accepted from RIK and Kubernetes, not used here
            if entry.get(label) is not None:
                _text(entry[label], f"{where}.{label}", MAX_PORT_LABEL)
        proto = entry.get("protocol", "TCP")
        if not isinstance(proto, str) or len(proto) > 8 or proto.upper() not in PROTOCOLS:
            raise InvalidArgument(f"{excerpt(proto)} is not one of {', '.join(PROTOCOLS)}",
                                  f"{where}.protocol")
        port_v: dict[str, Any] = {"port": host_v, "target_port": target_v, "protocol": proto.upper(),
                                  "container": container}
        balance = entry.get("balance")
        if balance is not None:
            # Kept only when given: specs stored before the field existed stay equal.
            port_v["balance"] = _one_of(balance, BALANCES, f"{where}.balance")
        out.append(port_v)
    return out


def _resources(value: object, field: str) -> dict[str, int | None]:
    res = _obj(value, field)
    _check_keys(res, {"cpu", "memory", "limits", "requests"}, field)
    if "limits" in res:  # Kubernetes-style resources.limits is accepted as the limit
        return _resources(res["limits"], f"{field}.limits")
    cpu, mem = _quantity(res.get("cpu"), f"{field}.cpu"), _quantity(res.get("memory"), f"{field}.memory")
    return {"cpu_millis": parse_cpu(cpu, f"{field}.cpu") if cpu is not None else None,
            "memory_bytes": parse_memory(mem, f"{field}.memory") if mem is not None else None}


def _quantity(value: object, field: str) -> object:
    """A cpu/memory/duration: a number, or a short string the units parser reads."""
    if isinstance(value, str):
        _text(value, field, MAX_QUANTITY)
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**63:
        raise InvalidArgument("out of range", field)  # float() of a huge integer overflows
    return value


def _container(raw: object, field: str, volumes: list[dict[str, Any]] | None = None
               ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    c = _obj(raw, field)
    _check_keys(c, _CONTAINER_KEYS, field)
    name = dns_label(c.get("name"), f"{field}.name")
    image = c.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise InvalidArgument("expected a non-empty image reference", f"{field}.image")
    if image is not None:
        _text(image, f"{field}.image", MAX_IMAGE, "an image reference")
    runtime = _one_of(c.get("runtime") or ("containerd" if image else "process"),
                      ("process", "containerd"), f"{field}.runtime")
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
    if workdir is not None:
        _text(workdir, f"{field}.workingDir", MAX_PATH, "a path")
    spec: dict[str, Any] = {
        "name": name, "image": image, "runtime": runtime, "command": command, "args": args,
        "env": _env(c["env"], f"{field}.env") if "env" in c else {},
        "workingDir": workdir,
        "resources": _resources(c["resources"], f"{field}.resources") if "resources" in c
        else {"cpu_millis": None, "memory_bytes": None},
    }
    if c.get("volumeMounts") is not None:   # kept only when given: older specs hash the same
        spec["volumeMounts"] = parse_mounts(c["volumeMounts"], f"{field}.volumeMounts", volumes or [])
    ports = _ports(c["ports"], f"{field}.ports", name) if c.get("ports") is not None else []
    raw_ports: list[Any] = c["ports"] if isinstance(c.get("ports"), list) else [c.get("ports")]
    named: list[Mapping[str, Any]] = [{"name": raw.get("name"), "target_port": port["target_port"]}
                                      for raw, port in zip(raw_ports, ports, strict=False)]
    spec.update(parse_probes(c, field, named))
    return spec, ports


def parse_workload(data: Mapping[str, Any], default_grace: float = 10.0) -> Workload:
    """Validate a workload document and normalize it into one spec per replica."""
    _check_keys(data, _TOP_KEYS, "")
    kind = data.get("kind", "Pod")
    if kind != "Pod":
        raise InvalidArgument(f"unsupported kind {excerpt(kind)} (this node runs Pod)", "kind")
    api = data.get("apiVersion", "v1")
    if api != "v1":
        raise InvalidArgument(f"unsupported apiVersion {excerpt(api)} (v1)", "apiVersion")
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
    volumes = parse_volumes(spec["volumes"]) if spec.get("volumes") is not None else None
    containers: list[dict[str, Any]] = []
    ports: list[dict[str, Any]] = []
    for i, raw in enumerate(raw_containers):
        container, container_ports = _container(raw, f"spec.containers[{i}]", volumes)
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
    policy = _one_of(spec.get("restartPolicy", "Always"), RESTART_POLICIES, "spec.restartPolicy")
    grace = _quantity(spec.get("terminationGracePeriodSeconds", default_grace),
                      "spec.terminationGracePeriodSeconds")
    grace = parse_duration(grace, "spec.terminationGracePeriodSeconds")
    if grace > 3600:
        raise InvalidArgument("at most 3600 seconds", "spec.terminationGracePeriodSeconds")
    host_network = spec.get("hostNetwork", False)
    if not isinstance(host_network, bool):
        raise InvalidArgument("expected true or false", "spec.hostNetwork")
    base = {"workload": name, "kind": kind, "restartPolicy": policy, "gracePeriod": grace,
            "hostNetwork": host_network, "containers": containers, "ports": ports}
    if volumes is not None:
        base["volumes"] = volumes
    names = [name] if replicas == 1 else [f"{name}-{i}" for i in range(replicas)]
    for pod in names:
        dns_label(pod, "name")  # the replica suffix must still fit a DNS label
    return Workload(name=name, kind=kind,
                    pods=tuple((pod, {**base, "replica": i}) for i, pod in enumerate(names)))


def host_ports(spec: Mapping[str, Any]) -> set[tuple[str, int]]:
    """The node ports a pod spec claims, whether the proxy or the workload itself binds them."""
    return {(p["protocol"], p["port"]) for p in spec.get("ports", []) if p.get("port")}
