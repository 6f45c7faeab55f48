"""Which program holds a port: best effort, from /proc (sockets by inode, then whose fd it is).

Used to name the holder in the error a taken host port gets. Reading other processes' fds
needs root (or the same user); a holder that cannot be found is reported as unknown.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

_TABLES = {"TCP": ("tcp", "tcp6"), "UDP": ("udp", "udp6"), "SCTP": ()}
_TCP_LISTEN = "0A"
MAX_COMMAND = 80   # characters of the holder's command line kept in a message


@dataclass(frozen=True)
class Holder:
    pid: int
    command: str

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.command})"


def socket_inodes(protocol: str, port: int, proc: str = "/proc") -> set[int]:
    """Inodes of the sockets bound to ``port`` (TCP: listening ones) in this network namespace."""
    found: set[int] = set()
    for table in _TABLES.get(protocol, ()):
        with contextlib.suppress(OSError), open(os.path.join(proc, "net", table)) as f:
            next(f, None)   # the header
            for line in f:
                fields = line.split()
                if len(fields) < 10 or int(fields[1].rsplit(":", 1)[1], 16) != port:
                    continue
                if protocol == "TCP" and fields[3] != _TCP_LISTEN:
                    continue
                found.add(int(fields[9]))
    found.discard(0)
    return found


def holder(protocol: str, port: int, exclude_pids: frozenset[int] = frozenset(),
           proc: str = "/proc") -> Holder | None:
    """A process with a socket bound to ``port``, None if none can be found."""
    inodes = socket_inodes(protocol, port, proc)
    if not inodes:
        return None
    wanted = {f"socket:[{i}]" for i in inodes}
    for name in os.listdir(proc):
        if not name.isdigit() or int(name) in exclude_pids:
            continue
        fd_dir = os.path.join(proc, name, "fd")
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue   # gone, or not ours to read
        for fd in fds:
            try:
                if os.readlink(os.path.join(fd_dir, fd)) in wanted:
                    return Holder(int(name), _command(proc, name))
            except OSError:
                continue
    return None


def describe(protocol: str, port: int, exclude_pids: frozenset[int] = frozenset()) -> str:
    """``"pid 12 (cmd)"``, or ``"an unknown program"`` when no holder can be found."""
    found = holder(protocol, port, exclude_pids)
    return str(found) if found is not None else "an unknown program"


def _command(proc: str, pid: str) -> str:
    try:
        with open(os.path.join(proc, pid, "cmdline"), "rb") as f:
            raw = f.read(4 * MAX_COMMAND)
    except OSError:
        raw = b""
    text = raw.replace(b"\0", b" ").decode(errors="replace").strip()
    if not text:
        with contextlib.suppress(OSError), open(os.path.join(proc, pid, "comm")) as f:
            text = f.read().strip()
    return text if len(text) <= MAX_COMMAND else text[:MAX_COMMAND - 3] + "..."
