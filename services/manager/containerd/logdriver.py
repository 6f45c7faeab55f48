"""The log driver of containerd pods: containerd's shim runs it once per task (``binary://``
log URI) with the task's stdout on fd 3 and stderr on fd 4, and waits until fd 5 is closed.

It appends both streams to the container's size-rotated log file, exactly as the process shim
does, so ``rikletctl logs`` reads both runtimes alike. It is a child of containerd's shim, not of
the manager: logs keep flowing while the manager restarts. It ends when both streams close
(the task exited).

Arguments come from the URI's query as ``KEY VALUE`` pairs in any order: ``path``,
``max_size``, ``max_files``.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import sys
import urllib.parse

from common.rotlog import RotatingWriter

_READ = 256 * 1024


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def uri(driver: str, path: str, max_size: int, max_files: int) -> str:
    """The ``binary://`` log URI that makes containerd's shim run this driver for one task."""
    query = urllib.parse.urlencode({"path": path, "max_size": max_size, "max_files": max_files})
    return f"binary://{driver}?{query}"


def install(state_dir: str) -> str:
    """Write the launcher containerd's shim runs: two lines starting :func:`main` with this
    interpreter and checkout (the shim gives it no environment, so no PYTHONPATH)."""
    bindir = os.path.join(state_dir, "bin")
    os.makedirs(bindir, mode=0o755, exist_ok=True)
    path = os.path.join(bindir, "riklet-log-driver")
    text = (f"#!{sys.executable} -sSE\n"
            f"import sys; sys.path.insert(0, {ROOT!r})\n"
            "from services.manager.containerd.logdriver import main; sys.exit(main())\n")
    old = None
    with contextlib.suppress(OSError), open(path, encoding="utf-8") as fh:
        old = fh.read()
    if old != text:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    return path


def parse_args(argv: list[str]) -> dict[str, str]:
    if len(argv) % 2:
        raise SystemExit(f"riklet log driver: expected KEY VALUE pairs, got {argv!r}")
    return dict(zip(argv[0::2], argv[1::2], strict=True))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    writer = RotatingWriter(args["path"], int(args.get("max_size", 10 << 20)),
                            int(args.get("max_files", 3)))
    sel = selectors.DefaultSelector()
    for fd in (3, 4):
        try:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        except (OSError, ValueError):
            pass  # a stream containerd did not give us
    with contextlib.suppress(OSError):
        os.close(5)  # tells the shim we are ready: the task may start writing
    while sel.get_map():
        for key, _ in sel.select():
            fd = int(key.fd)
            try:
                data = os.read(fd, _READ)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(fd)
                os.close(fd)
                continue
            # a full disk must not block the workload: drop what cannot be written, keep draining
            with contextlib.suppress(Exception):
                writer.write(data)
    writer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
