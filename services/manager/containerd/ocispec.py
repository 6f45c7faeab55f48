"""The OCI runtime spec of one container: the image's defaults, the pod's overrides, riklet's
limits. A pure function, so what a container gets can be checked without running it.

Defaults follow what containerd and Docker give a container: the usual pseudo-filesystems,
Docker's default capability set, no new privileges, masked and read-only kernel paths, and
the pod's network namespace (or the host's with ``hostNetwork``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from common.errors import InvalidArgument

CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]
CPU_PERIOD = 100_000  # microseconds
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def argv_of(image_config: Mapping[str, Any], command: Sequence[str], args: Sequence[str]) -> list[str]:
    """Kubernetes' rule: ``command`` replaces the image's Entrypoint (and drops its Cmd),
    ``args`` replaces its Cmd."""
    cfg = image_config.get("config") or {}
    entrypoint = list(cfg.get("Entrypoint") or [])
    cmd = list(cfg.get("Cmd") or [])
    argv = list(command) + list(args) if command else entrypoint + (list(args) if args else cmd)
    if not argv:
        raise InvalidArgument("the image has no Entrypoint or Cmd: give a command", "command")
    return argv


def env_of(image_config: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    merged: dict[str, str] = {}
    for item in (image_config.get("config") or {}).get("Env") or [DEFAULT_PATH]:
        key, _, value = str(item).partition("=")
        merged[key] = value
    merged.update(env)
    return [f"{k}={v}" for k, v in merged.items()]


def user_of(image_config: Mapping[str, Any], default: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """The image's numeric ``User`` (``uid`` or ``uid:gid``), else ``default`` (the node's
    ``runtime.user``). A user name is not resolved: the default applies."""
    user = str((image_config.get("config") or {}).get("User") or "")
    uid, _, gid = user.partition(":")
    if uid.isdigit():
        return int(uid), int(gid) if gid.isdigit() else int(uid)
    return default


def build(*, argv: list[str], env: list[str], cwd: str, hostname: str, netns: str | None,
          cgroups_path: str, memory_bytes: int | None, cpu_millis: int | None,
          etc_files: Mapping[str, str], user: tuple[int, int] = (0, 0),
          volumes: Sequence[tuple[Any, ...]] = ()) -> dict[str, Any]:
    """``volumes``: (source on the node, mountPath, read-only) of the container's volume mounts."""
    namespaces: list[dict[str, str]] = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if netns is not None:
        namespaces.append({"type": "network", "path": netns})
    resources: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if memory_bytes:
        resources["memory"] = {"limit": int(memory_bytes)}
    if cpu_millis:
        resources["cpu"] = {"quota": int(cpu_millis) * CPU_PERIOD // 1000, "period": CPU_PERIOD}
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/run", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
    ]
    mounts += [{"destination": dest, "type": "bind", "source": src, "options": ["rbind", "ro"]}
               for dest, src in sorted(etc_files.items())]
    mounts += [{"destination": str(dest), "type": "bind", "source": str(src),
                "options": ["rbind", "ro" if read_only else "rw"]} for src, dest, read_only in volumes]
    caps = list(CAPABILITIES)
    return {
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": False,
            "user": {"uid": user[0], "gid": user[1]},
            "args": argv,
            "env": env,
            "cwd": cwd or "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs"},
        "hostname": hostname,
        "mounts": mounts,
        "linux": {
            "cgroupsPath": cgroups_path,
            "resources": resources,
            "namespaces": namespaces,
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                            "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                            "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }
