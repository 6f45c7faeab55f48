"""A logging handler speaking journald's native protocol: no libsystemd.

Each record is one datagram to ``/run/systemd/journal/socket`` holding ``FIELD=value`` lines;
a value with a newline takes the binary-safe form (``FIELD\\n``, its length as 64-bit little
endian, the bytes, ``\\n``). A record too big for a datagram goes in a sealed memfd whose
descriptor is passed instead, as the protocol documents
(https://systemd.io/JOURNAL_NATIVE_PROTOCOL/).

Fields: MESSAGE (with the traceback, if any), PRIORITY (syslog's), SYSLOG_IDENTIFIER
(``riklet-<service>``), CODE_FILE, CODE_LINE, CODE_FUNC, LOGGER, RIKLET_SERVICE, and every
``extra`` key upper-cased (``extra={"pod": "web"}`` -> ``POD=web``, so ``journalctl POD=web``
finds it); a list value gives the field once per item, as journald allows.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import socket
import struct
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

# RIKLET_JOURNAL_SOCKET: for tests, which stand a socket of their own in journald's place.
SOCKET = os.environ.get("RIKLET_JOURNAL_SOCKET") or "/run/systemd/journal/socket"

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
_STD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "taskName"}
_BAD = re.compile(r"[^A-Z0-9_]")


def under_systemd(environ: Mapping[str, str], path: str = SOCKET) -> bool:
    """Run by systemd (supervisord passes its INVOCATION_ID and JOURNAL_STREAM on) with a journal
    to write to."""
    return bool(environ.get("INVOCATION_ID") or environ.get("JOURNAL_STREAM")) and os.path.exists(path)


def field_name(key: str) -> str | None:
    """``key`` as a journal field name (A-Z, 0-9, _, not starting with _ or a digit, ≤ 64)."""
    name = _BAD.sub("_", key.upper()).lstrip("_0123456789")[:64]
    return name or None


def encode(fields: Iterable[tuple[str, str]]) -> bytes:
    out = bytearray()
    for name, value in fields:
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


def _values(value: Any) -> Iterator[str]:
    if value is None:
        return
    if isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from _values(item)
    elif isinstance(value, str):
        yield value
    elif isinstance(value, (dict, bool)):
        yield json.dumps(value, default=str)
    else:
        yield str(value)


class JournalHandler(logging.Handler):
    def __init__(self, service: str, path: str = SOCKET) -> None:
        super().__init__()
        self.service = service
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        with contextlib.suppress(OSError):      # as libsystemd does: room for bursts (capped by wmem_max)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        self.dropped = 0        # records the journal did not take (not running, gone): stderr has them

    def fields(self, record: logging.LogRecord) -> list[tuple[str, str]]:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
        known: list[tuple[str, object]] = [
            ("MESSAGE", message), ("PRIORITY", _PRIORITY.get(record.levelno, 6)),
            ("SYSLOG_IDENTIFIER", f"riklet-{self.service}"), ("CODE_FILE", record.pathname),
            ("CODE_LINE", record.lineno), ("CODE_FUNC", record.funcName), ("LOGGER", record.name),
            ("RIKLET_SERVICE", self.service)]
        out = [(name, str(value)) for name, value in known if value is not None]
        taken = {name for name, _ in out}
        for key, value in vars(record).items():
            name = None if key in _STD or key.startswith("_") else field_name(key)
            if name and name not in taken:
                out.extend((name, v) for v in _values(value))
        return out

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.send(encode(self.fields(record)))
        except OSError:
            self.dropped += 1
        except Exception:
            self.handleError(record)

    def send(self, data: bytes) -> None:
        try:
            self._sock.sendto(data, self.path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(data)

    def _send_memfd(self, data: bytes) -> None:
        fd = os.memfd_create("riklet-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, data)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                        | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            self._sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))],
                               0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
        super().close()
