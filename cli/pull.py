"""``rikletctl image pull REF``'s progress, as nerdctl shows it: on a terminal, a line per
download (ref, state, a bar, bytes done/total) and a total line, redrawn in place; elsewhere
(a pipe, a log) one plain line each time a download starts or ends. The image's name goes to
standard output when the pull is done; progress goes to standard error.

An agent that sends no per-download data (``PullProgress.layers`` empty) gets its messages
printed as they come, as before."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

BAR = 30


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def bar(done: int, total: int, width: int = BAR) -> str:
    filled = width if total and done >= total else (width * done // total if total else 0)
    return "|" + "+" * filled + "-" * (width - filled) + "|"


def short(ref: str) -> str:
    """``layer-sha256:0a1b2c...`` as ``layer-sha256:0a1b2c3d4e5f`` (12 hex digits, as docker)."""
    kind, _, digest = ref.rpartition(":")
    return f"{kind}:{digest[:12]}" if kind else ref[:24]


def frame(image: str, layers: Sequence[Any], done: int, total: int, elapsed: float) -> list[str]:
    """The lines of one redraw: a line per download, then the total."""
    names = [f"{short(la.ref)}:" for la in layers]
    width = max((len(n) for n in names), default=0)
    lines = [f"{n:<{width}} {la.state:<11} {bar(la.offset, la.total)} {mib(la.offset)}/{mib(la.total)}"
             for n, la in zip(names, layers, strict=True)]
    rate = done / elapsed if elapsed > 0 else 0.0
    lines.append(f"{image}: elapsed {elapsed:.1f} s, total {mib(done)}/{mib(total)} ({mib(int(rate))}/s)")
    return lines


def changes(seen: dict[str, str], layers: Iterable[Any]) -> list[str]:
    """Plain lines for the downloads that started or ended since ``seen`` (updated)."""
    lines = []
    for la in layers:
        if seen.get(la.ref) != la.state:
            seen[la.ref] = la.state
            lines.append(f"{short(la.ref)}: {la.state} {mib(la.offset)}/{mib(la.total)}")
    return lines


def show(ref: str, stream: Iterable[Any], err: TextIO | None = None, out: TextIO | None = None,
         tty: bool | None = None) -> None:
    """Prints the pull of ``ref`` as the agent reports it in ``stream`` (PullProgress messages)."""
    err, out = err or sys.stderr, out or sys.stdout
    tty = err.isatty() if tty is None else tty
    began, drawn = time.monotonic(), 0
    seen: dict[str, str] = {}
    fetched = 0
    for msg in stream:
        fetched = msg.bytes_done or fetched
        if msg.done:
            if tty and drawn == 0 and msg.layers:   # too quick for a frame: show the last one
                err.write("\n".join(frame(ref, msg.layers, msg.bytes_done, msg.bytes_total,
                                          time.monotonic() - began)) + "\n")
            elif not tty and msg.layers:
                for line in changes(seen, msg.layers):
                    print(line, file=err)
            if not tty and seen:
                print(f"{ref}: {mib(fetched)} in {time.monotonic() - began:.1f} s", file=err)
            print(msg.image, file=out, flush=True)
            continue
        if not msg.layers:
            print(msg.message, file=err, flush=True)
        elif tty:
            lines = frame(ref, msg.layers, msg.bytes_done, msg.bytes_total, time.monotonic() - began)
            up = f"\x1b[{drawn}F" if drawn else ""
            err.write(up + "".join(f"\x1b[2K{line}\n" for line in lines))
            err.flush()
            drawn = len(lines)
        else:
            for line in changes(seen, msg.layers):
                print(line, file=err, flush=True)
