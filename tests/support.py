"""Small things every test module uses: polling with a deadline, free ports, and the rule that
a missing system dependency skips locally but fails under CI=true."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], T], timeout: float = 15.0, what: str = "condition", *,
             interval: float = 0.02) -> T:
    """Poll until ``predicate`` returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # polled conditions may fail until they hold
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last error: {last_exc!r}")


def need(condition: bool, reason: str) -> None:
    """Skip when a system dependency is missing, except in CI where that is a failure."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true needs this: {reason}")
    pytest.skip(reason)


def cgroup_layout(test_root: str = "riklet-test"):  # type: ignore[no-untyped-def]
    """The machine's cgroup layout, if a test may create groups in it (else skip, or fail in CI)."""
    from common.cgroups import Cgroup, detect
    from common.errors import RikletError

    layout = detect()
    reason = None if layout.available else "no writable cgroup hierarchy (needs root)"
    if reason is None:
        try:
            probe = Cgroup(f"{test_root}/probe-{uuid.uuid4().hex[:8]}", layout)
            probe.create()
            probe.remove()
        except RikletError as exc:
            reason = f"cannot create a cgroup: {exc}"
    need(reason is None, reason or "")
    return layout
