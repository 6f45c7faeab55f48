"""The Node API's ``Exec``: a command run inside a running container, its stdio streamed both
ways over one bidirectional gRPC stream.

The first input starts it (:func:`parse_start` validates it whole before anything runs); later
inputs carry stdin, its close and window changes; outputs carry stdout and stderr and, last, the
exit code. Bounded everywhere: chunks of at most 64 KiB each way, at most ``OUT_QUEUE`` outputs
waiting for a slow client (then the command's output pipe fills and the command waits), stdin
written only as fast as the command reads it (then gRPC's flow control holds the client back),
at most ``max_execs`` commands at once on the node (RESOURCE_EXHAUSTED beyond). When the client
goes away, the command is killed.

The drivers (process: :mod:`services.manager.process.execplan`; containerd:
:mod:`services.manager.containerd.execproc`) give an :class:`ExecProcess`: descriptors to read
and write, resize, close_stdin, wait, kill, release.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from common.errors import Conflict, Internal, InvalidArgument, NotFound, RikletError, TooLarge
from common.model import dns_label
from common.pb import node_pb2 as pb
from services.manager.containerd.execproc import CommandFailed, ContainerdExec, leftovers, reap_leftovers
from services.manager.process.execplan import ProcessExec

log = logging.getLogger(__name__)

MAX_CHUNK = 64 * 1024
MAX_EXECS = 32
OUT_QUEUE = 4               # outputs waiting for the client: 256 KiB at most per exec
MAX_ARGS = 1024
MAX_ARGV_BYTES = 128 * 1024
MAX_WINDOW = 10_000
DEFAULT_WINDOW = (80, 24)
DRAIN = 5.0                 # after the command ended: how long output still open is read
_POLL = 0.5                 # how often a blocked pump looks whether the exec ended


class ExecProcess(Protocol):
    stdout: int
    stderr: int | None
    stdin: int | None

    def resize(self, cols: int, rows: int) -> None: ...
    def close_stdin(self) -> None: ...
    def wait(self) -> int: ...
    def kill(self) -> None: ...
    def release(self) -> None: ...


@dataclass(frozen=True)
class ExecRequest:
    pod: str
    container: str
    command: tuple[str, ...]
    tty: bool
    stdin: bool
    window: tuple[int, int]


def _window(size: pb.WindowSize, field: str) -> tuple[int, int]:
    if size.cols > MAX_WINDOW or size.rows > MAX_WINDOW:
        raise InvalidArgument(f"at most {MAX_WINDOW} columns and rows", field)
    return (size.cols or DEFAULT_WINDOW[0], size.rows or DEFAULT_WINDOW[1])


def parse_start(message: pb.ExecInput | None) -> ExecRequest:
    """The first input, validated: which pod and container, which command, with what stdio."""
    if message is None or not message.HasField("start"):
        raise InvalidArgument("the first input must start the exec (pod, container, command)", "start")
    if message.stdin or message.close_stdin or message.HasField("resize"):
        raise InvalidArgument("the first input only starts the exec", "start")
    start = message.start
    pod = dns_label(start.pod, "pod")
    container = dns_label(start.container, "container") if start.container else ""
    command = tuple(start.command)
    if not command or not command[0]:
        raise InvalidArgument("give the command to run", "command")
    if len(command) > MAX_ARGS:
        raise InvalidArgument(f"at most {MAX_ARGS} arguments", "command")
    if sum(len(a.encode("utf-8", "surrogatepass")) for a in command) > MAX_ARGV_BYTES:
        raise InvalidArgument(f"at most {MAX_ARGV_BYTES} bytes of arguments", "command")
    for i, arg in enumerate(command):
        if "\0" in arg:
            raise InvalidArgument("must not contain a NUL character", f"command[{i}]")
    window = _window(start.window, "window") if start.tty else DEFAULT_WINDOW
    return ExecRequest(pod, container, command, start.tty, start.stdin, window)


def pick_container(record: dict[str, Any], name: str) -> dict[str, Any]:
    containers = record["spec"].get("containers", [])
    names = [c["name"] for c in containers]
    if not name:
        if len(names) != 1:
            raise InvalidArgument(f"the pod has containers {', '.join(names)}: name one", "container")
        name = names[0]
    for c in containers:
        if c["name"] == name:
            return dict(c)
    raise NotFound(f"no container {name!r} in pod {record['name']} ({', '.join(names)})", "container")


class Execs:
    """Starts commands in pods' containers and streams them; owns the node's cap."""

    def __init__(self, memory: Any, process: Any, containerd: Any, max_execs: int = MAX_EXECS) -> None:
        self.memory = memory
        self.process = process          # services.manager.process.runtime.ProcessRuntime
        self.containerd = containerd    # services.manager.containerd.runtime.ContainerdRuntime
        self.max_execs = max_execs
        self._slots = threading.BoundedSemaphore(max_execs)

    def fifo_root(self) -> str:
        return os.path.join(os.path.dirname(self.containerd.root), "exec")

    def clean_leftovers(self) -> None:
        """At the manager's start, before it serves: the execs an earlier manager left in
        containers are killed, in the background (processes' execs die with the manager by
        themselves). Which ones is read now, so that no exec of this manager is taken."""
        left = leftovers(self.fifo_root())

        def reap() -> None:
            with contextlib.suppress(RikletError, OSError):
                reaped = reap_leftovers(self.containerd.client, self.fifo_root(), left)
                if reaped:
                    log.info("killed execs left by an earlier manager", extra={"execs": reaped})
        if left:
            threading.Thread(target=reap, name="exec-leftovers", daemon=True).start()

    def open(self, req: ExecRequest) -> ExecProcess:
        try:
            record = self.memory.get(req.pod)
        except NotFound:
            raise NotFound(f"no pod {req.pod} on this node", "pod") from None
        container = pick_container(record, req.container)
        phase = (record.get("status") or {}).get("phase", "")
        if record.get("desired") != "running" or phase != "Running":
            raise Conflict(f"pod {req.pod} is not running (phase {phase or 'unknown'}, "
                           f"desired {record.get('desired')})", "pod")
        try:
            if container.get("runtime") == "containerd":
                return self._containerd(record, container, req)
            return self._process(record, container, req)
        except OSError as exc:   # a pipe, FIFO or namespace file the node could not give
            raise Internal(f"could not start the command: {exc}", "exec") from exc

    def _not_running(self, record: dict[str, Any], container: dict[str, Any]) -> Conflict:
        return Conflict(f"container {container['name']} of pod {record['name']} is not running", "container")

    def _process(self, record: dict[str, Any], container: dict[str, Any], req: ExecRequest) -> ExecProcess:
        observed = self.process.observe(record)
        pids = [int(c["pid"]) for c in (observed.containers if observed else [])
                if c.get("name") == container["name"] and c.get("state") == "running" and c.get("pid")]
        if not pids:
            raise self._not_running(record, container)
        return ProcessExec(pids[0], container, list(req.command), req.tty, req.stdin, req.window,
                           self.process.layout)

    def _containerd(self, record: dict[str, Any], container: dict[str, Any], req: ExecRequest
                    ) -> ExecProcess:
        cid = self.containerd.container_id(record["name"], container["name"])
        task = self.containerd.client.task(cid)
        if task is None or task.status != "running":
            raise self._not_running(record, container)
        return ContainerdExec(self.containerd.client, cid, list(req.command), req.tty, req.stdin,
                              req.window, self.fifo_root())

    def stream(self, requests: Iterator[pb.ExecInput], context: grpc.ServicerContext
               ) -> Iterator[pb.ExecOutput]:
        """The whole exec; RikletErrors (bad start, unknown pod, the cap) are raised to the
        caller's boundary before any output."""
        # The client may leave while the command starts: heard from now on, so that a command
        # started for a client already gone is killed at once.
        left = threading.Event()
        pumps: list[Pump] = []

        def on_end() -> None:
            left.set()
            for pump in pumps:
                pump.abandon()
        if not context.add_callback(on_end):
            left.set()   # the call has already ended
        req = parse_start(next(requests, None))
        if not self._slots.acquire(blocking=False):
            raise TooLarge(f"too many execs running on this node: limit {self.max_execs}", "exec")
        try:
            try:
                proc = self.open(req)
            except CommandFailed as failed:   # told as a shell tells it: on stderr, with a code
                yield pb.ExecOutput(stderr=failed.message.encode()[:MAX_CHUNK])
                yield pb.ExecOutput(exited=True, exit_code=failed.code)
                return
            pump = Pump(proc, req)
            pumps.append(pump)
            if left.is_set():
                pump.abandon()
            yield from pump.run(requests)
        finally:
            self._slots.release()


