"""The CHaS deploy body and container view as pure functions, no I/O: a deploy request
(seed 003) parsed and checked into the pod document the Node API's core applies, a pod record
shown as a CHaS container, and the core's field names as the body names them."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from common.errors import InvalidArgument, excerpt
from common.model import dns_label
from common.pod import Desired, Phase, desired_of, phase_of, ready_of
from common.probespec import PROBES, parse_probe
from common.units import parse_cpu, parse_memory

MAX_STORED = 200 * 1024            # JSON bytes of a deployment once normalized (memory keeps 256 KiB)
MAX_PORTS = 64
MAX_ENV = 512
MAX_ARGV = 1024
MAX_MEMORY = 1 << 60

# The pod phase as a CHaS container status.
STATUSES: Mapping[Phase, str] = {
    Phase.PENDING: "pending", Phase.CREATING: "creating", Phase.RUNNING: "running",
    Phase.ERROR: "error", Phase.TERMINATING: "terminating", Phase.TERMINATED: "stopped",
}

DEPLOY_KEYS = ("image", "name", "exposed_ports", "resources", "environment", "command", "args",
               "volumes", "volumeMounts", *PROBES)   # these: riklet's extensions, as in a pod spec
PORT_KEYS = ("container", "protocol", "host")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")



def container_status(record: Mapping[str, Any]) -> str:
    """A pod's CHaS status: its phase in lower case (Terminated is "stopped"); a pod being
    deleted is "terminating" until it is gone."""
    if desired_of(record) is Desired.DELETED:
        return "terminating"
    return STATUSES[phase_of(record)]


def container_health(record: Mapping[str, Any]) -> str | None:
    """A running pod's health by its probes: "healthy" when ready, "starting" while a startup
    probe has not passed, else "unhealthy"; None when it is not running."""
    if phase_of(record) is not Phase.RUNNING or desired_of(record) is not Desired.RUNNING:
        return None
    if ready_of(record):
        return "healthy"
    containers = (record.get("status") or {}).get("containers") or []
    return "starting" if any(c.get("started") is False for c in containers) else "unhealthy"


def container_summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """The seed's container object (plus ``reason`` and each port's ``protocol``)."""
    spec = record.get("spec") or {}
    containers = spec.get("containers") or [{}]
    image = containers[0].get("image") or None
    status = record.get("status") or {}
    return {
        "id": record.get("uid", ""),
        "name": record.get("name", ""),
        "image": image,
        "status": container_status(record),
        "reason": status.get("reason") or None,
        "health": container_health(record),
        "ports": [{"host": p.get("port") or None, "container": p.get("target_port") or None,
                   "protocol": str(p.get("protocol", "TCP")).lower()}
                  for p in spec.get("ports") or []],
    }


def format_gb(n: int) -> str:
    """Bytes as the seed writes sizes ("50GB"): GB is 2**30 bytes, as in riklet's units
    (512m = 512 MiB), with one decimal under 10 GB."""
    value = n / float(1 << 30)
    text = f"{value:.0f}" if value >= 10 else f"{value:.1f}".removesuffix(".0")
    return f"{text}GB"


# -- the deploy request ---------------------------------------------------------------------------

@dataclass(frozen=True)
class DeployRequest:
    name: str
    image: str | None
    document: dict[str, Any]     # the workload document for NodeService.apply_document
    digest: str                  # of the request as sent (canonical JSON): idempotence


def short(value: object) -> str:
    return excerpt(value)


def _opt(data: Mapping[str, Any], key: str) -> Any:
    return data.get(key)  # null is the same as absent


def _port_number(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise InvalidArgument(f"expected a port number from 1 to 65535, got {short(value)}", field)
    return value


def _strings(value: object, field: str, min_items: int) -> list[str]:
    if not isinstance(value, list) or not min_items <= len(value) <= MAX_ARGV:
        raise InvalidArgument(f"expected a list of {min_items} to {MAX_ARGV} strings", field)
    for i, item in enumerate(value):
        if not isinstance(item, str) or "\0" in item:
            raise InvalidArgument("expected a string without NUL characters", f"{field}[{i}]")
    return list(value)


def _guarded(parse: Callable[[object, str], int], value: object, field: str) -> int:
    try:
        return parse(value, field)
    except (OverflowError, ValueError) as exc:  # a number too large for a float
        raise InvalidArgument(f"cannot parse {short(value)}", field) from exc


def parse_deploy(data: object) -> DeployRequest:
    """Validate a ``POST /containers/deploy`` body and map it to a workload document; every
    rejection names the body field at fault."""
    if not isinstance(data, dict):
        raise InvalidArgument("expected a JSON object", "body")
    for key in data:
        if key not in DEPLOY_KEYS:
            raise InvalidArgument(f"unknown field (allowed: {', '.join(DEPLOY_KEYS)})", str(key)[:100])
    name = data.get("name")
    if name is None:
        raise InvalidArgument("required: the container's name (a DNS label)", "name")
    if not isinstance(name, str) or len(name) > 63:
        raise InvalidArgument("expected a DNS label of at most 63 characters", "name")
    dns_label(name, "name")

    image = _opt(data, "image")
    if image is not None and (not isinstance(image, str) or not image.strip() or len(image) > 512
                              or any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in image)):
        raise InvalidArgument("expected an image reference like nginx:latest (at most 512 characters, "
                              "no spaces)", "image")
    command = _opt(data, "command")
    if command is not None:
        command = _strings(command, "command", 1)
        if image is None and not command[0]:
            raise InvalidArgument("the program name is empty", "command[0]")
    args = _opt(data, "args")
    if args is not None:
        args = _strings(args, "args", 0)
    if image is None and command is None:
        raise InvalidArgument("give an image, or a command to run on the process runtime", "image")

    container: dict[str, Any] = {"name": name}
    if image is not None:
        container["image"] = image
    if command is not None:
        container["command"] = command
    if args is not None:
        container["args"] = args

    ports = _opt(data, "exposed_ports")
    if ports is not None:
        container["ports"] = _exposed_ports(ports)
    resources = _opt(data, "resources")
    if resources is not None:
        container["resources"] = _resources(resources)
    environment = _opt(data, "environment")
    if environment is not None:
        container["env"] = _environment(environment)

    for kind in PROBES:   # Kubernetes' probes, checked here to name the field
        if _opt(data, kind) is not None:
            parse_probe(data[kind], kind, {})
            container[kind] = data[kind]
    if _opt(data, "volumeMounts") is not None:   # checked by the core, as a pod's
        container["volumeMounts"] = data["volumeMounts"]
    spec: dict[str, Any] = {"containers": [container]}
    if _opt(data, "volumes") is not None:
        spec["volumes"] = data["volumes"]
    document = {"apiVersion": "v1", "kind": "Pod", "name": name, "spec": spec}
    if len(json.dumps(document)) > MAX_STORED:
        raise InvalidArgument(f"the deployment is larger than {MAX_STORED // 1024} KiB once stored", "body")
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()
    return DeployRequest(name=name, image=image, document=document, digest=digest)


def _exposed_ports(value: object) -> list[dict[str, Any]]:
    if not isinstance(value, list) or len(value) > MAX_PORTS:
        raise InvalidArgument(f"expected a list of at most {MAX_PORTS} ports", "exposed_ports")
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, int]] = set()
    for i, raw in enumerate(value):
        where = f"exposed_ports[{i}]"
        if not isinstance(raw, dict):
            raise InvalidArgument("expected an object {container, protocol?, host?}", where)
        for key in raw:
            if key not in PORT_KEYS:
                raise InvalidArgument(f"unknown field (allowed: {', '.join(PORT_KEYS)})",
                                      f"{where}.{str(key)[:100]}")
        if raw.get("container") is None:
            raise InvalidArgument("required: the port the container listens on", f"{where}.container")
        target = _port_number(raw["container"], f"{where}.container")
        proto = raw.get("protocol")
        proto = "tcp" if proto is None else proto
        if not isinstance(proto, str) or proto.lower() not in ("tcp", "udp"):
            raise InvalidArgument(f"expected tcp or udp, got {short(proto)}", f"{where}.protocol")
        entry: dict[str, Any] = {"target_port": target, "protocol": proto.upper()}
        if raw.get("host") is not None:
            host = _port_number(raw["host"], f"{where}.host")
            if (entry["protocol"], host) in seen:
                raise InvalidArgument(f"host port {host}/{proto.lower()} given twice", f"{where}.host")
            seen.add((entry["protocol"], host))
            entry["port"] = host
        out.append(entry)
    return out


def _resources(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument("expected an object {cpu?, memory?}", "resources")
    for key in value:
        if key not in ("cpu", "memory"):
            raise InvalidArgument("unknown field (allowed: cpu, memory)", f"resources.{str(key)[:100]}")
    out: dict[str, Any] = {}
    cpu = value.get("cpu")
    if cpu is not None:
        if isinstance(cpu, bool) or not isinstance(cpu, (str, int, float)):
            raise InvalidArgument("expected cores as a string or number, like \"0.5\" or \"500m\"",
                                  "resources.cpu")
        out["cpu"] = f"{_guarded(parse_cpu, cpu, 'resources.cpu')}m"
    memory = value.get("memory")
    if memory is not None:
        if isinstance(memory, bool) or not isinstance(memory, (str, int, float)):
            raise InvalidArgument("expected a size like \"512m\" or a number of bytes", "resources.memory")
        size = _guarded(parse_memory, memory, "resources.memory")
        if size > MAX_MEMORY:
            raise InvalidArgument("more than 1 EiB", "resources.memory")
        out["memory"] = size
    return out


def _environment(value: object) -> dict[str, str]:
    if not isinstance(value, dict) or len(value) > MAX_ENV:
        raise InvalidArgument(f"expected an object of at most {MAX_ENV} NAME: value pairs", "environment")
    env: dict[str, str] = {}
    for key, val in value.items():
        if len(key) > 256 or not _ENV_NAME.fullmatch(key):
            raise InvalidArgument("not a valid variable name ([A-Za-z_][A-Za-z0-9_.-]*)",
                                  f"environment.{key[:100]}")
        if isinstance(val, bool) or not isinstance(val, (str, int, float)) or "\0" in str(val):
            raise InvalidArgument("expected a string", f"environment.{key}")
        env[key] = str(val)
    return env


def body_field(field: str | None) -> str | None:
    """A field named by the core (``spec.containers[0].env.X``) as the body names it."""
    if field is None:
        return None
    if field.startswith("args."):
        return "body"
    if not field.startswith("spec"):
        return field
    if field.startswith("spec.volumes"):
        return field[len("spec."):]
    rest = re.sub(r"^spec\.containers(\[\d+\])?\.?", "", field)
    if rest == field or not rest:
        return "body"
    head, sep, tail = rest.partition(".")
    if head.startswith("ports"):
        return "exposed_ports"
    if head.startswith("env"):
        return "environment" + (sep + tail if tail else "")
    return rest
