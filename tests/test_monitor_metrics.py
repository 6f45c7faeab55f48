"""The monitor's figures: the seeds' JSON shapes, CPU rates, and pods measured from their own
cgroup (or process tree), never from the host's totals."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import select
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

from common import cgroups
from common.pb import rik_common_pb2 as cpb
from common.pod import instance_id_of
from common.rik import status_of
from services.monitor import metrics
from services.monitor.cgroupfiles import GroupGone, GroupReader, GroupUsage
from services.monitor.podtable import entry, kept
from services.monitor.sampler import CpuSampler
from services.monitor.snapshot import Snapshotter
from tests.support import need, wait_for

MiB = 1024 * 1024
CGROUP_ROOT = "/sys/fs/cgroup"
CONTROLLERS = ("memory", "cpu", "cpuacct")
BALLAST = 48 * MiB

# Allocates and touches BALLAST bytes (so they are resident and charged), says so, then spins.
BUSY = f"""
import sys
ballast = bytearray({BALLAST})
for i in range(0, len(ballast), 4096):
    ballast[i] = 1
print("ready", flush=True)
while True:
    pass
"""
# A parent that only waits: all the memory and CPU are in its child, so only a measurement that
# follows descendants sees them.
PARENT = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {BUSY!r}])"

NODE_RESOURCES_KEYS = {"id", "cpu", "memory", "disksize", "distrib", "version", "type", "arch",
                       "kernelVersion", "networking"}
REALTIME_NODE_KEYS = {"id", "state", "timestamp", "cpu", "memory", "disks"}
REALTIME_POD_KEYS = {"appId", "state", "createdAt", "restartCount", "internalIp", "runsOn",
                     "deployment", "cpu", "memory"}





def snapshotter(reader: GroupReader | None = None, **kwargs: Any) -> Snapshotter:
    return Snapshotter("n", "/tmp", reader or GroupReader(cgroups.detect()), **kwargs)


def measure(rec: dict[str, Any], snap: Snapshotter | None = None, node_id: str = "n") -> metrics.RealtimePod:
    """A pod's figures as the monitor serves them: a sampling pass, then its formatting. Each
    call with the same ``snap`` is a new pass (CPU is the rate since the previous one)."""
    e = entry(rec)
    sample = (snap or snapshotter()).take([e])
    return metrics.pod_figures(e.facts, sample.pods[e.key], node_id, psutil.cpu_count(logical=True) or 1,
                               psutil.virtual_memory().total)


def unavailable(reason: str) -> None:
    """Skip when the machine cannot run the test, except in CI where that is a failure."""
    need(False, reason)


def record(name: str = "web", *, cgroup: str | None = None, pids: list[int] | None = None,
           cpu_millis: int | None = 1000, memory_bytes: int | None = 256 * MiB,
           image: str | None = None, command: list[str] | None = None) -> dict[str, Any]:
    """A pod record as the memory service stores it."""
    return {
        "name": name, "uid": uuid.uuid4().hex, "version": 3, "desired": "running",
        "created_at": 1700000000.7,
        "spec": {"workload": "web", "containers": [
            {"name": "app", "image": image, "command": command or ["python3", "-c", "pass"],
             "resources": {"cpu_millis": cpu_millis, "memory_bytes": memory_bytes}}]},
        "status": {"phase": "Running", "cgroup": cgroup, "pids": pids or [], "restartCount": 2,
                   "internalIp": "127.0.0.1",
                   "containers": [{"name": "app", "state": "running", "restartCount": 2,
                                   "cgroup": f"{cgroup}/app" if cgroup else None}]},
    }


def start(argv: list[str], preexec: Callable[[], None] | None = None) -> subprocess.Popen[str]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, preexec_fn=preexec)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 15.0)
    assert ready and proc.stdout.readline().strip() == "ready", "the busy process did not start"
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.kill()
    proc.kill()
    proc.wait(timeout=10)


# ---- shapes -------------------------------------------------------------------------------

def test_node_resources_has_the_seed_fields() -> None:
    res = metrics.node_resources("node-639d7", state_dir="/tmp/does/not/exist/yet")
    assert set(res) == NODE_RESOURCES_KEYS
    assert set(res["networking"]) == {"hostname", "internalip", "externalip"}
    assert res["id"] == "node-639d7"
    assert res["cpu"] == psutil.cpu_count(logical=True)
    assert res["memory"] == psutil.virtual_memory().total
    assert res["disksize"] == psutil.disk_usage("/tmp").total
    assert res["type"] == "linux"
    assert res["arch"] in {"amd64", "arm64", "arm", "386", "ppc64le", "s390x", "riscv64"}
    assert res["kernelVersion"] == os.uname().release
    assert isinstance(res["version"], (int, str)) and res["distrib"]
    assert ipaddress.ip_address(res["networking"]["internalip"]).version == 4
    assert res["networking"]["externalip"] == res["networking"]["internalip"]
    assert metrics.node_resources("n", external_ip="203.0.113.9")["networking"]["externalip"] == \
        "203.0.113.9"


def test_realtime_node_has_the_seed_fields() -> None:
    node = metrics.realtime_node("node-639d7", CpuSampler())
    assert set(node) == REALTIME_NODE_KEYS
    assert node["state"] == "RUNNING"
    assert isinstance(node["timestamp"], int) and abs(node["timestamp"] - time.time()) < 5
    assert set(node["cpu"]) == {"totalCpu", "currentUsage"}
    assert node["cpu"]["totalCpu"] == psutil.cpu_count(logical=True)
    assert 0 <= node["cpu"]["currentUsage"] <= 100
    mem = node["memory"]
    assert set(mem) == {"totalMemory", "currentUsage", "freeMemory", "freeMemoryAmount"}
    assert mem["totalMemory"] == psutil.virtual_memory().total
    assert 0 < mem["freeMemory"] <= mem["totalMemory"]
    assert mem["currentUsage"] + mem["freeMemoryAmount"] == pytest.approx(100, abs=0.02)
    names = [d["diskName"] for d in node["disks"]]
    assert len(names) == len(set(names)), "a disk is listed once however often it is mounted"
    for disk in node["disks"]:
        assert set(disk) == {"diskName", "total", "used", "available"}
        assert disk["diskName"].startswith("/dev/")
        assert disk["total"] > 0 and 0 <= disk["used"] <= disk["total"]


def test_node_cpu_usage_follows_a_busy_process() -> None:
    sampler = CpuSampler()
    one_core = 100 / (psutil.cpu_count() or 1)
    proc = start([sys.executable, "-c", BUSY])
    try:
        wait_for(lambda: metrics.realtime_node("n", sampler)["cpu"]["currentUsage"] >= one_core / 2,
                 what="node CPU usage to show one busy core")
    finally:
        stop(proc)


def test_pod_fields_come_from_its_record() -> None:
    rec = record(image="registry.example:5000/nginx:1.19.1")
    pod = measure(rec, node_id="node-639d7")
    assert set(pod) == REALTIME_POD_KEYS
    assert pod["appId"] == "web" and pod["state"] == "RUNNING" and pod["runsOn"] == "node-639d7"
    assert pod["createdAt"] == 1700000000 and pod["internalIp"] == "127.0.0.1"
    assert pod["restartCount"] == 2
    assert pod["deployment"] == {"app": "web", "repository": "registry.example:5000/nginx",
                                 "version": "1.19.1"}
    assert set(pod["cpu"]) == {"totalCpu", "currentUsage"}
    assert set(pod["memory"]) == {"totalMemory", "freeMemory", "freeMemoryAmount"}
    # No cgroup, no live pid: the pod uses nothing of its 256 MiB, whatever the host does.
    assert pod["memory"] == {"totalMemory": 256 * MiB, "freeMemory": 256 * MiB, "freeMemoryAmount": 100.0}
    assert pod["cpu"] == {"totalCpu": 1.0, "currentUsage": 0.0}


def test_restart_count_is_summed_over_containers() -> None:
    rec = record()
    rec["status"]["containers"] = [{"name": "a", "restartCount": 2}, {"name": "b", "restartCount": 3}]
    assert measure(rec)["restartCount"] == 5


def test_a_process_pod_names_its_program_and_an_unlimited_pod_gets_node_capacity() -> None:
    rec = record(command=["/usr/bin/python3", "-m", "http.server"], cpu_millis=None, memory_bytes=None)
    pod = measure(rec)
    assert pod["deployment"] == {"app": "web", "repository": "/usr/bin/python3", "version": ""}
    assert pod["cpu"]["totalCpu"] == psutil.cpu_count(logical=True)
    assert pod["memory"]["totalMemory"] == psutil.virtual_memory().total


@pytest.mark.parametrize(("image", "expected"), [
    ("nginx", ("nginx", "")),
    ("nginx:1.19.1", ("nginx", "1.19.1")),
    ("localhost:5000/team/app", ("localhost:5000/team/app", "")),
    ("localhost:5000/team/app:v2", ("localhost:5000/team/app", "v2")),
    ("busybox@sha256:abc", ("busybox", "sha256:abc")),
])
def test_split_image(image: str, expected: tuple[str, str]) -> None:
    assert metrics.split_image(image) == expected


# ---- CPU rates ------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_first_reading_samples_over_a_short_interval_then_rates_use_the_previous_one() -> None:
    clock, cpu = Clock(), [10.0]

    def read() -> float:
        cpu[0] += 0.05 if clock.sleeps else 0  # half a core during the first 100 ms
        return cpu[0]

    sampler = CpuSampler(clock=clock, sleep=clock.sleep)
    assert sampler.percent("k", read, capacity=1) == 50.0
    assert clock.sleeps == [0.1]
    clock.now += 1.0
    cpu[0] += 1.5  # 1.5 cores over the next second (+0.05 from read itself)
    assert sampler.cores("k", read) == pytest.approx(1.55)
    assert sampler.percent("k", read, capacity=1) == 100.0, "clamped to the capacity"
    assert clock.sleeps == [0.1], "only the first reading waits"


def test_readings_too_close_together_return_the_previous_rate() -> None:
    clock = Clock()
    values = iter([0.0, 0.1, 5.0])
    sampler = CpuSampler(clock=clock, sleep=clock.sleep)
    assert sampler.cores("k", lambda: next(values)) == pytest.approx(1.0)
    clock.now += 0.001
    assert sampler.cores("k", lambda: next(values)) == pytest.approx(1.0)


def test_a_counter_that_goes_back_starts_over() -> None:
    clock = Clock()
    values = iter([50.0, 50.1, 1.0, 1.02])
    sampler = CpuSampler(clock=clock, sleep=clock.sleep)
    sampler.cores("k", lambda: next(values))
    clock.now += 10
    assert sampler.cores("k", lambda: next(values)) == pytest.approx(0.2)
    assert clock.sleeps == [0.1, 0.1]


def test_priming_many_new_keys_waits_once() -> None:
    clock = Clock()
    sampler = CpuSampler(clock=clock, sleep=clock.sleep)
    counters = {f"pod{i}": [0.0] for i in range(5)}

    def reader(key: str) -> Callable[[], float]:
        def read() -> float:
            counters[key][0] += 0.01
            return counters[key][0]
        return read

    sampler.prime({k: reader(k) for k in counters})
    rates = [sampler.cores(k, reader(k)) for k in counters]
    assert clock.sleeps == [0.1]
    assert rates == [pytest.approx(0.1)] * 5


# ---- pods measured from their cgroup --------------------------------------------------------

class FakeReader(GroupReader):
    """Answers for the pod's own group from ``usages``, in order; it has no other group."""

    def __init__(self, relpath: str, usages: Iterator[GroupUsage]) -> None:
        super().__init__(cgroups.Layout(1, "/nonexistent", {}), budget=0)
        self.relpath = relpath
        self.opened: list[str] = []
        self._usages = usages

    def usage(self, relpath: str) -> GroupUsage:
        self.opened.append(relpath)
        if relpath != self.relpath:
            raise GroupGone(relpath)
        return next(self._usages)


