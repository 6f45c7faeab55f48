"""Named volumes: directories under ``<state_dir>/volumes/NAME/`` that outlive their pods.

Each volume is ``NAME/volume.json`` (name, size, creation time) and ``NAME/data/`` (what pods
see). A volume is made whole in a hidden directory and renamed into place, and the rename and
its directory are fsynced before create returns: once ``volume create`` answers, the volume
exists after any kill or power cut. Removal renames it out of sight first (a volume is there or
not, never half gone), then deletes the tree. Leftovers of an interrupted create or remove are
swept when the store opens.

Who may use a volume is decided under the apply locks (``("volume", NAME)``): an apply that
claims NAME checks it exists and writes its pods while holding the key, and a removal checks
that no pod claims NAME and removes it while holding the same key, so neither can slip between
the other's check and write.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from common.errors import AlreadyExists, Conflict, InvalidArgument, NotFound, Unavailable
from common.model import dns_label
from common.volumes import claims

META = "volume.json"
DATA = "data"
_HIDDEN = "."     # in-progress creates and removals: never a volume name (DNS labels)


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    size_bytes: int | None      # what create asked for (informational: not a quota)
    created_at: float
    path: str                   # the data directory pods mount


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def usage(path: str) -> int:
    """Bytes of the files under ``path`` (allocated blocks, hard links counted once), without
    following symlinks: the cost of a walk, paid only when asked."""
    total, seen = 0, set()
    stack = [path]
    while stack:
        top = stack.pop()
        with contextlib.suppress(OSError), os.scandir(top) as it:
            for entry in it:
                with contextlib.suppress(OSError):
                    st = entry.stat(follow_symlinks=False)
                    if (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
    return total


class VolumeStore:
    def __init__(self, state_dir: str) -> None:
        self.root = os.path.join(state_dir, "volumes")
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        self._sweep()

    def _sweep(self) -> None:
        for name in os.listdir(self.root):
            if name.startswith(_HIDDEN):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    def data_path(self, name: str) -> str:
        return os.path.join(self.root, name, DATA)

    def exists(self, name: str) -> bool:
        return os.path.isfile(os.path.join(self.root, name, META))

    def get(self, name: str) -> VolumeInfo:
        name = dns_label(name, "name")
        try:
            with open(os.path.join(self.root, name, META), "rb") as fh:
                meta = json.load(fh)
        except FileNotFoundError:
            raise NotFound(f"no volume {name} on this node", "name") from None
        except (OSError, ValueError) as exc:
            raise NotFound(f"volume {name} is unreadable: {exc}", "name") from exc
        size = meta.get("size_bytes")
        return VolumeInfo(name=name, size_bytes=int(size) if size is not None else None,
                          created_at=float(meta.get("created_at", 0.0)), path=self.data_path(name))

    def all(self) -> list[VolumeInfo]:
        out = []
        for name in sorted(os.listdir(self.root)):
            if not name.startswith(_HIDDEN):
                with contextlib.suppress(NotFound, InvalidArgument):
                    out.append(self.get(name))
        return out

    def create(self, name: str, size_bytes: int | None = None) -> VolumeInfo:
        """Make the volume durably; AlreadyExists if it is there. The caller holds its key."""
        name = dns_label(name, "name")
        final = os.path.join(self.root, name)
        if os.path.lexists(final):
            raise AlreadyExists(f"volume {name} exists", "name")
        tmp = os.path.join(self.root, f"{_HIDDEN}new-{name}-{uuid.uuid4().hex[:8]}")
        os.mkdir(tmp, 0o700)
        try:
            # 0777+t like /tmp: the workloads run as another user than the agent
            os.mkdir(os.path.join(tmp, DATA))
            os.chmod(os.path.join(tmp, DATA), 0o1777)
            meta = {"name": name, "size_bytes": size_bytes, "created_at": time.time()}
            with open(os.path.join(tmp, META), "w", encoding="utf-8") as fh:
                json.dump(meta, fh)
                fh.flush()
                os.fsync(fh.fileno())
            _fsync_dir(tmp)
            os.rename(tmp, final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if os.path.lexists(final):
                raise AlreadyExists(f"volume {name} exists", "name") from None
            raise
        _fsync_dir(self.root)
        return self.get(name)

    def remove(self, name: str, users: Callable[[str], list[str]]) -> VolumeInfo:
        """Remove the volume and its data, unless ``users(name)`` names pods that claim it (then
        Conflict naming them). The caller holds its key."""
        info = self.get(name)
        pods: list[str] = users(info.name)
        if pods:
            shown = ", ".join(pods[:20]) + (f" and {len(pods) - 20} more" if len(pods) > 20 else "")
            raise Conflict(f"volume {info.name} is in use by pod{'s' if len(pods) > 1 else ''} {shown}: "
                           "delete them first", "name")
        gone = os.path.join(self.root, f"{_HIDDEN}rm-{info.name}-{uuid.uuid4().hex[:8]}")
        os.rename(os.path.join(self.root, info.name), gone)
        _fsync_dir(self.root)
        shutil.rmtree(gone, ignore_errors=True)
        return info


def claimed_by(records: Iterable[Mapping[str, Any]], name: str) -> list[str]:
    """The pods among ``records`` (memory's, with their spec) whose spec claims volume ``name``."""
    return sorted(r["name"] for r in records if name in claims(r.get("spec") or {}))


def check_claims(spec: Mapping[str, Any], store: VolumeStore | None) -> None:
    """InvalidArgument naming the field when a pod claims a volume this node does not have.
    Called under the apply locks, which hold each claimed volume's key."""
    for i, vol in enumerate(spec.get("volumes") or ()):
        claim = vol.get("persistentVolumeClaim")
        if claim is None:
            continue
        field = f"spec.volumes[{i}].persistentVolumeClaim.claimName"
        if store is None:
            raise Unavailable("this node keeps no named volumes", field)
        if not store.exists(claim["claimName"]):
            raise InvalidArgument(f"no volume {claim['claimName']} on this node (make it with "
                                  f"rikletctl volume create {claim['claimName']})", field)
