"""Facts about the host that psutil does not give directly: distribution, architecture in Go's
spelling, the node's own IPv4 address, and its real disks. Reads local files only: never asks
the network (an "external IP" service would leak the node and hang without internet)."""

from __future__ import annotations

import logging
import os
import platform
import socket
from dataclasses import dataclass

import psutil

log = logging.getLogger(__name__)

# RIK and Kubernetes name architectures the way Go does (GOARCH), not the way uname does.
_GOARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
           "armv7l": "arm", "armv6l": "arm", "i386": "386", "i686": "386",
           "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}

# Filesystems that are not disks: memory-backed, virtual, or layered over a real disk that is
# already counted through its own block device.
_NOT_DISKS = frozenset({"tmpfs", "devtmpfs", "ramfs", "overlay", "aufs", "proc", "sysfs", "squashfs",
                        "cgroup", "cgroup2", "devpts", "mqueue", "nsfs", "fuse.lxcfs", "autofs"})


@dataclass(frozen=True)
class Disk:
    name: str        # the block device, e.g. /dev/sda1
    mountpoint: str
    total: int
    used: int
    available: int   # free for unprivileged users (what a workload can still write)


def parse_os_release(text: str) -> dict[str, str]:
    """KEY=value lines, values optionally quoted (os-release(5))."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if not sep or key.startswith("#"):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        out[key] = value
    return out


def os_release() -> dict[str, str]:
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        try:
            with open(path, encoding="utf-8") as fh:
                return parse_os_release(fh.read())
        except OSError:
            continue
    return {}


def distribution() -> tuple[str, int | str]:
    """(name, version): version is an int when VERSION_ID is one ("12"), else its text
    ("22.04", or "" on a rolling distribution without VERSION_ID)."""
    info = os_release()
    name = info.get("NAME") or info.get("ID") or platform.system()
    version = info.get("VERSION_ID", "")
    return name, int(version) if version.isdigit() else version


def go_arch(machine: str | None = None) -> str:
    machine = machine if machine is not None else platform.machine()
    return _GOARCH.get(machine.lower(), machine.lower())


def default_route_interface(route_table: str = "/proc/net/route") -> str | None:
    """The interface of the IPv4 default route (destination 0.0.0.0, mask 0), if any."""
    try:
        with open(route_table, encoding="ascii") as fh:
            lines = fh.read().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        cols = line.split()
        if len(cols) >= 8 and cols[1] == "00000000" and cols[7] == "00000000":
            return cols[0]
    return None


def internal_ip() -> str:
    """IPv4 of the default-route interface, else the first non-loopback IPv4, else loopback."""
    addrs = psutil.net_if_addrs()

    def ipv4(iface: str) -> str | None:
        for a in addrs.get(iface, []):
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
        return None

    iface = default_route_interface()
    found = ipv4(iface) if iface else None
    if found:
        return found
    for name in sorted(addrs):
        found = ipv4(name)
        if found:
            return found
    return "127.0.0.1"


def existing_ancestor(path: str) -> str:
    """The nearest existing directory at or above ``path``: the state dir may not exist yet,
    but the filesystem that will hold it does."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and path != os.path.dirname(path):
        path = os.path.dirname(path)
    return path


def disks() -> list[Disk]:
    """Mounted block devices, each once (bind mounts repeat a device; the shortest mount
    point, usually the device's root, is kept)."""
    best: dict[str, str] = {}   # device -> mount point
    for part in psutil.disk_partitions(all=False):
        if part.fstype in _NOT_DISKS or not part.device.startswith("/dev/"):
            continue
        seen = best.get(part.device)
        if seen is None or len(part.mountpoint) < len(seen):
            best[part.device] = part.mountpoint
    out: list[Disk] = []
    for device, mountpoint in sorted(best.items()):
        try:
            usage = psutil.disk_usage(mountpoint)
        except OSError as exc:  # unreadable or vanished mount: report the others
            log.debug("skipping disk", extra={"device": device, "error": str(exc)})
            continue
        out.append(Disk(device, mountpoint, usage.total, usage.used, usage.free))
    return out