def test_the_tightest_of_cgroup_and_spec_limits_is_the_pod_total() -> None:
    clock = Clock()
    reader = FakeReader("riklet/ab12cd34/web", iter([GroupUsage(0, 32 * MiB, 128 * MiB),
                                                     GroupUsage(50_000_000, 32 * MiB, 128 * MiB)]))
    rec = record(cgroup="riklet/ab12cd34/web", pids=[os.getpid()], cpu_millis=500)
    pod = measure(rec, snapshotter(reader, clock=clock, sleep=clock.sleep))
    assert reader.opened[0] == "riklet/ab12cd34/web"
    assert pod["memory"] == {"totalMemory": 128 * MiB, "freeMemory": 96 * MiB, "freeMemoryAmount": 75.0}
    # 0.05 s of CPU in 0.1 s: all of its half core
    assert pod["cpu"] == {"totalCpu": 0.5, "currentUsage": 100.0}


@pytest.fixture
def pod_cgroup() -> Iterator[str]:
    """A v1 cgroup in memory, cpu and cpuacct, limited to 256 MiB; yields its relative path."""
    relpath = f"riklet-test/{uuid.uuid4().hex[:12]}"
    made: list[str] = []
    try:
        for controller in CONTROLLERS:
            path = os.path.join(CGROUP_ROOT, controller, relpath)
            os.makedirs(path, exist_ok=True)
            made.append(path)
        with open(os.path.join(CGROUP_ROOT, "memory", relpath, "memory.limit_in_bytes"), "w") as fh:
            fh.write(str(256 * MiB))
    except OSError as exc:
        for path in made:
            os.rmdir(path)
        unavailable(f"cannot create v1 cgroups under {CGROUP_ROOT}/{{memory,cpu,cpuacct}}: {exc}")
    try:
        yield relpath
    finally:
        for path in made:
            os.rmdir(path)
            with contextlib.suppress(OSError):  # riklet-test stays while another run uses it
                os.rmdir(os.path.dirname(path))


def _join(relpath: str) -> Callable[[], None]:
    def preexec() -> None:  # runs in the child before exec: every byte it allocates is charged
        for controller in CONTROLLERS:
            with open(os.path.join(CGROUP_ROOT, controller, relpath, "cgroup.procs"), "w") as fh:
                fh.write(str(os.getpid()))
    return preexec


def _cgroup_working_set(relpath: str) -> int:
    base = os.path.join(CGROUP_ROOT, "memory", relpath)
    with open(os.path.join(base, "memory.usage_in_bytes")) as fh:
        usage = int(fh.read())
    with open(os.path.join(base, "memory.stat")) as fh:
        stat = dict(line.split() for line in fh)
    return usage - int(stat.get("total_inactive_file", 0))


def test_pod_figures_are_its_cgroups_not_the_hosts(pod_cgroup: str) -> None:
    proc = start([sys.executable, "-c", BUSY], preexec=_join(pod_cgroup))
    try:
        # No pids in the record: only the cgroup can show this pod's usage.
        rec = record(cgroup=pod_cgroup, pids=[], cpu_millis=1000, memory_bytes=None)
        snap = snapshotter()
        pod = measure(rec, snap)
        mem = pod["memory"]
        assert mem["totalMemory"] == 256 * MiB != psutil.virtual_memory().total
        used = mem["totalMemory"] - mem["freeMemory"]
        assert BALLAST <= used <= BALLAST + 40 * MiB
        assert used == pytest.approx(_cgroup_working_set(pod_cgroup), abs=8 * MiB)
        assert mem["freeMemoryAmount"] == pytest.approx(100 * mem["freeMemory"] / (256 * MiB), abs=0.01)
        assert pod["cpu"]["totalCpu"] == 1.0
        wait_for(lambda: measure(rec, snap)["cpu"]["currentUsage"] >= 50,
                 what="the busy pod to use at least half its core")
    finally:
        stop(proc)


def test_an_idle_cgroup_shows_no_cpu_while_the_host_is_busy(pod_cgroup: str) -> None:
    busy = start([sys.executable, "-c", BUSY])
    # `sleep`, not a Python interpreter: an interpreter's start-up CPU would be sampled too.
    idle = subprocess.Popen(["sleep", "60"], preexec_fn=_join(pod_cgroup))
    try:
        rec = record(cgroup=pod_cgroup, cpu_millis=None, memory_bytes=None)
        snap = snapshotter(first_interval=0.5)  # the first pass measures over half a second
        assert measure(rec, snap)["cpu"]["currentUsage"] < 5
    finally:
        stop(busy)
        idle.kill()
        idle.wait(timeout=10)


# ---- pods measured from their process tree --------------------------------------------------

def test_a_pod_without_its_cgroup_is_measured_from_its_process_tree() -> None:
    proc = start([sys.executable, "-c", PARENT])
    try:
        rec = record(cgroup=f"riklet-test/absent-{uuid.uuid4().hex[:8]}", pids=[proc.pid],
                     cpu_millis=1000, memory_bytes=1024 * MiB)
        snap = snapshotter()
        pod = measure(rec, snap)
        used = pod["memory"]["totalMemory"] - pod["memory"]["freeMemory"]
        assert pod["memory"]["totalMemory"] == 1024 * MiB
        assert BALLAST <= used <= BALLAST + 60 * MiB, "the child's memory counts, the host's does not"
        wait_for(lambda: measure(rec, snap)["cpu"]["currentUsage"] >= 50,
                 what="the busy child to count as the pod's CPU")
    finally:
        stop(proc)


