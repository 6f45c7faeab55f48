"""``exec`` in a containerd container: containerd's own exec (tasks Exec with a process spec),
its stdio through FIFOs that containerd's shim opens, ResizePty for the terminal.

The process spec is the container's (env, user, working directory, capabilities, no new
privileges) with the command and terminal replaced, so the command runs as the container's
main process does, in its namespaces and cgroup.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import uuid

from google.protobuf import any_pb2

from common.errors import Conflict, Internal, RikletError, Unavailable
from services.manager.containerd.client import Containerd

PROCESS_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
WAIT_SLICE = 3600.0   # one Wait call's deadline; a longer command is waited for again
SEP = "+"             # an exec's FIFO directory is <container id>+<exec id>: never in either


class CommandFailed(Exception):
    """The command could not be started in the container: what to print, and the exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message, self.code = message, code


def leftovers(fifo_root: str) -> list[str]:
    """The FIFO directories of execs that exist now (at the manager's start: an earlier one's)."""
    try:
        return os.listdir(fifo_root)
    except FileNotFoundError:
        return []


def reap_leftovers(client: Containerd, fifo_root: str, names: list[str]) -> list[str]:
    """Kill and remove the execs an earlier manager left running (it ended, and their clients
    with it: nobody reads them any more), by their FIFO directories; returns the exec ids."""
    reaped = []
    for name in names:
        cid, sep, exec_id = name.partition(SEP)
        if sep:
            ExecHandle(client, cid, exec_id).end()
            reaped.append(exec_id)
        shutil.rmtree(os.path.join(fifo_root, name), ignore_errors=True)
    return reaped


class ExecHandle:
    """An exec containerd knows by its container and exec ids."""

    def __init__(self, client: Containerd, cid: str, exec_id: str) -> None:
        self.client, self.cid, self.exec_id = client, cid, exec_id

    def wait(self, timeout: float | None = None) -> int:
        while True:
            try:
                reply = self.client._call("tasks", "Wait", self.client._msg(
                    "tasks", "WaitRequest", container_id=self.cid, exec_id=self.exec_id),
                    timeout=timeout or WAIT_SLICE)
                return int(reply.exit_status)
            except Unavailable as exc:
                if timeout is not None or "in time" not in str(exc):
                    raise

    def kill(self) -> None:
        with contextlib.suppress(RikletError):
            self.client._call("tasks", "Kill", self.client._msg(
                "tasks", "KillRequest", container_id=self.cid, exec_id=self.exec_id,
                signal=int(signal.SIGKILL), all=False))

    def delete(self) -> None:
        with contextlib.suppress(RikletError):
            self.client._call("tasks", "DeleteProcess", self.client._msg(
                "tasks", "DeleteProcessRequest", container_id=self.cid, exec_id=self.exec_id))

    def end(self) -> None:
        """Killed, reaped and forgotten by containerd."""
        self.kill()
        with contextlib.suppress(RikletError):
            self.wait(timeout=10)
        self.delete()


class ContainerdExec(ExecHandle):
    """One command run in a container by containerd, its stdio on FIFOs."""

    def __init__(self, client: Containerd, cid: str, argv: list[str], tty: bool, stdin: bool,
                 window: tuple[int, int], fifo_root: str) -> None:
        super().__init__(client, cid, f"exec-{uuid.uuid4().hex[:12]}")
        self.tty = tty
        container = client._call("containers", "Get", client._msg(
            "containers", "GetContainerRequest", id=cid)).container
        process = dict(json.loads(container.spec.value).get("process") or {})
        process["args"] = list(argv)
        process["terminal"] = tty
        process.pop("consoleSize", None)
        if tty:
            process["consoleSize"] = {"width": window[0], "height": window[1]}
            env = list(process.get("env") or [])
            if not any(str(e).startswith("TERM=") for e in env):
                process["env"] = [*env, "TERM=xterm"]   # as Docker: a terminal's programs want it
        os.makedirs(fifo_root, mode=0o700, exist_ok=True)
        self.dir = os.path.join(fifo_root, f"{cid}{SEP}{self.exec_id}")
        os.mkdir(self.dir, 0o700)
        paths = {name: os.path.join(self.dir, name) for name in ("stdin", "stdout", "stderr")}
        if not stdin:
            paths["stdin"] = ""        # the command reads end-of-file at once
        if tty:
            paths["stderr"] = ""       # a terminal has one output
        for path in paths.values():
            if path:
                os.mkfifo(path, 0o600)
        # Read ends without blocking (no writer yet: the stream pump polls before it reads,
        # and Linux reports no hang-up on a FIFO until a writer has come and gone); the stdin
        # FIFO read-write, the only way to open it before containerd's shim has.
        self.stdout = os.open(paths["stdout"], os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self.stderr: int | None = None if tty else os.open(
            paths["stderr"], os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self.stdin: int | None = os.open(paths["stdin"], os.O_RDWR | os.O_CLOEXEC) if stdin else None
        self.created = False
        try:
            client._call("tasks", "Exec", client._msg(
                "tasks", "ExecProcessRequest", container_id=cid, exec_id=self.exec_id,
                stdin=paths["stdin"], stdout=paths["stdout"], stderr=paths["stderr"],
                terminal=tty, spec=any_pb2.Any(type_url=PROCESS_TYPE_URL,
                                               value=json.dumps(process).encode())), timeout=30)
            self.created = True
            client._call("tasks", "Start", client._msg(
                "tasks", "StartRequest", container_id=cid, exec_id=self.exec_id), timeout=30)
        except RikletError as exc:
            self.release()
            if self.created and isinstance(exc, (Internal, Conflict)):
                # runc could not run the command: as a shell says it, 127 not found, 126 else
                missing = "not found" in str(exc) or "no such file" in str(exc).lower()
                raise CommandFailed(f"riklet exec: {argv[0]}: {exc.message}\n",
                                    127 if missing else 126) from exc
            raise
        if tty:
            self.resize(*window)

    def resize(self, cols: int, rows: int) -> None:
        if self.tty:
            with contextlib.suppress(RikletError):
                self.client._call("tasks", "ResizePty", self.client._msg(
                    "tasks", "ResizePtyRequest", container_id=self.cid, exec_id=self.exec_id,
                    width=cols, height=rows))

    def close_stdin(self) -> None:
        if self.stdin is not None:
            with contextlib.suppress(OSError):
                os.close(self.stdin)
            self.stdin = None
            with contextlib.suppress(RikletError):
                self.client._call("tasks", "CloseIO", self.client._msg(
                    "tasks", "CloseIORequest", container_id=self.cid, exec_id=self.exec_id, stdin=True))

    def release(self) -> None:
        if self.stdin is not None:
            with contextlib.suppress(OSError):
                os.close(self.stdin)
            self.stdin = None
        for fd in (self.stdout, self.stderr):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if self.created:
            self.delete()
        shutil.rmtree(self.dir, ignore_errors=True)
