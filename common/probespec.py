"""Health probes of a container, as Kubernetes spells them, validated and normalized once.

A container may have a ``livenessProbe``, a ``readinessProbe`` and a ``startupProbe``. Each has
exactly one handler (``exec.command``, ``httpGet {path, port, host?, scheme?, httpHeaders?}``
or ``tcpSocket {port, host?}``) and Kubernetes' timing fields with Kubernetes' defaults. A port
may be a number or the name of one of the container's ports (resolved here, to the number the
container listens on). The normalized form is what the prober runs and what memory stores.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from common.errors import InvalidArgument, excerpt
from common.fields import check_int as _int
from common.fields import check_keys as _keys
from common.fields import check_object as _obj

PROBES = ("livenessProbe", "readinessProbe", "startupProbe")
HANDLERS = ("exec", "httpGet", "tcpSocket")
# Kubernetes' defaults and the bounds riklet accepts (seconds, counts).
TIMING: dict[str, tuple[int, int, int]] = {     # field -> (default, lowest, highest)
    "initialDelaySeconds": (0, 0, 3600),
    "periodSeconds": (10, 1, 3600),
    "timeoutSeconds": (1, 1, 3600),
    "successThreshold": (1, 1, 1000),
    "failureThreshold": (3, 1, 1000),
}
_KEYS = set(HANDLERS) | set(TIMING) | {"terminationGracePeriodSeconds"}
_HTTP_KEYS = {"path", "port", "host", "scheme", "httpHeaders"}
_TCP_KEYS = {"port", "host"}
_HEADER = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}")
MAX_PATH = 2048
MAX_HEADERS = 32
MAX_HEADER_VALUE = 4096
MAX_ARGV = 256
MAX_ARG = 4096




def _str(value: object, field: str, limit: int) -> str:
    if not isinstance(value, str) or "\0" in value or "\r" in value or "\n" in value:
        raise InvalidArgument("expected a string without NUL or line breaks", field)
    if len(value) > limit:
        raise InvalidArgument(f"{len(value)} characters, more than the {limit} allowed", field)
    return value


def _port(value: object, field: str, named: Mapping[str, int]) -> int:
    if isinstance(value, str) and not value.isdigit():
        if value not in named:
            known = ", ".join(sorted(named)) or "none"
            raise InvalidArgument(f"{excerpt(value)} is not a named port of this container "
                                  f"(named ports: {known})", field)
        return named[value]
    if isinstance(value, str):
        value = int(value)
    return _int(value, field, 1, 65535)


def _host(obj: Mapping[str, Any], field: str) -> str | None:
    if obj.get("host") is None:
        return None
    return _str(obj["host"], f"{field}.host", 253)


def _handler(probe: Mapping[str, Any], field: str, named: Mapping[str, int]) -> dict[str, Any]:
    given = [h for h in HANDLERS if probe.get(h) is not None]
    if len(given) != 1:
        raise InvalidArgument(f"give exactly one of {', '.join(HANDLERS)}", field)
    kind = given[0]
    where = f"{field}.{kind}"
    raw = _obj(probe[kind], where)
    if kind == "exec":
        _keys(raw, {"command"}, where)
        command = raw.get("command")
        if not isinstance(command, list) or not command or len(command) > MAX_ARGV:
            raise InvalidArgument(f"expected a non-empty list of at most {MAX_ARGV} strings",
                                  f"{where}.command")
        argv = [_str(a, f"{where}.command[{i}]", MAX_ARG) for i, a in enumerate(command)]
        if not argv[0]:
            raise InvalidArgument("the program name is empty", f"{where}.command[0]")
        return {"exec": {"command": argv}}
    if kind == "tcpSocket":
        _keys(raw, _TCP_KEYS, where)
        if "port" not in raw:
            raise InvalidArgument("a tcpSocket probe needs a port", f"{where}.port")
        return {"tcpSocket": {"port": _port(raw["port"], f"{where}.port", named),
                              "host": _host(raw, where)}}
    _keys(raw, _HTTP_KEYS, where)
    if "port" not in raw:
        raise InvalidArgument("an httpGet probe needs a port", f"{where}.port")
    path = _str(raw.get("path", "/"), f"{where}.path", MAX_PATH)
    if not path.startswith("/") or " " in path:
        raise InvalidArgument("expected an absolute path without spaces, like /healthz", f"{where}.path")
    scheme = raw.get("scheme", "HTTP")
    if scheme not in ("HTTP", "HTTPS"):
        raise InvalidArgument(f"{excerpt(scheme)} is not one of HTTP, HTTPS", f"{where}.scheme")
    headers = raw.get("httpHeaders") or []
    if not isinstance(headers, list) or len(headers) > MAX_HEADERS:
        raise InvalidArgument(f"expected a list of at most {MAX_HEADERS} {{name, value}}",
                              f"{where}.httpHeaders")
    out_headers = []
    for i, h in enumerate(headers):
        hw = f"{where}.httpHeaders[{i}]"
        h = _obj(h, hw)
        _keys(h, {"name", "value"}, hw)
        name = _str(h.get("name"), f"{hw}.name", 256)
        if not _HEADER.fullmatch(name):
            raise InvalidArgument(f"{excerpt(name)} is not an HTTP header name", f"{hw}.name")
        out_headers.append({"name": name, "value": _str(h.get("value", ""), f"{hw}.value",
                                                        MAX_HEADER_VALUE)})
    return {"httpGet": {"path": path, "port": _port(raw["port"], f"{where}.port", named),
                        "host": _host(raw, where), "scheme": scheme, "httpHeaders": out_headers}}


def parse_probe(value: object, field: str, named_ports: Mapping[str, int]) -> dict[str, Any]:
    """One probe, normalized: its handler and every timing field (defaults filled in)."""
    probe = _obj(value, field)
    _keys(probe, _KEYS, field)
    out = _handler(probe, field, named_ports)
    for key, (default, lo, hi) in TIMING.items():
        out[key] = _int(probe.get(key, default), f"{field}.{key}", lo, hi)
    if out["timeoutSeconds"] > out["periodSeconds"]:
        raise InvalidArgument("must not be longer than periodSeconds", f"{field}.timeoutSeconds")
    if probe.get("terminationGracePeriodSeconds") is not None:
        out["terminationGracePeriodSeconds"] = _int(probe["terminationGracePeriodSeconds"],
                                                    f"{field}.terminationGracePeriodSeconds", 0, 3600)
    return out


def parse_probes(container: Mapping[str, Any], field: str,
                 ports: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The container's probes that are given (a container without probes gets no keys, so
    specs stored before probes existed stay equal)."""
    named = {str(p["name"]): int(p["target_port"]) for p in ports
             if p.get("name") and p.get("target_port")}
    out: dict[str, Any] = {}
    for kind in PROBES:
        if container.get(kind) is None:
            continue
        probe = parse_probe(container[kind], f"{field}.{kind}", named)
        if kind != "readinessProbe" and probe["successThreshold"] != 1:
            raise InvalidArgument("must be 1 for liveness and startup probes",
                                  f"{field}.{kind}.successThreshold")
        out[kind] = probe
    return out