def test_pid_1_is_never_taken_for_a_pod() -> None:
    pod = measure(record(pids=[1, 0]))
    assert pod["memory"]["freeMemoryAmount"] == 100.0


# ---- what the monitor's mirror keeps of a record --------------------------------------------

def test_the_kept_record_gives_the_monitor_what_the_whole_record_does() -> None:
    full = record(cgroup="riklet/n/web", pids=[4242], image=None, command=["sleep", "infinity"])
    full["spec"].update({"instance_id": "inst-1", "ports": [{"port": 30080, "target_port": 80}],
                         "restartPolicy": "Always", "gracePeriod": 10.0})
    full["spec"]["containers"][0].update({"env": {"A": "1" * 200}, "args": ["x"] * 20})
    full["status"].update({"ready": False, "conditions": [{"type": "Ready", "status": "False"}],
                           "message": "m" * 300, "transitionAt": 1700000001.5, "endpoints": []})
    full["status"]["containers"][0].update({"pid": 4243, "startedAt": 1700000001.0, "reason": None})
    small = kept(full)
    whole, part = entry(full), entry(small)
    assert (part.name, part.key, part.facts, part.cgroup, part.pids, part.containers) == \
        (whole.name, whole.key, whole.facts, whole.cgroup, whole.pids, whole.containers)
    assert part.pids == (4242, 4243) and part.facts.deployment["repository"] == "sleep"
    assert status_of(small) == status_of(full) == cpb.CREATING   # running, not ready
    assert instance_id_of(small) == "inst-1"
    # what the monitor never reads is not kept: the env, args, ports, messages and conditions
    assert small["spec"]["containers"][0] == {"image": None, "command": ["sleep"],
                                              "resources": full["spec"]["containers"][0]["resources"]}
    assert "ports" not in small["spec"]
    assert not {"message", "conditions", "transitionAt"} & set(small["status"])
    assert len(json.dumps(small)) < len(json.dumps(full)) / 2
    # a deleted pod, and fields of a wrong type, reach the readers as they were
    full["desired"], full["status"]["containers"] = "deleted", "junk"
    assert status_of(kept(full)) == cpb.DESTROYING and kept(full)["status"]["containers"] == "junk"
