"""Pod volumes and container volume mounts: their validation and normalized form.

Field names follow Kubernetes' pod spec::

    spec.volumes: [{name, emptyDir: {medium: ""|Memory, sizeLimit}}
                   | {name, hostPath: {path, type}}
                   | {name, persistentVolumeClaim: {claimName, readOnly}}]
    spec.containers[].volumeMounts: [{name, mountPath, readOnly, subPath}]

The normalized form (kept in the stored spec only when the manifest gives the field, so specs
stored before volumes existed hash the same)::

    {"name": N, "emptyDir": {"medium": "", "sizeLimit": BYTES|None}}
    {"name": N, "hostPath": {"path": ABS, "type": T}}
    {"name": N, "persistentVolumeClaim": {"claimName": NAME, "readOnly": bool}}
    {"name": N, "mountPath": ABS, "readOnly": bool, "subPath": REL ("" for none)}
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from typing import Any

from common.errors import InvalidArgument, excerpt
from common.fields import check_keys as _keys
from common.units import parse_memory

MAX_VOLUMES = 64
MAX_MOUNTS = 64         # per container
MAX_PATH = 4096
SOURCES = ("emptyDir", "hostPath", "persistentVolumeClaim")
MEDIUMS = ("", "Memory")
# Kubernetes' HostPathType values ("" checks nothing).
HOST_PATH_TYPES = ("", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket",
                   "CharDevice", "BlockDevice")
_TYPES_TEXT = ", ".join(t or '""' for t in HOST_PATH_TYPES)
_VOLUME_KEYS = {"name", *SOURCES}
_MOUNT_KEYS = {"name", "mountPath", "readOnly", "subPath"}


def _label(value: object, field: str) -> str:
    from common.model import dns_label  # model imports this module

    return dns_label(value, field)




def _obj(value: object, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument("expected an object", field)
    return value


def _bool(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument("expected true or false", field)
    return value


def _abs_path(value: object, field: str) -> str:
    """An absolute path without NUL, '..' or '.' components, normalized (no '//', no final '/')."""
    if not isinstance(value, str) or "\0" in value or not value.startswith("/"):
        raise InvalidArgument(f"{excerpt(value)} is not an absolute path", field)
    if len(value) > MAX_PATH:
        raise InvalidArgument(f"{len(value)} characters, more than the {MAX_PATH} allowed", field)
    parts = [p for p in value.split("/") if p]
    if any(p in ("..", ".") for p in parts):
        raise InvalidArgument("must not contain '.' or '..' components", field)
    return "/" + "/".join(parts)


def _sub_path(value: object, field: str) -> str:
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or "\0" in value or len(value) > MAX_PATH:
        raise InvalidArgument("expected a relative path", field)
    if value.startswith("/"):
        raise InvalidArgument("must be a relative path (inside the volume)", field)
    parts = [p for p in value.split("/") if p and p != "."]
    if ".." in parts:
        raise InvalidArgument("must not contain '..'", field)
    return posixpath.join(*parts) if parts else ""


def _empty_dir(raw: object, field: str) -> dict[str, Any]:
    ed = _obj(raw, field)
    _keys(ed, {"medium", "sizeLimit"}, field)
    medium = ed.get("medium", "")
    if medium not in MEDIUMS:
        raise InvalidArgument(f"{excerpt(medium)} is not one of \"\", Memory", f"{field}.medium")
    limit = ed.get("sizeLimit")
    size = None
    if limit is not None:
        if isinstance(limit, str) and len(limit) > 32:
            raise InvalidArgument("expected a size like 64Mi", f"{field}.sizeLimit")
        size = parse_memory(limit, f"{field}.sizeLimit")
    return {"medium": medium, "sizeLimit": size}


def _host_path(raw: object, field: str) -> dict[str, Any]:
    hp = _obj(raw, field)
    _keys(hp, {"path", "type"}, field)
    path = _abs_path(hp.get("path"), f"{field}.path")
    kind = hp.get("type", "")
    if kind not in HOST_PATH_TYPES:
        raise InvalidArgument(f"{excerpt(kind)} is not one of {_TYPES_TEXT}", f"{field}.type")
    return {"path": path, "type": kind}


def _claim(raw: object, field: str) -> dict[str, Any]:
    pvc = _obj(raw, field)
    _keys(pvc, {"claimName", "readOnly"}, field)
    return {"claimName": _label(pvc.get("claimName"), f"{field}.claimName"),
            "readOnly": _bool(pvc.get("readOnly", False), f"{field}.readOnly")}


_PARSERS = {"emptyDir": _empty_dir, "hostPath": _host_path, "persistentVolumeClaim": _claim}


def parse_volumes(value: object, field: str = "spec.volumes") -> list[dict[str, Any]]:
    """A pod's ``spec.volumes``, normalized; each bad field named."""
    if not isinstance(value, list):
        raise InvalidArgument("expected a list of volumes", field)
    if len(value) > MAX_VOLUMES:
        raise InvalidArgument(f"more than {MAX_VOLUMES} volumes", field)
    out: list[dict[str, Any]] = []
    for i, raw in enumerate(value):
        where = f"{field}[{i}]"
        vol = _obj(raw, where) if raw is not None else None
        if vol is None:
            raise InvalidArgument("expected an object", where)
        _keys(vol, _VOLUME_KEYS, where)
        name = _label(vol.get("name"), f"{where}.name")
        if any(v["name"] == name for v in out):
            raise InvalidArgument(f"duplicate volume name {name!r}", f"{where}.name")
        given = [s for s in SOURCES if s in vol]
        if len(given) != 1:
            what = "no source" if not given else f"two sources ({', '.join(given)})"
            raise InvalidArgument(f"{what}: give exactly one of {', '.join(SOURCES)}",
                                  f"{where}.{given[1]}" if len(given) > 1 else where)
        out.append({"name": name, given[0]: _PARSERS[given[0]](vol[given[0]], f"{where}.{given[0]}")})
    return out


