"""``rikletctl exec`` into a containerd pod: containerd's own exec, in the image's filesystem,
with the container's env; stdin streamed; the exit code comes back."""

from __future__ import annotations

import pytest

from tests.test_containerd import CtrAgent, ctr_agent  # noqa: F401  (the fixture)
from tests.test_exec import check_command_dies_with

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

    check_command_dies_with(a, "web", ["sleep", "990"], "client")
    # the manager killed: the exec left in the container is killed by the next manager
    check_command_dies_with(a, "web", ["sleep", "989"], "manager")
    assert a.ctl("exec", "web", "--", "true").returncode == 0
