"""Image references as Docker writes them, made explicit (shared by the containerd driver and
the node policy)."""

from __future__ import annotations


def normalize_ref(ref: str) -> str:
    """Docker's reference shorthand made explicit: ``busybox`` is
    ``docker.io/library/busybox:latest``; a registry host keeps its name."""
    name, digest = ([*ref.split("@", 1), ""])[:2]
    first, _, rest = name.partition("/")
    if not rest:
        name = f"docker.io/library/{name}"
    elif "." not in first and ":" not in first and first != "localhost":
        name = f"docker.io/{name}"
    if digest:
        return f"{name}@{digest}"
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def registry_host(ref: str) -> str:
    return normalize_ref(ref).split("/", 1)[0]