def parse_mounts(value: object, field: str, volumes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A container's ``volumeMounts``, normalized; a mount must name one of ``volumes``."""
    if not isinstance(value, list):
        raise InvalidArgument("expected a list of volume mounts", field)
    if len(value) > MAX_MOUNTS:
        raise InvalidArgument(f"more than {MAX_MOUNTS} volume mounts", field)
    names = {v["name"] for v in volumes}
    out: list[dict[str, Any]] = []
    for i, raw in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(raw, dict):
            raise InvalidArgument("expected an object", where)
        _keys(raw, _MOUNT_KEYS, where)
        name = raw.get("name")
        if not isinstance(name, str) or name not in names:
            known = ", ".join(sorted(names)) or "none"
            raise InvalidArgument(f"{excerpt(name)} is not a volume of the pod (spec.volumes: {known})",
                                  f"{where}.name")
        path = _abs_path(raw.get("mountPath"), f"{where}.mountPath")
        if path == "/":
            raise InvalidArgument("cannot mount over /", f"{where}.mountPath")
        if any(m["mountPath"] == path for m in out):
            raise InvalidArgument(f"{path} is mounted twice", f"{where}.mountPath")
        out.append({"name": name, "mountPath": path,
                    "readOnly": _bool(raw.get("readOnly", False), f"{where}.readOnly"),
                    "subPath": _sub_path(raw.get("subPath"), f"{where}.subPath")})
    return out


def claims(spec: Mapping[str, Any]) -> set[str]:
    """The named volumes a normalized pod spec claims."""
    return {v["persistentVolumeClaim"]["claimName"] for v in spec.get("volumes") or ()
            if "persistentVolumeClaim" in v}


def host_paths(spec: Mapping[str, Any]) -> list[tuple[int, str]]:
    """(index in spec.volumes, path) of each hostPath volume of a normalized pod spec."""
    return [(i, v["hostPath"]["path"]) for i, v in enumerate(spec.get("volumes") or ())
            if "hostPath" in v]


def under_prefix(path: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``path`` (normalized, absolute) is one of ``prefixes`` or inside one."""
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)
