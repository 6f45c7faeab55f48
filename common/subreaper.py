"""Becoming a child subreaper: orphans of this process's descendants are re-parented to it (and
reaped by it) instead of going to init."""

from __future__ import annotations

import ctypes
import os

from common.errors import Unavailable

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise Unavailable(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}", "shim")
