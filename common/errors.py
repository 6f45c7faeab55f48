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
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


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
            return Internal(f"malformed error object: {data!r}")
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
