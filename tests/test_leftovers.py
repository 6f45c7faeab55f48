"""What a pod and an agent leave on the node: a deleted pod nothing (files in /dev/shm, cgroups,
its directory), a stopped agent only what a restart needs (the cgroups of pods still running)."""

from __future__ import annotations

import glob
import hashlib
import os
import uuid
from collections.abc import Iterator

import pytest

from tests.stack import Agent, pid_alive
from tests.support import need, wait_for

SHM_BYTES = 10_000_000


def agent_id(agent: Agent) -> str:
    return hashlib.sha256(os.path.abspath(agent.state_dir).encode()).hexdigest()[:8]


def cgroup_dirs(relpath: str) -> list[str]:
    """``relpath`` in every cgroup hierarchy where it exists."""
    return sorted(glob.glob(f"/sys/fs/cgroup/*/{relpath}") + glob.glob(f"/sys/fs/cgroup/{relpath}"))


def shm_used() -> int:
    st = os.statvfs("/dev/shm")
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def delete(agent: Agent, name: str) -> None:
    agent.ctl("delete", "pod", name)
    wait_for(lambda: name not in {p["name"] for p in agent.pods()}, 30, what=f"pod {name} gone")


@pytest.fixture
def stoppable() -> Iterator[Agent]:
    a = Agent().start()
    try:
        yield a
    finally:
        if a.proc is not None and a.proc.poll() is not None:
            a.start()   # stopped by the test: started again so that close deletes its pods
        a.close()


def test_a_deleted_pod_leaves_nothing_in_dev_shm(agent: Agent) -> None:
    need(os.path.isdir("/sys/fs/cgroup/memory") or os.path.exists("/sys/fs/cgroup/cgroup.controllers"),
         "memory cgroups")
    name = f"shm-{uuid.uuid4().hex[:8]}"
    before = shm_used()
    agent.ctl("run", "shm", "--memory", "64m", "--", "sh", "-c",
              f"head -c {SHM_BYTES} /dev/zero > /dev/shm/{name}; sleep 3600")
    pod = agent.wait_phase("shm", "Running")
    pid = pod["containers"][0]["pid"]
    inside = f"/proc/{pid}/root/dev/shm/{name}"
    wait_for(lambda: os.path.exists(inside) and os.path.getsize(inside) == SHM_BYTES, 15,
             what="the workload's file in its /dev/shm")
    assert not os.path.exists(f"/dev/shm/{name}"), "the pod writes into the host's /dev/shm"
    delete(agent, "shm")
    assert not os.path.exists(f"/dev/shm/{name}")
    # The pod's tmpfs went with it (other tests may use /dev/shm meanwhile: a margin).
    assert shm_used() - before < SHM_BYTES // 2


def test_a_deleted_pod_leaves_no_directory_and_no_cgroup(agent: Agent) -> None:
    pods_dir = os.path.join(agent.state_dir, "pods")
    listed_before = sorted(os.listdir(pods_dir))
    agent.ctl("run", "brief", "--memory", "32m", "--cpu", "0.5", "--", "sleep", "3600")
    agent.wait_phase("brief", "Running")
    group = f"riklet/{agent_id(agent)}/brief"
    assert cgroup_dirs(group), "the pod runs in a cgroup of its own"
    assert "brief" in os.listdir(pods_dir)
    delete(agent, "brief")
    assert sorted(os.listdir(pods_dir)) == listed_before   # its logs go with it
    assert cgroup_dirs(group) == []


def test_a_stopped_agent_without_pods_leaves_no_cgroup(stoppable: Agent) -> None:
    stoppable.ctl("run", "limited", "--memory", "32m", "--cpu", "0.5", "--", "sleep", "3600")
    stoppable.wait_phase("limited", "Running")
    parent = f"riklet/{agent_id(stoppable)}"
    assert cgroup_dirs(parent)
    delete(stoppable, "limited")
    stoppable.stop()
    assert cgroup_dirs(parent) == []


def test_a_stopped_agent_keeps_the_cgroups_of_running_pods(stoppable: Agent) -> None:
    stoppable.ctl("run", "lasting", "--memory", "32m", "--", "sleep", "3600")
    pid = stoppable.wait_phase("lasting", "Running")["containers"][0]["pid"]
    group = f"riklet/{agent_id(stoppable)}/lasting"
    stoppable.stop()
    # Workloads outlive the agent by design, and stay within their limits.
    assert pid_alive(pid)
    assert cgroup_dirs(group)
    with open(f"/proc/{pid}/cgroup") as f:
        assert group in f.read()