class Pump:
    """Moves one exec's bytes: a thread per output and one for the client's inputs, meeting in
    a small queue that the gRPC worker empties."""

    def __init__(self, proc: ExecProcess, req: ExecRequest) -> None:
        self.proc, self.req = proc, req
        self.out: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=OUT_QUEUE)
        self.done = threading.Event()

    def run(self, requests: Iterator[pb.ExecInput]) -> Iterator[pb.ExecOutput]:
        proc = self.proc
        if proc.stdin is not None:
            os.set_blocking(proc.stdin, False)
        outputs = [(fd, kind) for fd, kind in ((proc.stdout, "stdout"), (proc.stderr, "stderr"))
                   if fd is not None]
        threads = [threading.Thread(target=self._read, args=o, name=f"exec-{o[1]}", daemon=True)
                   for o in outputs]
        threads.append(threading.Thread(target=self._feed, args=(requests,), name="exec-in", daemon=True))
        threads.append(threading.Thread(target=self._wait, name="exec-wait", daemon=True))
        for t in threads:
            t.start()
        code: int | None = None
        try:
            open_outputs, ended = len(outputs), 0.0
            while open_outputs or code is None:
                try:
                    kind, value = self.out.get(timeout=_POLL)
                except queue.Empty:
                    if self.done.is_set():
                        return   # the client went away: nothing more will be read
                    if code is not None and time.monotonic() - ended > DRAIN:
                        break   # something the command started still holds its output open
                    continue
                if kind == "eof":
                    open_outputs -= 1
                elif kind == "exit":
                    code, ended = value, time.monotonic()
                elif kind == "error":
                    raise value
                else:
                    yield pb.ExecOutput(**{kind: value})
            yield pb.ExecOutput(exited=True, exit_code=code)
        finally:
            self.done.set()
            if code is None:
                proc.kill()
            for t in threads[:-1]:
                t.join(timeout=_POLL * 2)
            threads[-1].join()   # the command is reaped before its descriptors go
            proc.release()

    def abandon(self) -> None:
        """The client went away (or the call ended): the command is killed, the pump stops."""
        if not self.done.is_set():
            self.done.set()
            self.proc.kill()

    def _put(self, item: tuple[str, Any]) -> None:
        while not self.done.is_set():
            try:
                self.out.put(item, timeout=_POLL)
                return
            except queue.Full:
                continue

    def _read(self, fd: int, kind: str) -> None:
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        while not self.done.is_set():
            if not poller.poll(_POLL * 1000):
                continue
            try:
                data = os.read(fd, MAX_CHUNK)
            except BlockingIOError:
                continue
            except OSError:   # EIO: a terminal whose last user closed it
                data = b""
            if not data:
                break
            self._put((kind, data))
        self._put(("eof", None))

    def _wait(self) -> None:
        try:
            code = self.proc.wait()
        except RikletError as exc:   # containerd went away: the client is told, not left waiting
            self._put(("error", exc))
            return
        self._put(("exit", code))

    def _feed(self, requests: Iterator[pb.ExecInput]) -> None:
        try:
            for message in requests:
                if message.HasField("start"):
                    raise InvalidArgument("the exec was already started", "start")
                if message.stdin:
                    if len(message.stdin) > MAX_CHUNK:
                        raise InvalidArgument(f"at most {MAX_CHUNK} bytes per input", "stdin")
                    if not self.req.stdin:
                        raise InvalidArgument("the exec was started without stdin", "stdin")
                    self._write(message.stdin)
                if message.HasField("resize"):
                    self.proc.resize(*_window(message.resize, "resize"))
                if message.close_stdin:
                    self.proc.close_stdin()
        except RikletError as exc:
            self._put(("error", exc))
        except grpc.RpcError:
            pass      # the client went away: abandon() kills the command
        finally:
            # No more input can come (the client closed its side, or left).
            with contextlib.suppress(OSError):
                self.proc.close_stdin()

    def _write(self, data: bytes) -> None:
        """All of ``data`` to the command's stdin, as fast as it reads; dropped once it has
        closed its stdin (as a pipe's writer would be told) or the exec ended."""
        view = memoryview(data)
        while view and not self.done.is_set():
            fd = self.proc.stdin
            if fd is None:
                return
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                select.select([], [fd], [], _POLL)
            except OSError:   # EPIPE: nobody reads any more
                return
