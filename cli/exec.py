"""``rikletctl exec POD [-c CONTAINER] [-i] [-t] -- CMD ARGS...``: a command inside a running
container, its stdio streamed both ways over the Node API's ``Exec``; rikletctl exits with the
command's exit code.

``-i`` sends this terminal's (or pipe's) stdin, and its end; ``-t`` gives the command a
terminal of this terminal's size (80x24 when this is none), following window changes. With
``-i -t`` on a terminal, the local terminal is put in raw mode (keys, ^C included, go to the
command) and restored on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import signal
import sys
import termios
import threading
import tty
from collections.abc import Callable, Iterator
from typing import Any

from common.errors import InvalidArgument
from common.pb import node_pb2 as npb

CHUNK = 64 * 1024       # the API's cap on one stdin input
IN_FLIGHT = 4           # stdin chunks read ahead of what gRPC has taken


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    sp = add("exec", run_exec, "run a command in a pod's container: exec POD [-c C] [-i] [-t] -- CMD...")
    sp.add_argument("pod")
    sp.add_argument("-c", "--container", help="the container (may be left out in a one-container pod)")
    sp.add_argument("-i", "--stdin", action="store_true", help="pass stdin to the command")
    sp.add_argument("-t", "--tty", action="store_true", help="give the command a terminal")
    sp.set_defaults(command=[])  # what follows "--" (split off before parsing)


def window() -> npb.WindowSize:
    for fd in (0, 1):
        with contextlib.suppress(OSError):
            size = os.get_terminal_size(fd)
            return npb.WindowSize(cols=size.columns, rows=size.lines)
    return npb.WindowSize(cols=80, rows=24)


class Inputs:
    """What goes to the agent: the start, then stdin chunks (a few read ahead at most, so a
    command that reads nothing holds this side back) and window changes."""

    def __init__(self, start: npb.ExecStart) -> None:
        self.items: queue.Queue[npb.ExecInput | None] = queue.Queue()
        self.items.put(npb.ExecInput(start=start))
        self.room = threading.Semaphore(IN_FLIGHT)

    def __iter__(self) -> Iterator[npb.ExecInput]:
        while (item := self.items.get()) is not None:
            if item.stdin:
                self.room.release()
            yield item

    def read_stdin(self) -> None:
        fd = sys.stdin.fileno()
        while True:
            self.room.acquire()
            try:
                data = os.read(fd, CHUNK)
            except OSError:
                data = b""
            if not data:
                self.items.put(npb.ExecInput(close_stdin=True))
                return
            self.items.put(npb.ExecInput(stdin=data))

    def resized(self, *_: Any) -> None:
        self.items.put(npb.ExecInput(resize=window()))

    def end(self) -> None:
        self.items.put(None)


def run_exec(ctl: Any, args: argparse.Namespace) -> int:
    if not args.command:
        raise InvalidArgument("give the command after --, e.g. exec POD -- sh", "CMD")
    start = npb.ExecStart(pod=args.pod, container=args.container or "", command=args.command,
                          tty=args.tty, stdin=args.stdin, window=window() if args.tty else None)
    inputs = Inputs(start)
    raw = args.tty and args.stdin and os.isatty(0)
    saved = termios.tcgetattr(0) if raw else None
    previous = signal.signal(signal.SIGWINCH, inputs.resized) if args.tty else None
    code = 1
    try:
        if raw:
            tty.setraw(0)
        if args.stdin:
            threading.Thread(target=inputs.read_stdin, name="stdin", daemon=True).start()
        for out in ctl.stub.Exec(iter(inputs)):
            if out.stdout:
                _write(1, out.stdout)
            if out.stderr:
                _write(2, out.stderr)
            if out.exited:
                code = out.exit_code
    finally:
        inputs.end()
        if saved is not None:
            termios.tcsetattr(0, termios.TCSADRAIN, saved)
        if previous is not None:
            signal.signal(signal.SIGWINCH, previous)
    return code


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
