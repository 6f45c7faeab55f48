"""Where a pod's volumes are on the node, made ready for a start: both runtimes use this.

- ``emptyDir``: ``<pod_dir>/volumes/NAME/``, removed with the pod's directory. With medium
  ``Memory`` the directory is only a mount point: the process shim mounts a tmpfs there in the
  pod's private mount namespace (so nothing of it ever reaches the disk, and it goes when the
  shim does); the containerd driver mounts one on the host and unmounts it at cleanup.
- ``hostPath``: the path itself, checked (or created) by its ``type`` as Kubernetes does. The
  node's policy (``volumes.host_path_prefixes``) was checked at apply.
- ``persistentVolumeClaim``: the named volume's ``data/`` directory (``store.py``).

A problem raises InvalidArgument naming the field; the reconciler shows it as the pod's
StartError.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from common.errors import InvalidArgument
from services.manager.volumes import tmpfs
from services.manager.volumes.store import DATA

EMPTY_DIRS = "volumes"   # under the pod's directory


@dataclass(frozen=True)
class Mount:
    source: str        # on the node
    target: str        # the container's mountPath
    read_only: bool


@dataclass(frozen=True)
class PodVolumes:
    tmpfs: list[tuple[str, int | None]] = field(default_factory=list)  # Memory emptyDirs: (dir, size)
    mounts: dict[str, list[Mount]] = field(default_factory=dict)         # per container name
    disk_limits: list[tuple[str, int]] = field(default_factory=list)     # disk emptyDirs: (dir, limit)


_HOST_TYPES = {"Directory": (stat.S_ISDIR, "a directory"), "File": (stat.S_ISREG, "a file"),
               "Socket": (stat.S_ISSOCK, "a socket"), "CharDevice": (stat.S_ISCHR, "a character device"),
               "BlockDevice": (stat.S_ISBLK, "a block device")}


def _host_path(hp: Mapping[str, Any], where: str) -> str:
    path, kind = hp["path"], hp["type"]
    if kind == "DirectoryOrCreate":
        os.makedirs(path, mode=0o755, exist_ok=True)
        kind = "Directory"
    elif kind == "FileOrCreate":
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            with open(path, "a"):
                pass
        kind = "File"
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise InvalidArgument(f"{path}: {exc.strerror}", f"{where}.path") from exc
    if kind in _HOST_TYPES and not _HOST_TYPES[kind][0](mode):
        raise InvalidArgument(f"{path} is not {_HOST_TYPES[kind][1]}", f"{where}.type")
    return str(path)


def _source(vol: Mapping[str, Any], where: str, pod_dir: str, state_dir: str, out: PodVolumes) -> str:
    if "emptyDir" in vol:
        path = os.path.join(pod_dir, EMPTY_DIRS, vol["name"])
        os.makedirs(path, exist_ok=True)
        os.chmod(path, 0o1777)   # the workloads' user is not the agent's (as /tmp)
        ed = vol["emptyDir"]
        if ed["medium"] == "Memory":
            out.tmpfs.append((path, ed["sizeLimit"]))
        elif ed["sizeLimit"]:
            out.disk_limits.append((path, ed["sizeLimit"]))
        return path
    if "hostPath" in vol:
        return _host_path(vol["hostPath"], f"{where}.hostPath")
    name = vol["persistentVolumeClaim"]["claimName"]
    path = os.path.join(state_dir, "volumes", name, DATA)
    if not os.path.isdir(path):
        raise InvalidArgument(f"no volume {name} on this node", f"{where}.persistentVolumeClaim.claimName")
    return path


def _sub_path(base: str, sub: str, where: str) -> str:
    """``base/sub``, made a directory when missing, refused when it leads out of ``base``
    (a symlink the pod put there)."""
    path = os.path.join(base, sub)
    if not os.path.lexists(path):
        os.makedirs(path, exist_ok=True)
        os.chmod(path, 0o1777)
    real, root = os.path.realpath(path), os.path.realpath(base)
    if real != root and not real.startswith(root.rstrip("/") + "/"):
        raise InvalidArgument(f"{sub} leads out of its volume", f"{where}.subPath")
    return real


def prepare(spec: Mapping[str, Any], pod_dir: str, state_dir: str, host_targets: bool) -> PodVolumes:
    """Make each volume of ``spec`` ready and say what each container mounts where.
    ``host_targets``: mount targets are the node's own paths (a process pod has no root
    filesystem of its own), so each must exist there already. The InvalidArgument's message
    names the field too: the pod's status shows the message alone."""
    try:
        return _prepare(spec, pod_dir, state_dir, host_targets)
    except InvalidArgument as exc:
        raise InvalidArgument(str(exc), exc.field) from exc


def _prepare(spec: Mapping[str, Any], pod_dir: str, state_dir: str, host_targets: bool) -> PodVolumes:
    out = PodVolumes()
    sources: dict[str, str] = {}
    read_only: dict[str, bool] = {}
    for i, vol in enumerate(spec.get("volumes") or ()):
        try:
            sources[vol["name"]] = _source(vol, f"spec.volumes[{i}]", pod_dir, state_dir, out)
        except OSError as exc:   # a hostPath to create, a directory the agent cannot make
            raise InvalidArgument(f"{exc.filename}: {exc.strerror}", f"spec.volumes[{i}]") from exc
        read_only[vol["name"]] = bool(vol.get("persistentVolumeClaim", {}).get("readOnly"))
    for ci, c in enumerate(spec["containers"]):
        mounts = []
        for mi, m in enumerate(c.get("volumeMounts") or ()):
            where = f"spec.containers[{ci}].volumeMounts[{mi}]"
            src = sources[m["name"]]
            if m["subPath"]:
                try:
                    src = _sub_path(src, m["subPath"], where)
                except OSError as exc:
                    raise InvalidArgument(f"{exc.filename}: {exc.strerror}", f"{where}.subPath") from exc
            if host_targets and not os.path.exists(m["mountPath"]):
                raise InvalidArgument(
                    f"{m['mountPath']} does not exist on this node: a process pod has no root "
                    "filesystem of its own, and riklet creates nothing in the node's (give an "
                    "existing directory, or run the pod with an image)", f"{where}.mountPath")
            mounts.append(Mount(src, m["mountPath"], m["readOnly"] or read_only[m["name"]]))
        if mounts:
            out.mounts[c["name"]] = mounts
    return out


def container_mounts(spec: Mapping[str, Any], pod_dir: str, state_dir: str) -> dict[str, list[list[Any]]]:
    """For a container runtime (a root filesystem of its own per container): the volumes made
    ready, Memory emptyDirs mounted as tmpfs on the node, and per container its
    ``[source, target, read_only]`` binds (JSON, kept in the pod's driver.json)."""
    vols = prepare(spec, pod_dir, state_dir, host_targets=False)
    for directory, size in vols.tmpfs:
        tmpfs.mount(directory, size, "spec.volumes")
    return {name: [[m.source, m.target, m.read_only] for m in mounts]
            for name, mounts in vols.mounts.items()}
