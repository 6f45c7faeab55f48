"""The monitor samples once per pass and serves the last sample: real cgroups read by the
sampler (its file reads counted), the monitor's ops and scrape formatting that sample, and
CPU rates between passes (a stand-in reader and clock)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from common import cgroups
from common.errors import RikletError
from services.monitor.cgroupfiles import QUIET_EVERY, GroupGone, GroupReader, GroupUsage
from services.monitor.loop import SampleLoop
from services.monitor.podtable import PodTable
from services.monitor.service import Monitor
from services.monitor.snapshot import Snapshotter
from tests.support import need, parse_prometheus

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
STEP = 32 * MiB

# Allocates (and touches) STEP bytes per line read, answering "ok" once they are resident.
GROWER = f"""
import sys
held = []
print("ok", flush=True)
for _ in sys.stdin:
    held.append(b"x" * {STEP})
    print("ok", flush=True)
"""


def record(name: str, cgroup: str | None, pids: list[int], version: int = 1) -> dict[str, Any]:
    return {"name": name, "uid": f"u-{name}", "version": version, "desired": "running",
            "created_at": 1700000000,
            "spec": {"workload": name, "containers": [{"name": "app", "image": None, "command": ["x"],
                                                       "resources": {}}]},
            "status": {"phase": "Running", "cgroup": cgroup, "pids": pids, "restartCount": 0,
                       "containers": [{"name": "app", "state": "running", "restartCount": 0}]}}


def make_group(relpath: str) -> cgroups.Cgroup:
    group = cgroups.Cgroup(relpath)
    need(group.layout.available, "writable cgroups (v1 cpuacct+memory or v2)")
    try:
        group.create()
    except RikletError as exc:
        need(False, f"cannot create cgroup {relpath}: {exc}")
    return group


@pytest.fixture
def parent() -> Iterator[str]:
    relpath = f"riklet-test/sample-{uuid.uuid4().hex[:8]}"
    try:
        yield relpath
    finally:
        cgroups.prune(relpath)


@dataclass
class Rig:
    table: PodTable
    reader: GroupReader
    loop: SampleLoop
    monitor: Monitor

    def scrape(self) -> dict[str, dict[str, float]]:
        return parse_prometheus(self.monitor.scrape()[0].decode())[1]


def rig(budget: int | None = None) -> Rig:
    table = PodTable()
    reader = GroupReader(cgroups.detect(), budget)
    loop = SampleLoop(Snapshotter("n", "/tmp", reader, first_interval=0.01), table, resolution=3600)
    return Rig(table, reader, loop, Monitor("n", table, loop))


def test_requests_serve_the_last_sample_and_read_no_file(parent: str) -> None:
    pod = f"{parent}/web"
    app = make_group(f"{pod}/app")
    app.set_limits(None, 512 * MiB)
    proc = subprocess.Popen([sys.executable, "-c", GROWER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            preexec_fn=lambda: app.add(os.getpid()))
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline() == b"ok\n"
        r = rig()
        r.table.on_change("web", record("web", pod, [proc.pid]))
        r.loop.sample_now()
        labels = '{container="app",pod="web"}'
        before = r.scrape()
        assert before["riklet_container_memory_limit_bytes"][labels] == 512 * MiB
        working_set = before["riklet_container_memory_working_set_bytes"][labels]
        pod_used = before["riklet_pod_memory_usage_bytes"]['{pod="web"}']
        assert pod_used == working_set > 0

        proc.stdin.write(b"more\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"ok\n"
        assert cgroups.Cgroup(pod).usage().memory_bytes >= pod_used + STEP * 0.9, "the group did grow"
        reads = r.reader.reads
        after = r.scrape()
        assert after["riklet_container_memory_working_set_bytes"][labels] == working_set
        assert after["riklet_pod_memory_usage_bytes"]['{pod="web"}'] == pod_used
        figures = r.monitor.pod_realtime("web")
        assert figures["memory"]["totalMemory"] - figures["memory"]["freeMemory"] == pod_used
        assert r.monitor.pods_realtime() == [figures]
        r.monitor.node_realtime()
        r.monitor.node_resources()
        assert r.reader.reads == reads, "requests read no file"

        r.loop.sample_now()
        grown = r.scrape()
        assert grown["riklet_pod_memory_usage_bytes"]['{pod="web"}'] >= pod_used + STEP * 0.9
        assert grown["riklet_container_memory_working_set_bytes"][labels] >= working_set + STEP * 0.9
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_kept_files_are_bounded_and_closed_when_their_pod_goes(parent: str) -> None:
    names = [f"p{i}" for i in range(3)]
    for name in names:
        make_group(f"{parent}/{name}")
    r = rig(budget=3)       # one group's files (cpu usage, memory in use, memory.stat)
    fds = len(os.listdir("/proc/self/fd"))
    for name in names:
        r.table.on_change(name, record(name, f"{parent}/{name}", []))
    r.loop.sample_now()
    kept = len(os.listdir("/proc/self/fd")) - fds
    assert 0 < kept <= 3
    assert len(r.monitor.pods_realtime()) == 3, "groups past the bound are read all the same"
    for name in names:
        r.table.on_change(name, None)
    r.loop.sample_now()
    assert len(os.listdir("/proc/self/fd")) == fds, "the pods' files are closed once they are gone"
    assert r.monitor.pods_realtime() == []


def test_a_pod_whose_group_is_removed_is_measured_from_its_processes(parent: str) -> None:
    group = make_group(f"{parent}/gone")
    sleeper = subprocess.Popen(["sleep", "60"])     # outside the group, as a pod's recorded pid
    try:
        r = rig()
        r.table.on_change("gone", record("gone", group.relpath, [sleeper.pid]))
        r.loop.sample_now()
        group.remove()
        sample = r.loop.sample_now()
        reads = r.reader.reads
        r.loop.sample_now()
        assert r.reader.reads == reads, "a removed group is not tried again while its record stays"
        used = sample.pods["pod:u-gone"].memory_used
        assert used > 0, "measured from its pid once its group is gone"
        r.table.on_change("gone", record("gone", group.relpath, [sleeper.pid], version=2))
        r.loop.sample_now()
        assert r.reader.reads > reads, "a changed record is worth another look"
    finally:
        sleeper.kill()
        sleeper.wait(timeout=10)


def test_a_group_whose_cpu_stood_still_costs_one_read_a_pass_and_its_memory_is_read_again_soon(
        parent: str) -> None:
    group = make_group(f"{parent}/idle")            # no task: its CPU time stands still
    reader = GroupReader(cgroups.detect())
    first = reader.usage(group.relpath)
    reads = reader.reads
    for _ in range(QUIET_EVERY):
        assert reader.usage(group.relpath) == first
    assert reader.reads - reads == QUIET_EVERY, "only the CPU time is read while it stands still"
    reads = reader.reads
    assert reader.usage(group.relpath) == first
    assert reader.reads - reads == 3, "then memory again (in use and memory.stat)"


# ---- CPU rates between passes, with a stand-in reader and clock ---------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeReader(GroupReader):
    """Each group's CPU seconds as the test sets them; reading advances nothing."""

    def __init__(self) -> None:
        super().__init__(cgroups.Layout(1, "/nonexistent", {}), budget=0)
        self.cpu: dict[str, float] = {}

    def usage(self, relpath: str) -> GroupUsage:
        if relpath not in self.cpu:
            raise GroupGone(relpath)
        return GroupUsage(int(self.cpu[relpath] * 1e9), MiB, None)


