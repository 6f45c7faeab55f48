"""riklet's error hierarchy: one closed set of faults, each with a code and the field at fault.

    RikletError
    ├── InvalidArgument   bad input from outside (spec, flag, frame field)
    ├── BadFrame          an IPC frame that cannot be decoded
    ├── NotFound          the named object does not exist
    ├── AlreadyExists     create of something that exists
    ├── Conflict          the request contradicts current state (port taken, version mismatch)
    ├── Unavailable       a service or runtime cannot be reached now; retry later
    ├── Timeout           no answer within the deadline
    └── Internal          a bug; logged with its traceback where it happened

Boundaries (gRPC, HTTP, IPC) translate these into their own status codes; nothing else catches
broadly.

Every error is small whatever provoked it: a value from outside goes into a message only through
:func:`excerpt` (a short, truncated repr that never walks the whole value), and the constructor
caps the message and the field (:data:`MAX_MESSAGE_BYTES`, :data:`MAX_FIELD_BYTES`) so that no
boundary can be made to carry a huge error (gRPC refuses status messages over its 8 KiB metadata
limit, and answers RESOURCE_EXHAUSTED instead of the real code).
"""

from __future__ import annotations

import reprlib
from enum import StrEnum
from typing import Any

MAX_MESSAGE_BYTES = 1024     # UTF-8 bytes of an error message, "…" included
MAX_FIELD_BYTES = 256        # UTF-8 bytes of the field path
EXCERPT_CHARS = 64           # characters of a value quoted in a message

ELLIPSIS = "…"

# reprlib looks at a few items per level and a few levels only, so an excerpt of a value costs
# the same whether the value is a word or gigabytes (a YAML alias bomb, a 4 MB string).
_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxdict = _REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = 6
_REPR.maxstring = EXCERPT_CHARS
_REPR.maxlong = 40
_REPR.maxother = EXCERPT_CHARS


def bounded(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` UTF-8 bytes (on a character boundary) with a
    trailing "…" when cut."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= max_bytes:
        return text
    room = max(0, max_bytes - len(ELLIPSIS.encode()))
    return data[:room].decode("utf-8", "ignore") + ELLIPSIS


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """A short repr of ``value`` for an error message: at most ``limit`` characters, "…" when
    cut, in time and memory independent of the value's size."""
    try:
        # A string shows its beginning (reprlib would elide its middle); others come cut short
        # by reprlib at each level.
        text = repr(value[:limit + 1]) if isinstance(value, str) else _REPR.repr(value)
    except Exception:  # a value whose repr fails must not turn a refusal into a crash
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:max(0, limit - 1)] + ELLIPSIS


class ErrorCode(StrEnum):
    INVALID_ARGUMENT = "invalid_argument"
    BAD_FRAME = "bad_frame"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    CONFLICT = "conflict"
    PERMISSION_DENIED = "permission_denied"
    UNAUTHENTICATED = "unauthenticated"
    TOO_LARGE = "too_large"
    UNAVAILABLE = "unavailable"
    TIMEOUT = "timeout"
    INTERNAL = "internal"


class RikletError(Exception):
    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, field: str | None = None) -> None:
        message = bounded(message, MAX_MESSAGE_BYTES)
        field = None if field is None else bounded(field, MAX_FIELD_BYTES)
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code.value, "message": self.message}
        if self.field:
            out["field"] = self.field
        return out

    @staticmethod
    def from_dict(data: Any) -> RikletError:
        if not isinstance(data, dict):
            return Internal(f"malformed error object: {excerpt(data)}")
        cls = _BY_CODE.get(str(data.get("code")), Internal)
        field = data.get("field")
        return cls(str(data.get("message", "")), field if isinstance(field, str) else None)


class InvalidArgument(RikletError):
    code = ErrorCode.INVALID_ARGUMENT


class BadFrame(RikletError):
    code = ErrorCode.BAD_FRAME


class NotFound(RikletError):
    code = ErrorCode.NOT_FOUND


class AlreadyExists(RikletError):
    code = ErrorCode.ALREADY_EXISTS


class Conflict(RikletError):
    code = ErrorCode.CONFLICT


class PermissionDenied(RikletError):
    """Refused by the node's policy; the message names the rule."""

    code = ErrorCode.PERMISSION_DENIED


class Unauthenticated(RikletError):
    code = ErrorCode.UNAUTHENTICATED


class TooLarge(RikletError):
    code = ErrorCode.TOO_LARGE


class Unavailable(RikletError):
    code = ErrorCode.UNAVAILABLE


class Timeout(RikletError):
    code = ErrorCode.TIMEOUT


class Internal(RikletError):
    code = ErrorCode.INTERNAL


_BY_CODE: dict[str, type[RikletError]] = {
    cls.code.value: cls
    for cls in (InvalidArgument, BadFrame, NotFound, AlreadyExists, Conflict, PermissionDenied,
                Unauthenticated, TooLarge, Unavailable, Timeout, Internal)
}
