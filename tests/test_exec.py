"""``rikletctl exec`` into process pods, through a real agent: the command runs where the pod's
process runs (its env, cgroup, namespaces), streams both ways, reports its exit code, gets a
terminal of the size asked, and dies with its client."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Iterator

import pytest

from tests.stack import BIN, Agent, npb, pid_alive
from tests.support import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pod() -> Iterator[tuple[Agent, int]]:
    """One agent with one process pod ``box`` in its own network and mount namespaces, whose
    process runs as nobody (65534)."""
    a = Agent().start()
    try:
        a.ctl("run", "box", "--env", "X=from-the-pod", "--workdir", "/tmp", "--",
              "unshare", "--net", "--mount", "setpriv", "--reuid", "65534", "--regid", "65534",
              "--clear-groups", "sleep", "600")
        pid = int(a.wait_phase("box", "Running")["containers"][0]["pid"])
        yield a, pid
    finally:
        a.close()


def ns(pid: int | str, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def test_env_workdir_and_exit_code(pod: tuple[Agent, int]) -> None:
    a, _ = pod
    res = a.ctl("exec", "box", "--", "sh", "-c", 'echo "$X $(pwd) $(id -u):$(id -g)"; echo err >&2; exit 7',
                check=False)
    assert (res.returncode, res.stdout, res.stderr) == (7, "from-the-pod /tmp 65534:65534\n", "err\n")


def test_stdin_is_streamed(pod: tuple[Agent, int]) -> None:
    a, _ = pod
    data = "".join(f"line {i}\n" for i in range(20000))   # several 64 KiB chunks each way
    res = a.ctl("exec", "-i", "box", "--", "cat", input=data)
    assert res.stdout == data
    # without -i the command reads end-of-file at once
    assert a.ctl("exec", "box", "--", "cat", input="ignored").stdout == ""


def test_joins_the_pods_cgroup_and_namespaces(pod: tuple[Agent, int]) -> None:
    a, pid = pod
    assert ns(pid, "net") != ns("self", "net")   # the test means something
    out = a.ctl("exec", "box", "--", "sh", "-c",
                "cat /proc/self/cgroup; readlink /proc/self/ns/net /proc/self/ns/mnt").stdout
    with open(f"/proc/{pid}/cgroup", encoding="ascii") as fh:
        cgroup = fh.read()
    assert out == cgroup + f"{ns(pid, 'net')}\n{ns(pid, 'mnt')}\n"
    assert "riklet" in cgroup


def test_tty_has_the_window_size(pod: tuple[Agent, int]) -> None:
    a, _ = pod
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 97, 0, 0))
    proc = subprocess.Popen([os.path.join(BIN, "rikletctl"), "exec", "-t", "box", "--",
                             "sh", "-c", 'tty; stty size; echo "$TERM"; exit 3'],
                            env=a.env, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 30)
            assert ready, f"no output from exec -t: {out!r}"
            try:
                chunk = os.read(master, 4096)
            except OSError:   # EIO: rikletctl ended
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(30) == 3
    finally:
        proc.kill()
        os.close(master)
    lines = out.decode().split()
    assert lines[0].startswith("/dev/pts/") and lines[1:] == ["33", "97", "xterm"], out


def test_unknown_pod_and_container_are_named(pod: tuple[Agent, int]) -> None:
    a, _ = pod
    res = a.ctl("exec", "nope", "--", "true", check=False)
    assert res.returncode == 1 and "pod" in res.stderr and "nope" in res.stderr
    res = a.ctl("exec", "box", "-c", "other", "--", "true", check=False)
    assert res.returncode == 1 and "container" in res.stderr and "'other'" in res.stderr
    res = a.ctl("exec", "box", "--", "/no/such-program", check=False)
    assert res.returncode == 127 and "/no/such-program" in res.stderr
    a.ctl("run", "done", "--restart", "Never", "--", "true")
    a.wait_phase("done", "Terminated")
    res = a.ctl("exec", "done", "--", "true", check=False)
    assert res.returncode == 1 and "pod: pod done is not running" in res.stderr, res.stderr
    res = a.ctl("exec", "box", check=False)
    assert res.returncode == 2 and "CMD" in res.stderr


def pids_running(argv: list[str]) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if fh.read().split(b"\0")[:-1] == [x.encode() for x in argv]:
                        found.append(int(entry))
            except OSError:
                continue
    return found


def check_command_dies_with(a: Agent, pod: str, argv: list[str], what: str) -> None:
    """``rikletctl exec POD -- ARGV``, then kill -9 of ``what`` (the rikletctl ``client``, or
    the ``manager``): the command goes too, killed by the manager (or the next one)."""
    client = subprocess.Popen([os.path.join(BIN, "rikletctl"), "exec", pod, "--", *argv], env=a.env,
                              stderr=subprocess.DEVNULL)
    try:
        [pid] = wait_for(lambda: pids_running(argv), 20, "the exec'd command running")
        os.kill(client.pid if what == "client" else a.service_pid("manager"), signal.SIGKILL)
        assert client.wait(30) != 0
        a.wait_ready()
        wait_for(lambda: not pid_alive(pid), 20, f"the exec'd command killed with its {what}")
    finally:
        client.kill()


def test_command_dies_with_its_client(pod: tuple[Agent, int]) -> None:
    check_command_dies_with(pod[0], "box", ["sleep", "987"], "client")


def _read_until(master: int, wanted: bytes, seen: bytearray, timeout: float = 20.0,
                poke: bytes = b"") -> None:
    """Read the terminal until ``wanted`` shows (writing ``poke`` first, and again each time
    nothing came for a second), or fail at the deadline."""
    deadline = time.monotonic() + timeout
    if poke:
        os.write(master, poke)
    while wanted not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{wanted!r} never came: {bytes(seen)!r}"
        ready, _, _ = select.select([master], [], [], min(left, 1.0))
        if ready:
            seen += os.read(master, 4096)
        elif poke:
            os.write(master, poke)


def test_window_changes_follow_and_the_terminal_is_restored(pod: tuple[Agent, int]) -> None:
    a, _ = pod
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 97, 0, 0))
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen([os.path.join(BIN, "rikletctl"), "exec", "-i", "-t", "box", "--",
                             "sh", "-c", "while read x; do stty size; done; exit 4"],
                            env=a.env, stdin=slave, stdout=slave, stderr=slave)
    try:
        seen = bytearray()
        _read_until(master, b"33 97", seen, poke=b"\r")
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        os.kill(proc.pid, signal.SIGWINCH)      # what the terminal sends its foreground group
        _read_until(master, b"40 120", seen, poke=b"\r")
        assert termios.tcgetattr(slave)[3] & termios.ICANON == 0   # raw while it runs
        os.write(master, b"\x04")               # ^D: end of input for the remote terminal
        assert proc.wait(20) == 4
        assert termios.tcgetattr(slave) == before
    finally:
        proc.kill()
        os.close(master)
        os.close(slave)


def test_a_client_that_does_not_read_holds_the_command_back(pod: tuple[Agent, int]) -> None:
    """1 GiB of output for a client that reads one message: the command ends up blocked on its
    full pipe, having written a bounded amount, and is killed when the client leaves."""
    a, _ = pod
    argv = ["dd", "if=/dev/zero", "bs=65536", "count=16384"]
    leave = threading.Event()

    def inputs() -> Iterator[npb.ExecInput]:
        yield npb.ExecInput(start=npb.ExecStart(pod="box", command=argv))
        leave.wait(60)

    call = a.stub.Exec(inputs())
    try:
        assert next(call).stdout
        [pid] = wait_for(lambda: pids_running(argv), 20, "dd running")

        def blocked() -> bool:
            with open(f"/proc/{pid}/wchan", encoding="ascii") as fh:
                return "pipe" in fh.read()
        wait_for(blocked, 20, "dd blocked on its full pipe")
        with open(f"/proc/{pid}/io", encoding="ascii") as fh:
            written = int(dict(line.split(": ") for line in fh.read().splitlines())["wchar"])
        assert written < 32 << 20, f"{written} bytes went out to a client that reads nothing"
    finally:
        call.cancel()
        leave.set()
    wait_for(lambda: not pid_alive(pid), 20, "dd killed with its client gone")


def test_the_command_dies_with_the_manager(pod: tuple[Agent, int]) -> None:
    """kill -9 of the manager leaves nobody to read the command or end it: it is killed too
    (the pod's own process lives on). Last in this module: it restarts the manager."""
    a, pod_pid = pod
    check_command_dies_with(a, "box", ["sleep", "988"], "manager")
    assert pid_alive(pod_pid)
