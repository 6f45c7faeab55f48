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

from common.rotlog import RotatingWriter

_READ = 256 * 1024


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
