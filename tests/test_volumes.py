"""Pod volumes through a real agent: named volumes outliving their pods, emptyDirs shared and
removed, read-only mounts, Memory emptyDirs as tmpfs, hostPath under the node's policy."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from tests.stack import Agent, chas_agent
from tests.support import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def host_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="rkvol", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def vagent(host_dir: str) -> Iterator[Agent]:
    allowed = os.path.join(host_dir, "allowed")
    os.mkdir(allowed)
    with chas_agent(f"volumes:\n  host_path_prefixes: [{allowed}]\n  size_check_interval: 300ms\n") as a:
        yield a


def target(host_dir: str, name: str) -> str:
    """A mount point: a process pod's mountPath must exist on the node."""
    path = os.path.join(host_dir, "mnt", name)
    os.makedirs(path, exist_ok=True)
    return path


def pod(name: str, containers: list[dict[str, Any]], volumes: list[dict[str, Any]]) -> str:
    return json.dumps({"name": name, "spec": {"restartPolicy": "Never", "volumes": volumes,
                                              "containers": containers}})


def sh(name: str, script: str, mounts: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": name, "command": ["sh", "-c", script], "volumeMounts": mounts}


def logs(agent: Agent, pod_name: str, container: str = "") -> str:
    args = ["logs", pod_name] + (["-c", container] if container else [])
    return agent.ctl(*args).stdout


def delete(agent: Agent, name: str) -> None:
    agent.ctl("delete", "pod", name)
    wait_for(lambda: all(p["name"] != name for p in agent.pods()), 30, what=f"pod {name} gone")


def test_named_volume_outlives_its_pod_and_rm_waits_for_users(vagent: Agent, host_dir: str) -> None:
    mnt = target(host_dir, "data")
    assert "volume data created" in vagent.ctl("volume", "create", "data", "--size", "64Mi").stdout
    # acknowledged means durable: the manager killed right after, the volume is there
    manager = vagent.service_pid("manager")
    os.kill(manager, signal.SIGKILL)
    wait_for(lambda: vagent.statuses().get("manager") == "RUNNING"
             and vagent.service_pid("manager") != manager, 30, what="manager back")
    vagent.wait_ready()
    assert "data" in vagent.ctl("volume", "ls").stdout
    claim = [{"name": "d", "persistentVolumeClaim": {"claimName": "data"}}]
    vagent.ctl("apply", "-f", "-", input=pod("writer", [sh(
        "w", f"echo kept-across-pods > {mnt}/note && echo written && exec sleep 300",
        [{"name": "d", "mountPath": mnt}])], claim))
    wait_for(lambda: "written" in logs(vagent, "writer"), 20, what="writer wrote")
    assert not os.path.exists(os.path.join(mnt, "note")), "the mount leaked to the node"

    refused = vagent.ctl("volume", "rm", "data", check=False)
    assert refused.returncode != 0 and "writer" in refused.stderr and "in use" in refused.stderr
    inspect = json.loads(vagent.ctl("volume", "inspect", "data").stdout)
    assert inspect["pods"] == ["writer"] and inspect["sizeBytes"] == 64 << 20

    delete(vagent, "writer")
    vagent.supervisorctl("restart", "riklet:*")   # the whole agent: the volume and its data stay
    vagent.wait_ready()
    vagent.ctl("apply", "-f", "-", input=pod("reader", [sh(
        "r", f"cat {mnt}/note; exec sleep 300", [{"name": "d", "mountPath": mnt, "readOnly": True}])],
        claim))
    wait_for(lambda: "kept-across-pods" in logs(vagent, "reader"), 20, what="reader read it back")
    delete(vagent, "reader")
    assert "volume data removed" in vagent.ctl("volume", "rm", "data").stdout
    assert "data" not in vagent.ctl("volume", "ls").stdout
    assert not os.path.exists(os.path.join(vagent.state_dir, "volumes", "data"))

    missing = vagent.ctl("apply", "-f", "-", check=False, input=pod("orphan", [sh(
        "o", "true", [{"name": "d", "mountPath": mnt}])], claim))
    assert missing.returncode != 0
    assert "spec.volumes[0].persistentVolumeClaim.claimName" in missing.stderr
    assert "orphan" not in vagent.ctl("get", "pods").stdout


def test_empty_dir_shared_read_only_and_gone_after_delete(vagent: Agent, host_dir: str) -> None:
    a, b, c = (target(host_dir, f"scratch-{x}") for x in "abc")
    vagent.ctl("apply", "-f", "-", input=pod("share", [
        sh("a", f"echo from-a > {a}/f && exec sleep 300", [{"name": "s", "mountPath": a}]),
        sh("b", f"until [ -f {b}/f ]; do sleep 0.1; done; cat {b}/f; exec sleep 300",
           [{"name": "s", "mountPath": b}]),
        sh("c", f"until [ -f {c}/f ]; do sleep 0.1; done; echo x > {c}/g || echo write-refused; "
           "exec sleep 300", [{"name": "s", "mountPath": c, "readOnly": True}]),
    ], [{"name": "s", "emptyDir": {}}]))
    wait_for(lambda: "from-a" in logs(vagent, "share", "b"), 20, what="b reads what a wrote")
    wait_for(lambda: "write-refused" in logs(vagent, "share", "c"), 20, what="read-only refusal")
    assert "Read-only file system" in logs(vagent, "share", "c")
    on_disk = os.path.join(vagent.state_dir, "pods", "share", "volumes", "s")
    assert os.listdir(on_disk) == ["f"]
    delete(vagent, "share")
    assert not os.path.exists(os.path.join(vagent.state_dir, "pods", "share"))


def test_memory_empty_dir_is_a_tmpfs_of_its_size(vagent: Agent, host_dir: str) -> None:
    m = target(host_dir, "mem")
    vagent.ctl("apply", "-f", "-", input=pod("ram", [sh(
        "m", f"grep ' {m} ' /proc/self/mounts; echo in-ram > {m}/f; echo done; exec sleep 300",
        [{"name": "r", "mountPath": m}])], [{"name": "r", "emptyDir": {"medium": "Memory",
                                                                         "sizeLimit": "8Mi"}}]))
    wait_for(lambda: "done" in logs(vagent, "ram"), 20, what="ram pod ran")
    line = logs(vagent, "ram").splitlines()[0].split()
    assert line[1:3] == [m, "tmpfs"] and "size=8192k" in line[3]
    assert os.listdir(os.path.join(vagent.state_dir, "pods", "ram", "volumes", "r")) == []
    delete(vagent, "ram")
    assert not os.path.exists(os.path.join(vagent.state_dir, "pods", "ram"))


def test_host_path_follows_policy_and_mount_points_must_exist(vagent: Agent, host_dir: str) -> None:
    allowed = os.path.join(host_dir, "allowed")
    with open(os.path.join(allowed, "motd"), "w", encoding="utf-8") as fh:
        fh.write("from-the-node\n")
    os.chmod(os.path.join(allowed, "motd"), 0o644)
    h = target(host_dir, "host")
    outside = vagent.ctl("apply", "-f", "-", check=False, input=pod("hp-out", [sh(
        "h", "true", [{"name": "h", "mountPath": h}])], [{"name": "h", "hostPath": {"path": "/etc"}}]))
    assert outside.returncode != 0 and "spec.volumes[0].hostPath.path" in outside.stderr
    assert "volumes.host_path_prefixes" in outside.stderr

    vagent.ctl("apply", "-f", "-", input=pod("hp", [sh(
        "h", f"cat {h}/motd; exec sleep 300", [{"name": "h", "mountPath": h, "readOnly": True}])],
        [{"name": "h", "hostPath": {"path": allowed, "type": "Directory"}}]))
    wait_for(lambda: "from-the-node" in logs(vagent, "hp"), 20, what="hostPath read")
    delete(vagent, "hp")
    assert os.path.exists(os.path.join(allowed, "motd")), "a hostPath is the node's: it stays"

    nowhere = os.path.join(host_dir, "mnt", "does-not-exist")
    vagent.ctl("apply", "-f", "-", input=pod("nomnt", [sh(
        "n", "true", [{"name": "e", "mountPath": nowhere}])], [{"name": "e", "emptyDir": {}}]))
    failed = vagent.wait_phase("nomnt", "Error")
    assert failed["reason"] == "StartError" and nowhere in failed["message"]
    assert "spec.containers[0].volumeMounts[0].mountPath" in failed["message"]
    assert not os.path.exists(nowhere)
    delete(vagent, "nomnt")


def test_a_disk_empty_dir_over_its_size_limit_evicts_the_pod(vagent: Agent, host_dir: str) -> None:
    m = target(host_dir, "full")
    vagent.ctl("apply", "-f", "-", input=pod("hog", [sh(
        "h", f"head -c 1048576 /dev/zero > {m}/ok; echo under; until [ -f {m}/go ]; do sleep 0.1; "
        f"done; head -c 3145728 /dev/zero > {m}/over; echo over; exec sleep 300",
        [{"name": "s", "mountPath": m}])], [{"name": "s", "emptyDir": {"sizeLimit": "2Mi"}}]))
    wait_for(lambda: "under" in logs(vagent, "hog"), 20, what="hog under its limit")
    assert vagent.pod("hog")["phase"] == "Running"   # measured, and left alone: 1 MiB of 2
    with open(os.path.join(vagent.state_dir, "pods", "hog", "volumes", "s", "go"), "w"):
        pass
    evicted = vagent.wait_phase("hog", "Terminated", 30)
    assert evicted["reason"] == "EmptyDirSizeLimit" and "'s'" in evicted["message"]
    assert "over" in logs(vagent, "hog")
    said = json.loads(vagent.ctl("events", "hog", "-o", "json").stdout)
    assert any(e["reason"] == "Evicted" and e["type"] == "Warning" and "EmptyDirSizeLimit" in e["message"]
               for e in said)
    delete(vagent, "hog")
    assert not os.path.exists(os.path.join(vagent.state_dir, "pods", "hog"))
