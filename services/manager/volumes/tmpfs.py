"""A Memory emptyDir of a containerd pod: a tmpfs mounted on the node at the volume's directory
(its containers bind it from there), unmounted before the pod's directory is removed. Process
pods do not need this: their shim mounts the tmpfs in the pod's own mount namespace."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

from common.errors import InvalidArgument

_MS_NOSUID, _MS_NODEV = 2, 4
_MNT_DETACH = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def mount(path: str, size: int | None, field: str) -> None:
    """A tmpfs of ``size`` bytes (None: the kernel's default) on ``path``, unless one is there."""
    if os.path.ismount(path):
        return
    options = f"mode=1777,size={size}" if size else "mode=1777"
    if _libc.mount(b"tmpfs", os.fsencode(path), b"tmpfs", _MS_NOSUID | _MS_NODEV,
                   options.encode()) != 0:
        err = ctypes.get_errno()
        raise InvalidArgument(f"emptyDir (medium Memory): mount tmpfs on {path}: {os.strerror(err)}",
                              field)


def unmount_under(root: str) -> None:
    """Unmount (lazily) every mount at or below ``root``: before the tree is removed."""
    prefix = os.path.realpath(root).rstrip("/") + "/"
    try:
        with open("/proc/self/mounts", encoding="utf-8") as fh:
            points = [line.split()[1].replace("\\040", " ") for line in fh]
    except OSError:
        return
    for point in sorted((p for p in points if (p + "/").startswith(prefix)), reverse=True):
        _libc.umount2(os.fsencode(point), _MNT_DETACH)
