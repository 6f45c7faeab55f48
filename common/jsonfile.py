"""Small JSON files replaced atomically: the state files of the runtime drivers (a pod's
``driver.json``, ``containers.json``, the shim's ``status.json``)."""

from __future__ import annotations

import json
import os
import threading
from typing import Any


def write_json(path: str, data: object, mode: int = 0o666) -> None:
    """Replace path atomically: readers see the old or the new file, never a partial one;
    created with ``mode`` (less the umask).

    Not fsynced (a millisecond per write, two per pod start): these files must survive the kill
    of any process, which the page cache ensures; a machine crash takes the workloads with it,
    and a file lost to one reads as missing, which makes the pod start afresh from memory's
    record (memory's own writes are the ones fsynced)."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "w") as f:
        json.dump(data, f, separators=(",", ":"))
    os.replace(tmp, path)


def read_json(path: str) -> dict[str, Any] | None:
    """A JSON object from a file, or None when it is missing, unreadable or not an object."""
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
