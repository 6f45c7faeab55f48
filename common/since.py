"""Reading a ``since`` for logs: an RFC 3339 time, unix seconds (a decimal allowed) or a
duration back from now (``10m``, ``1h30m``, ``500ms``: Go's units, as docker takes them)."""

from __future__ import annotations

import calendar
import datetime
import re
import time

from common.errors import InvalidArgument

_RFC3339 = re.compile(r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
                      r"(?:([Zz])|([+-])(\d{2}):(\d{2}))")
_UNIX = re.compile(r"(\d{1,11})(?:\.(\d{1,9}))?")
_PART = re.compile(r"(\d{1,9})(?:\.(\d{1,9}))?(ns|us|µs|ms|s|m|h)")
_UNIT_NS = {"ns": 1, "us": 10**3, "µs": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}
WHAT = "expected an RFC 3339 time, unix seconds or a duration such as 10m"


def _frac_ns(frac: str | None, unit: int = 10**9) -> int:
    return int((frac or "").ljust(9, "0")) * unit // 10**9


def parse_time(text: str, field: str) -> int:
    """An RFC 3339 time, in ns since the epoch."""
    m = _RFC3339.fullmatch(text)
    if not m:
        raise InvalidArgument(f"expected an RFC 3339 time such as 2026-12-04T05:12:01Z, got {text[:64]!r}",
                              field)
    y, mo, d, h, mi, s = (int(m.group(i)) for i in range(1, 7))
    try:
        datetime.datetime(y, mo, d, h, mi, min(s, 59))   # checks the ranges (a leap second: 60)
        if s > 60:
            raise ValueError("second")
    except ValueError as exc:
        raise InvalidArgument(f"not a valid time: {text[:64]!r}", field) from exc
    offset = 0 if m.group(8) else (int(m.group(10)) * 3600 + int(m.group(11)) * 60) * (
        1 if m.group(9) == "+" else -1)
    return (calendar.timegm((y, mo, d, h, mi, s)) - offset) * 10**9 + _frac_ns(m.group(7))


def parse_duration(text: str, field: str) -> int:
    """A Go-style duration (``1h30m``, ``10s``, ``250ms``), in ns."""
    pos, total = 0, 0
    while pos < len(text):
        m = _PART.match(text, pos)
        if not m:
            break
        unit = _UNIT_NS[m.group(3)]
        total += int(m.group(1)) * unit + _frac_ns(m.group(2), unit)
        pos = m.end()
    if not text or pos != len(text):
        raise InvalidArgument(f"expected a duration such as 10s, 5m or 1h30m, got {text[:64]!r}", field)
    return total


def parse_since(text: str, field: str, now_ns: int | None = None) -> int:
    """ns since the epoch (0 and below: every line) from any of the three forms."""
    now = time.time_ns() if now_ns is None else now_ns
    if _RFC3339.fullmatch(text):
        return parse_time(text, field)
    if m := _UNIX.fullmatch(text):
        return int(m.group(1)) * 10**9 + _frac_ns(m.group(2))
    try:
        return now - parse_duration(text, field)
    except InvalidArgument:
        raise InvalidArgument(f"{WHAT}, got {text[:64]!r}", field) from None
