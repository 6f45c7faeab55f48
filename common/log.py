"""Structured logging: JSON lines on stderr, the systemd journal, a shared rotated file.

- stderr: one JSON object a line; supervisord keeps each service's in ``log/<service>.log``
  (rotated by supervisord), and a service's last words land there when supervisord is gone.
- the journal (``logging.journald``; auto: when run by systemd and its socket exists): the same
  records with structured fields (:mod:`common.journal`), so ``journalctl -u riklet POD=web``
  works. The stderr lines do not reach the journal too: supervisord writes its programs' output
  to its own files, and only supervisord's own log goes to systemd's stdout capture.
- ``logging.file``: the JSON lines appended to one file all services share, rotated by size
  (``logging.max_size``, ``logging.max_files``) under a lock (:mod:`common.logfile`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from common import journal
from common.logfile import SharedRotatingHandler

if TYPE_CHECKING:
    from common.config import Config

_STD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def wants_journal(setting: str, environ: Mapping[str, str], path: str = journal.SOCKET) -> bool:
    """``logging.journald``: true, false, or auto (run by systemd, and the journal's socket is there)."""
    return setting == "true" or (setting == "auto" and journal.under_systemd(environ, path))


def setup(service: str, level: str = "INFO", file: str | None = None, *, max_size: int = 10 * 2**20,
          max_files: int = 5, journald: str = "false", journal_socket: str = journal.SOCKET) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if wants_journal(journald, os.environ, journal_socket):
        root.addHandler(journal.JournalHandler(service, journal_socket))
    if file:
        try:
            shared = SharedRotatingHandler(file, max_size, max_files)
        except OSError as exc:
            root.warning("cannot append to the log file", extra={"file": file, "error": str(exc)})
        else:
            shared.setFormatter(JsonFormatter(service))
            root.addHandler(shared)


def configure(service: str, cfg: Config) -> None:
    """The logging the configuration asks for (``logging.*``)."""
    setup(service, cfg.logging_level, cfg.logging_file, max_size=cfg.logging_max_size,
          max_files=cfg.logging_max_files, journald=cfg.logging_journald)
