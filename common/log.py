"""Structured logging: one JSON object per line on stderr, level from configuration."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

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


def setup(service: str, level: str = "INFO", file: str | None = None) -> None:
    """JSON lines on stderr (supervisord keeps them per service), and appended to ``file`` too
    when one is configured (``logging.file``: one file for every service, as CHaS asks)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    if file:
        try:
            shared = logging.FileHandler(file, encoding="utf-8")
        except OSError as exc:
            root.warning("cannot append to the log file", extra={"file": file, "error": str(exc)})
        else:
            shared.setFormatter(JsonFormatter(service))
            root.addHandler(shared)
    root.setLevel(level)
