"""Parsing of quantities written by humans: CPU, memory sizes, durations."""

from __future__ import annotations

import math
import re

from common.errors import InvalidArgument

# Docker's convention, which the CHaS seed follows ("512m"): every unit is binary.
_MEM_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4,
    "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4,
    "kb": 1024, "mb": 1024**2, "gb": 1024**3, "tb": 1024**4,
}
_DUR_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_NUM = r"(\d+(?:\.\d+)?|\.\d+)"


_MAX_BYTES = 2**50


def parse_memory(value: object, field: str) -> int:
    """Bytes from ``64m``, ``64Mi``, ``1G``, ``512``; units are binary (64m = 64Mi = 64 MiB)."""
    if isinstance(value, bool):
        raise InvalidArgument("expected a size like 64m or 1Gi", field)
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(_NUM + r"\s*([a-zA-Z]{0,2})", str(value).strip())
        if not m:
            raise InvalidArgument(f"cannot parse size {value!r} (try 64m, 512Mi, 1G)", field)
        unit = m.group(2).lower()
        mult = _MEM_UNITS.get(unit)
        if mult is None:
            raise InvalidArgument(f"unknown size unit {m.group(2)!r}", field)
        amount = float(m.group(1)) * mult
        if not math.isfinite(amount) or amount > _MAX_BYTES:
            raise InvalidArgument("too large (at most 1 PiB)", field)
        n = int(amount)
    if n <= 0:
        raise InvalidArgument("must be positive", field)
    if n > _MAX_BYTES:
        raise InvalidArgument("too large (at most 1 PiB)", field)
    return n


def parse_cpu(value: object, field: str) -> int:
    """Millicores from ``0.5``, ``"500m"``, ``2``."""
    if isinstance(value, bool):
        raise InvalidArgument("expected cores like 0.5 or 500m", field)
    if isinstance(value, (int, float)):
        if not math.isfinite(float(value)) or abs(float(value)) > 1e9:
            raise InvalidArgument("more than 1024 cores", field)
        milli = round(float(value) * 1000)
    else:
        text = str(value).strip()
        m = re.fullmatch(_NUM + r"(m?)", text)
        if not m:
            raise InvalidArgument(f"cannot parse cpu {value!r} (try 0.5 or 500m)", field)
        number = float(m.group(1))
        if not math.isfinite(number) or number > 1e12:
            raise InvalidArgument("more than 1024 cores", field)
        milli = round(number) if m.group(2) else round(number * 1000)
    if milli <= 0:
        raise InvalidArgument("must be positive", field)
    if milli > 1024 * 1000:
        raise InvalidArgument("more than 1024 cores", field)
    return milli


def parse_duration(value: object, field: str) -> float:
    """Seconds from ``5s``, ``500ms``, ``1m``, ``1h`` or a plain number of seconds."""
    if isinstance(value, bool):
        raise InvalidArgument("expected a duration like 5s or 500ms", field)
    if isinstance(value, (int, float)):
        secs = float(value)
    else:
        m = re.fullmatch(_NUM + r"\s*(ms|s|m|h)?", str(value).strip())
        if not m:
            raise InvalidArgument(f"cannot parse duration {value!r} (try 5s, 500ms, 1m)", field)
        secs = float(m.group(1)) * _DUR_UNITS[m.group(2) or "s"]
    if not math.isfinite(secs):
        raise InvalidArgument("expected a finite duration", field)
    if secs < 0:
        raise InvalidArgument("must not be negative", field)
    return secs
