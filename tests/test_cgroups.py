"""cgroups: detection on fake trees, and limits, membership, usage and removal on the real one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.cgroups import Cgroup, Layout, detect
from common.errors import InvalidArgument, NotFound, Unavailable
from tests.support import cgroup_layout, wait_for

TEST_ROOT = "riklet-test"


def usable_layout() -> Layout:
    """The machine's cgroups, or a skip (a failure under CI=true) when they cannot be written."""
    layout: Layout = cgroup_layout(TEST_ROOT)
    return layout


def remove_test_root(layout: Layout) -> None:
    """rmdir the shared test root if no other test still uses it."""
    for mount in set(layout.mounts.values()):
        try:
            os.rmdir(os.path.join(mount, TEST_ROOT))
        except OSError:
            continue





@pytest.fixture(scope="module")
def layout() -> Layout:
    return usable_layout()


@pytest.fixture
def group(layout: Layout) -> Iterator[Cgroup]:
    parent = Cgroup(f"{TEST_ROOT}/{uuid.uuid4().hex[:12]}", layout)
    yield Cgroup(f"{parent.relpath}/pod/app", layout)
    if parent.exists():
        parent.kill_all(signal.SIGKILL)
        wait_for(lambda: not parent.pids(), what="test processes to die")
        parent.remove()
    remove_test_root(layout)


def v1_file(layout: Layout, controller: str, group: Cgroup, name: str) -> str:
    return Path(layout.mounts[controller], group.relpath, name).read_text().strip()


# -- detection, on fake trees --------------------------------------------------------------


def test_detect_prefers_v2_when_the_root_offers_memory_and_cpu(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    layout = detect(str(tmp_path))
    assert (layout.version, layout.available) == (2, True)
    assert set(layout.mounts) == {"cpu", "memory", "pids"}


def test_detect_falls_back_to_v1_mounts(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("hugetlb\n")  # like /sys/fs/cgroup/unified here
    for name in ("cpu", "memory"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "cgroup.procs").write_text("")
    layout = detect(str(tmp_path))
    assert layout.version == 1
    assert layout.mounts == {"cpu": str(tmp_path / "cpu"), "memory": str(tmp_path / "memory")}


def test_nothing_usable_is_unavailable(tmp_path: Path) -> None:
    layout = detect(str(tmp_path))
    assert not layout.available
    with pytest.raises(Unavailable):
        Cgroup("riklet/x", layout).create()


def test_v2_writes_limits_and_enables_controllers_in_parents(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    group = Cgroup("riklet/pod/app", detect(str(tmp_path)))
    group.create()
    leaf = tmp_path / "riklet/pod/app"
    (leaf / "memory.swap.max").write_text("max\n")  # present when swap accounting is on
    group.set_limits(cpu_millis=250, memory_bytes=64 << 20, pids_max=100)
    for parent in (tmp_path, tmp_path / "riklet", tmp_path / "riklet/pod"):
        assert (parent / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert (leaf / "cpu.max").read_text() == "25000 100000"
    assert (leaf / "memory.max").read_text() == str(64 << 20)
    assert (leaf / "memory.swap.max").read_text() == "0"
    assert (leaf / "pids.max").read_text() == "100"


def test_v2_usage_reads_the_unified_files(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    group = Cgroup("a", detect(str(tmp_path)))
    group.create()
    files = {
        "cpu.stat": "usage_usec 1500\nuser_usec 1000\n",
        "memory.current": "10000\n",
        "memory.stat": "anon 4000\ninactive_file 3000\n",
        "memory.max": "max\n",
        "memory.events": "low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n",
    }
    for name, text in files.items():
        (tmp_path / "a" / name).write_text(text)
    usage = group.usage()
    assert (usage.cpu_ns, usage.memory_bytes) == (1_500_000, 7000)
    assert (usage.memory_limit, usage.oom_kills) == (None, 1)


def test_paths_must_be_relative_and_plain() -> None:
    for bad in ("", "/abs", "a/../b", "a//b"):
        with pytest.raises(InvalidArgument):
            Cgroup(bad, Layout(0, "/nowhere"))


# -- the real hierarchy --------------------------------------------------------------------


def test_create_and_limits_land_in_the_kernel(layout: Layout, group: Cgroup) -> None:
    assert group.create() is True, "made now"
    assert group.create() is False, "idempotent, and says it was there"
    assert group.usage().memory_limit is None, "a new group has no limit"
    group.set_limits(cpu_millis=200, memory_bytes=32 << 20, pids_max=64)
    if layout.version == 1:
        assert v1_file(layout, "cpu", group, "cpu.cfs_period_us") == "100000"
        assert v1_file(layout, "cpu", group, "cpu.cfs_quota_us") == "20000"
        assert v1_file(layout, "memory", group, "memory.limit_in_bytes") == str(32 << 20)
        memsw = Path(layout.mounts["memory"], group.relpath, "memory.memsw.limit_in_bytes")
        if memsw.exists():
            assert memsw.read_text().strip() == str(32 << 20)
    assert group.usage().memory_limit == 32 << 20
    group.set_limits(cpu_millis=None, memory_bytes=128 << 20)  # raising needs memsw first on v1
    assert group.usage().memory_limit == 128 << 20
    group.set_limits(cpu_millis=None, memory_bytes=None)
    assert group.usage().memory_limit is None


def test_processes_join_are_listed_and_killed(layout: Layout, group: Cgroup) -> None:
    group.create()
    proc = subprocess.Popen(["sleep", "60"])
    try:
        group.add(proc.pid)
        parent = Cgroup(group.relpath.rsplit("/", 2)[0], layout)
        assert parent.pids() == [proc.pid]  # descendants count
        assert f":/{group.relpath}" in Path(f"/proc/{proc.pid}/cgroup").read_text()
        parent.kill_all(signal.SIGKILL)
        assert proc.wait(timeout=5) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_for(lambda: not group.pids(), what="the group to empty")


def test_usage_counts_cpu_and_memory(layout: Layout, group: Cgroup) -> None:
    group.create()
    code = (
        "import time\nb = b'x' * (20 << 20)\nt = time.time()\n"
        "while time.time() - t < 0.3: pass\nprint(1, flush=True)\ntime.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        group.add(proc.pid)
        assert proc.stdout is not None and proc.stdout.readline() == b"1\n"
        usage = group.usage()
        assert usage.cpu_ns > 100_000_000
        assert usage.memory_bytes > 10 << 20
        assert usage.oom_kills == 0
    finally:
        proc.kill()
        proc.wait()


def test_remove_takes_leaves_first_and_tolerates_absence(layout: Layout, group: Cgroup) -> None:
    group.create()
    Cgroup(f"{group.relpath}/deeper/still", layout).create()
    parent = Cgroup(group.relpath.rsplit("/", 1)[0], layout)
    parent.remove()
    assert not parent.exists() and not group.exists()
    parent.remove()  # already gone: fine


def test_removing_a_busy_group_names_the_directory(layout: Layout, group: Cgroup) -> None:
    group.create()
    proc = subprocess.Popen(["sleep", "60"])
    try:
        group.add(proc.pid)
        with pytest.raises(Unavailable) as err:
            group.remove()
        assert group.relpath in err.value.message
    finally:
        proc.kill()
        proc.wait()


def test_usage_of_a_missing_group_is_not_found(layout: Layout, group: Cgroup) -> None:
    with pytest.raises(NotFound):
        group.usage()
    assert not group.exists()
    assert group.pids() == []
