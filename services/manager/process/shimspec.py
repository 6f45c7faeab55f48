"""The pod spec as the compiled shim reads it on its stdin (format: shim.c's header).

Records ``KEY LEN:BYTES\n``, so that C parses them without a JSON parser; everything in it has
been validated (:func:`.shimctl.parse_spec`) and its cgroups prepared before it is encoded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.errors import InvalidArgument
from services.manager.process.shimctl import ContainerSpec, PodSpec

_Put = Callable[[str, str, str], None]


@dataclass(frozen=True)
class ContainerGroups:
    """What the compiled shim needs of one container's cgroups, prepared by the manager."""

    relpath: str | None = None  # reported in the status; None: no cgroups at all
    dirs: tuple[str, ...] = ()  # the group in each hierarchy: joined, killed, removed at the end
    freezer: str | None = None  # v1 freezer.state, frozen while the group is killed
    oom: tuple[str, str] | None = None  # file and key of the OOM-kill counter
    error: str | None = None  # could not be prepared: the container ends as CgroupsUnavailable


def encode(spec: PodSpec, groups: list[ContainerGroups], pod_dirs: list[str], path: str,
           driver: dict[str, Any] | None = None) -> bytes:
    """The compiled shim's input; ``path`` is the PATH a container gets unless its env
    sets one; ``driver``, the runtime's own facts, which the shim copies into status.json.
    InvalidArgument names a field holding a NUL, which exec could not pass on."""
    out: list[bytes] = []
    put = _recorder(out)
    put("pod", spec.pod, "pod")
    put("uid", spec.uid, "uid")
    if driver is not None:
        # ASCII JSON: no NUL, and the shim copies it into its own JSON byte for byte
        put("driver", json.dumps(driver, separators=(",", ":")), "driver")
    put("grace", repr(spec.grace_period), "grace_period")
    if spec.notify is not None:
        put("notify", spec.notify, "notify")
    put("log_max", str(spec.log.max_size), "log")
    put("log_files", str(spec.log.max_files), "log")
    for key in ("initial", "max", "reset"):
        put(f"backoff_{key}", repr(getattr(spec.backoff, key)), "backoff")
    limits = [c.memory_bytes for c in spec.containers]
    put("shm_size", str(sum(x for x in limits if x) if all(limits) else 0), "containers")
    for d in pod_dirs:
        put("pod_cgroup", d, "cgroup_parent")
    for directory, size in spec.tmpfs:
        put("tmpfs", directory, "tmpfs")
        put("tmpfs_size", str(size), "tmpfs")
    for i, (c, cg) in enumerate(zip(spec.containers, groups, strict=True)):
        _flat_container(put, c, cg, spec.log.dir, path, f"containers[{i}]")
    return b"".join(out)


def _recorder(out: list[bytes]) -> _Put:
    def put(key: str, value: str, field: str) -> None:
        data = value.encode("utf-8", "surrogatepass")
        if b"\0" in data:
            raise InvalidArgument("must not contain a NUL character", field)
        out.append(b"%s %d:%s\n" % (key.encode(), len(data), data))
    return put


def _flat_container(put: _Put, c: ContainerSpec, cg: ContainerGroups, log_dir: str, path: str,
                    where: str) -> None:
    put("container", c.name, f"{where}.name")
    for arg in c.command:
        put("argv", arg, f"{where}.command")
    env = dict(c.env)
    env.setdefault("PATH", path)
    for name, value in env.items():
        put("env", f"{name}={value}", f"{where}.env")
    if c.working_dir:
        put("cwd", c.working_dir, f"{where}.working_dir")
    if c.user is not None:
        put("user", f"{c.user[0]}:{c.user[1]}", f"{where}.user")
    put("policy", c.restart_policy.value, f"{where}.restart_policy")
    put("log", os.path.join(log_dir, f"{c.name}.log"), "log.dir")
    if cg.relpath is not None:
        put("cgroup", cg.relpath, "cgroup_parent")
    for d in cg.dirs:
        put("cgroup_dir", d, "cgroup_parent")
    if cg.freezer is not None:
        put("freezer", cg.freezer, "cgroup_parent")
    if cg.oom is not None:
        put("oom_file", cg.oom[0], "cgroup_parent")
        put("oom_key", cg.oom[1], "cgroup_parent")
    if cg.error is not None:
        put("cgroup_error", cg.error, "cgroup_parent")
    for source, target, read_only in c.mounts:
        put("mount_src", source, f"{where}.mounts")
        put("mount_dst", target, f"{where}.mounts")
        put("mount_ro", "1" if read_only else "0", f"{where}.mounts")