def test_cpu_is_the_rate_between_passes_and_a_new_pod_shares_one_short_wait() -> None:
    clock, reader, table = Clock(), FakeReader(), PodTable()

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        if "g/c" in reader.cpu:
            reader.cpu["g/c"] += 0.05     # c uses half a core while the sampler waits

    snap = Snapshotter("n", "/tmp", reader, first_interval=0.1, clock=clock, sleep=sleep)
    for name in ("a", "b"):
        reader.cpu[f"g/{name}"] = 10.0
        table.on_change(name, record(name, f"g/{name}", []))

    def cores() -> dict[str, float]:
        sample = snap.take(table.entries())
        return {k.removeprefix("pod:u-"): round(u.cores, 3) for k, u in sample.pods.items()}

    assert cores() == {"a": 0.0, "b": 0.0}
    first_waits = len(clock.sleeps)
    clock.now += 5
    reader.cpu["g/a"] += 2.5          # half a core over the 5 s
    assert cores() == {"a": 0.5, "b": 0.0}
    assert len(clock.sleeps) == first_waits, "known pods are read once per pass, no wait"
    reader.cpu["g/c"] = 3.0
    table.on_change("c", record("c", "g/c", []))
    clock.now += 5
    reader.cpu["g/a"] = 1.0           # went back: recreated, starts over
    before = len(clock.sleeps)
    assert cores() == {"a": 0.0, "b": 0.0, "c": 0.5}
    assert clock.sleeps[before:] == [0.1], "new pods and a reset one share a single wait"


def test_the_monitor_lifts_a_low_descriptor_limit_so_kept_files_fit() -> None:
    code = ("import resource\n"
            "from services.monitor.cgroupfiles import kept_budget, raise_open_files\n"
            "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
            "assert kept_budget() == 128\n"
            "got = raise_open_files(4096)\n"
            "assert got == resource.getrlimit(resource.RLIMIT_NOFILE)[0] == min(4096, hard), got\n"
            "assert kept_budget() == min(4096, hard) // 2\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
