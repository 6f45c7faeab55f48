"""Small things every test module uses: polling with a deadline, free ports, and the rule that
a missing system dependency skips locally but fails under CI=true."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    return free_ports(1, kind)[0]


def free_ports(count: int, kind: int = socket.SOCK_STREAM) -> list[int]:
    """Distinct free ports: all are held open while picking, so the kernel cannot hand out the
    same one twice (two separate free_port() calls can collide)."""
    socks = [socket.socket(socket.AF_INET, kind) for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


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


SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? '
                    r'(-?[0-9.eE+-]+|NaN|[+-]Inf)$')
HIST_SUFFIXES = ("_bucket", "_sum", "_count")


def parse_prometheus(text: str) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """Text format 0.0.4 into ({family: type}, {sample name: {labels: value}}); strict."""
    types: dict[str, str] = {}
    samples: dict[str, dict[str, float]] = {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in {"gauge", "counter", "histogram"} and name not in types
            types[name] = kind
            continue
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name = m.group(1)
        family = name
        for suffix in HIST_SUFFIXES:
            if name.endswith(suffix) and types.get(name[: -len(suffix)]) == "histogram":
                family = name[: -len(suffix)]
        if name.endswith("_total") and types.get(name[:-6]) == "counter":
            family = name[:-6]   # prometheus_client's TYPE line names a counter without _total
        assert family in types, f"{name} has no TYPE line"
        samples.setdefault(name, {})[m.group(2) or ""] = float(m.group(3))
    return types, samples


def host_ports(count: int, kind: int = socket.SOCK_STREAM) -> list[int]:
    """Free ports to serve as kernel-mode host ports. Such a port is never bound, so free_ports
    may hand out one that an earlier test's DNATed flows still hold in conntrack (a reused
    source port would then follow the old flow's NAT): those entries are deleted first."""
    ports = free_ports(count, kind)
    proto = "tcp" if kind == socket.SOCK_STREAM else "udp"
    for port in ports:
        subprocess.run(["conntrack", "-D", "-p", proto, "--orig-port-dst", str(port), "--dst-nat"],
                       capture_output=True, check=False)
    return ports
