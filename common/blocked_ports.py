"""Host ports the proxy could not hold, as it tells the manager: ``<state>/proxy-blocked.json``.

The proxy writes the file whenever the set changes; the manager's reconciler looks at it once a
second and syncs the pods whose host ports appeared in it or left it, and a pod with a blocked
host port shows Error, reason PortInUse, naming the port and its holder. A file rather than a
request: the manager reads it only when it changed, and the proxy reads it back when it
restarts, so a port stays blocked across restarts until it is free.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)

FILE_NAME = "proxy-blocked.json"
MAX_BYTES = 1 << 20   # a bigger file is not the proxy's: ignored
REASON = "PortInUse"

Key = tuple[str, int]


def path_in(state_dir: str) -> str:
    return os.path.join(state_dir, FILE_NAME)


def write(path: str, blocked: Mapping[Key, str]) -> None:
    """Replace the file atomically (no entry: the file is removed)."""
    if not blocked:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    body = {"blocked": [{"protocol": p, "port": n, "message": m}
                        for (p, n), m in sorted(blocked.items())]}
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(body, f)
    os.replace(tmp, path)


def tell(on_blocked: Callable[[dict[Key, str]], None] | None, blocked: Mapping[Key, str]) -> None:
    """Hand the blocked ports to the data path's listener (the worker writes the file); a write
    that fails is logged, never raised into the data path."""
    if on_blocked is None:
        return
    try:
        on_blocked(dict(blocked))
    except OSError as exc:
        log.error("cannot report blocked ports", extra={"error": str(exc)})


def read(path: str) -> dict[Key, str]:
    """The blocked ports and their messages; a missing or malformed file blocks nothing."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
        data = json.loads(raw) if len(raw) <= MAX_BYTES else {}
    except (OSError, ValueError):
        return {}
    entries = data.get("blocked") if isinstance(data, dict) else None
    out: dict[Key, str] = {}
    for e in entries if isinstance(entries, list) else []:
        if (isinstance(e, dict) and isinstance(e.get("protocol"), str) and type(e.get("port")) is int
                and isinstance(e.get("message"), str)):
            out[(e["protocol"], e["port"])] = e["message"]
    return out


class Reader:
    """The file as last read, read again only when its mtime or size changed. With
    ``refreshed_elsewhere``, only :meth:`refresh` looks at the file (the reconciler, once a
    second); lookups use what it read last, costing no stat per observation."""

    def __init__(self, path: str, refreshed_elsewhere: bool = False) -> None:
        self.path = path
        self.refreshed_elsewhere = refreshed_elsewhere
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None
        self._blocked: dict[Key, str] = {}

    def refresh(self) -> set[Key]:
        """Look at the file again; the ports that appeared in it, left it or changed message."""
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        with self._lock:
            if stamp == self._seen:
                return set()
            old, self._blocked = self._blocked, read(self.path) if stamp is not None else {}
            self._seen = stamp
            return {k for k in old.keys() | self._blocked.keys() if old.get(k) != self._blocked.get(k)}

    def blocked(self) -> dict[Key, str]:
        if not self.refreshed_elsewhere:
            self.refresh()
        with self._lock:
            return self._blocked

    def message(self, endpoints: Iterable[Mapping[str, Any]]) -> str | None:
        """The first blocked host port among a pod's endpoints, as its message."""
        blocked = self.blocked()
        if not blocked:
            return None
        for ep in endpoints:
            key = (str(ep.get("protocol") or "TCP").upper(), ep.get("host_port"))
            if isinstance(key[1], int) and key in blocked:
                return blocked[(key[0], key[1])]
        return None
