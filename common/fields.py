"""Small checks shared by the parsers of untrusted documents (probes, volumes)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.errors import InvalidArgument, excerpt


def check_keys(obj: Mapping[str, Any], allowed: set[str], field: str) -> None:
    """Refuse a key of ``obj`` (at ``field``) that is not in ``allowed``, naming it."""
    for key in obj:
        if key not in allowed:
            name = key if isinstance(key, str) and len(key) <= 63 else excerpt(key)
            raise InvalidArgument(f"unknown field (allowed: {', '.join(sorted(allowed))})",
                                  f"{field}.{name}")


def check_object(value: object, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument("expected an object", field)
    return value


def check_int(value: object, field: str, lo: int, hi: int) -> int:
    """An integer from ``lo`` to ``hi`` (a JSON ``true`` is not one)."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidArgument(f"expected an integer from {lo} to {hi}", field)
    return value
