"""Compiles the per-pod shim: ``python -m services.manager.process.build`` turns shim.c into
``riklet-shim`` next to it (``make install`` runs it); :func:`ensure` rebuilds it when shim.c is
newer, so a checkout that changed the source never runs an old binary."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading

from common.errors import Unavailable

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "shim.c")
BINARY = os.path.join(HERE, "riklet-shim")
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror")
_COMPILE_DEADLINE = 120.0
_LOCK = threading.Lock()  # the manager's threads spawn concurrently; one compiles, the others wait


def stale(source: str = SOURCE, binary: str = BINARY) -> bool:
    try:
        built = os.stat(binary).st_mtime_ns
    except FileNotFoundError:
        return True
    try:
        return os.stat(source).st_mtime_ns > built
    except FileNotFoundError:
        return False  # an installed binary without its source is used as it is


def build(source: str = SOURCE, binary: str = BINARY) -> str:
    """Compile source into binary (atomically: concurrent spawns never run half a file)."""
    compiler = shutil.which("cc")
    if compiler is None:
        raise Unavailable(f"{binary} is missing and there is no C compiler (cc) to build it: install "
                          "gcc and libc6-dev, then run `make install`", "shim")
    tmp = f"{binary}.{os.getpid()}.tmp"  # other processes building at once use other names
    try:
        run = subprocess.run([compiler, *CFLAGS, "-o", tmp, source], capture_output=True, text=True,
                             timeout=_COMPILE_DEADLINE, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"compiling {source}: {exc}", "shim") from exc
    if run.returncode != 0:
        detail = (run.stderr.strip().splitlines() or ["no output"])[-1]
        raise Unavailable(f"compiling {source} failed: {detail}; see `make install`", "shim")
    os.replace(tmp, binary)
    return binary


def ensure(source: str = SOURCE, binary: str = BINARY) -> str:
    """The shim's path, built first when missing or older than its source."""
    if not stale(source, binary):
        return binary
    with _LOCK:
        return build(source, binary) if stale(source, binary) else binary


def main() -> int:
    try:
        print(build())
    except Unavailable as exc:
        print(f"riklet-shim build: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
