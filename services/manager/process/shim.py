"""Starting a pod's shim, the compiled ``riklet-shim`` (shim.c), which outlives the manager.

The manager calls :func:`spawn` with the pod's spec, which validates it, prepares the cgroups
and runs the shim with the spec on its stdin (``shim.spec``'s format); the shim reports through
``POD_DIR/status.json`` (formats in :mod:`.shimctl`) and stops the pod on SIGTERM
(:func:`stop`). Files and signals are the whole protocol, so either side can restart without
the other.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

from common.cgroups import Cgroup, Layout, detect
from common.errors import RikletError, Unavailable
from services.manager.process import shimctl
from services.manager.process.shimctl import ContainerSpec, PodSpec, pid_alive, read_status, stop
from services.manager.process.shimspec import ContainerGroups, encode

__all__ = ["SPAWN_DEADLINE", "pid_alive", "read_status", "spawn", "stop"]

SPAWN_DEADLINE = 5.0


def spawn(pod_dir: str, layout: Layout | None = None, spec: dict[str, Any] | None = None,
          driver: dict[str, Any] | None = None) -> int:
    """Start the shim for POD_DIR, detached (an orphan in its own session); its pid.

    ``spec``: the pod spec (:func:`shimctl.parse_spec`'s input); None reads POD_DIR/spec.json.
    The shim gets it, with the cgroups prepared here, on its stdin: no file is written for it
    (each file made and replaced costs an inode, which a busy node feels).

    Returns once every container has been started once (exec succeeded or failed) and the
    first status.json is written. One fork+exec of a small program: safe from a threaded
    server, and nothing to poll. ``layout``: the cgroup hierarchies to use (default: detected).
    ``driver``: the caller's facts about the pod, kept by the shim in status.json's "driver".
    """
    pod_dir = os.path.abspath(pod_dir)
    # a bad spec fails here, in the caller, not in a detached process
    parsed = shimctl.load_spec(pod_dir) if spec is None else shimctl.parse_spec(spec)
    # imported here: `python -m ...process.build` must not find itself imported by the package
    from services.manager.process import build

    binary = build.ensure()
    layout = detect() if layout is None else layout
    os.makedirs(parsed.log.dir, exist_ok=True)
    groups = [_prepare(parsed, c, layout) for c in parsed.containers]
    pod_dirs = Cgroup(parsed.cgroup_parent, layout).dirs() if layout.available else []
    path = os.environ.get("PATH", os.defpath)
    try:
        run = subprocess.run([binary, pod_dir], input=encode(parsed, groups, pod_dirs, path, driver),
                             capture_output=True, close_fds=True, timeout=SPAWN_DEADLINE, check=False)
    except subprocess.TimeoutExpired:
        # its spawner killed, the shim finds the pipe closed and stops the pod itself
        raise Unavailable(f"the shim did not start within {SPAWN_DEADLINE:g} s", "shim") from None
    except OSError as exc:
        raise Unavailable(f"cannot run {binary}: {exc.strerror}", "shim") from exc
    out = run.stdout.strip()
    if run.returncode != 0 or not out.isdigit():
        reason = run.stderr.decode(errors="replace").strip() or f"exit status {run.returncode}"
        raise Unavailable(f"could not start the shim: {reason}", "shim")
    return int(out)


def _prepare(spec: PodSpec, c: ContainerSpec, layout: Layout) -> ContainerGroups:
    """The container's cgroups, made and limited; without a usable hierarchy, limits asked end
    the container as CgroupsUnavailable (and it is not restarted: it would meet the same
    machine)."""
    if not layout.available:
        if c.cpu_millis is not None or c.memory_bytes is not None:
            error = Unavailable("no writable cgroup hierarchy for the limits asked", "cgroup")
            return ContainerGroups(error=str(error))
        return ContainerGroups()
    group = Cgroup(f"{spec.cgroup_parent}/{c.name}", layout)
    try:
        # A group made now has no limit: writing "none" to each controller would only cost
        # a handful of cgroupfs writes per pod. One left by an earlier run is reset.
        if not group.create() or c.cpu_millis is not None or c.memory_bytes is not None:
            group.set_limits(c.cpu_millis, c.memory_bytes)
    except RikletError as exc:
        return ContainerGroups(group.relpath, error=str(exc))
    return ContainerGroups(group.relpath, tuple(group.dirs()), group.freezer_state(), group.oom_counter())
