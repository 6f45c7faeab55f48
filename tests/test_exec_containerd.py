"""``rikletctl exec`` into a containerd pod: containerd's own exec, in the image's filesystem,
with the container's env; stdin streamed; the exit code comes back."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from tests.stack import BIN, pid_alive
from tests.support import wait_for
from tests.test_containerd import CtrAgent, ctr_agent  # noqa: F401  (the fixture)
from tests.test_exec import pids_running

pytestmark = pytest.mark.integration


def test_exec_in_a_container(ctr_agent: CtrAgent) -> None:  # noqa: F811
    ctr, a = ctr_agent, ctr_agent.agent
    a.ctl("run", "web", "--image", ctr.image, "--env", "X=inside", "--", "sleep", "600")
    a.wait_phase("web", "Running", 30)
    res = a.ctl("exec", "web", "--", "sh", "-c", 'cat /etc/hostname; echo "$X"; echo e >&2; exit 5',
                check=False)
    assert (res.returncode, res.stdout, res.stderr) == (5, "web\ninside\n", "e\n"), res.stderr
    assert a.ctl("exec", "-i", "web", "--", "cat", input="through containerd\n").stdout == \
        "through containerd\n"
    assert a.ctl("exec", "web", "--", "cat", input="not sent").stdout == ""
    res = a.ctl("exec", "web", "-t", "--", "sh", "-c", 'stty size; echo "$TERM"', check=False)
    assert (res.returncode, res.stdout.split()) == (0, ["24", "80", "xterm"]), res.stderr  # no local tty
    res = a.ctl("exec", "web", "--", "no-such-program", check=False)
    assert res.returncode == 127 and "no-such-program" in res.stderr, res.stderr

    # the client killed: the command goes with it
    argv = ["sleep", "990"]
    client = subprocess.Popen([os.path.join(BIN, "rikletctl"), "exec", "web", "--", *argv], env=a.env)
    try:
        [pid] = wait_for(lambda: pids_running(argv), 20, "the exec'd command running")
        os.kill(client.pid, signal.SIGKILL)
        wait_for(lambda: not pid_alive(pid), 20, "the exec'd command killed with its client")
    finally:
        client.kill()

    # the manager killed: the exec left in the container is killed by the next manager
    argv = ["sleep", "989"]
    client = subprocess.Popen([os.path.join(BIN, "rikletctl"), "exec", "web", "--", *argv], env=a.env,
                              stderr=subprocess.DEVNULL)
    try:
        [pid] = wait_for(lambda: pids_running(argv), 20, "the exec'd command running")
        os.kill(a.service_pid("manager"), signal.SIGKILL)
        assert client.wait(30) != 0
        a.wait_ready()
        wait_for(lambda: not pid_alive(pid), 20, "the exec left behind killed")
        assert a.ctl("exec", "web", "--", "true").returncode == 0
    finally:
        client.kill()
