"""Exec probes of process pods: the probe's command runs as the container runs, with its
environment, working directory and user, in its cgroup (so the probe's CPU and memory count
as the pod's, as the kubelet's exec probes do), killed at its timeout."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping
from typing import Any

from common import cgroups

MAX_OUTPUT = 64 * 1024     # of a probe's output kept for its message; the rest is read and dropped


async def run(argv: list[str], timeout: float, *, env: Mapping[str, str], cwd: str,
              user: tuple[int, int] | None, group: cgroups.Cgroup | None) -> tuple[int, bytes]:
    def enter() -> None:      # in the child, before exec
        if group is not None:
            with contextlib.suppress(Exception):
                group.add(os.getpid())
        if user is not None:
            os.setgroups([])
            os.setgid(user[1])
            os.setuid(user[0])

    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env=dict(env), cwd=cwd, preexec_fn=enter,
        start_new_session=True)
    assert proc.stdout is not None
    out = bytearray()

    async def drain() -> int:
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(65536):
            if len(out) < MAX_OUTPUT:
                out.extend(chunk[:MAX_OUTPUT - len(out)])
        return await proc.wait()

    try:
        code = await asyncio.wait_for(drain(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        await proc.wait()
        raise ValueError(f"timed out after {timeout:g}s") from None
    return code, bytes(out)


def container_env(container: Mapping[str, Any]) -> dict[str, str]:
    env = {str(k): str(v) for k, v in (container.get("env") or {}).items()}
    env.setdefault("PATH", os.environ.get("PATH", os.defpath))
    return env
