"""The per-pod shim, with real processes and real cgroups: start, report, restart, stop, logs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from common.cgroups import Cgroup, Layout
from common.errors import InvalidArgument, Unavailable
from common.rotlog import RotatingWriter, rotated_files, tail
from services.manager.process import build, shim, shimctl
from services.manager.process.shimctl import BackoffSpec, Reason
from tests.support import cgroup_layout, wait_for

TEST_ROOT = "riklet-test"





@pytest.fixture(scope="module")
def layout() -> Layout:
    found: Layout = cgroup_layout(TEST_ROOT)
    return found


@dataclass
class Pod:
    dir: str
    cgroup_parent: str
    pid: int = 0

    def status(self) -> dict[str, Any]:
        return shimctl.read_status(self.dir) or {}

    def container(self, name: str = "app") -> dict[str, Any]:
        for c in self.status().get("containers", []):
            if c["name"] == name:
                return dict(c)
        return {}

    def wait_container(
        self, check: Callable[[dict[str, Any]], bool], what: str, timeout: float = 10.0
    ) -> dict[str, Any]:
        return dict(wait_for(lambda: (c := self.container()) and check(c) and c, timeout, what))

    def log(self, name: str = "app") -> str:
        return os.path.join(self.dir, "logs", f"{name}.log")

    def cgroup(self, name: str = "app") -> Cgroup:
        return Cgroup(f"{self.cgroup_parent}/{name}")


@dataclass
class Pods:
    root: Path
    parent: str
    made: list[Pod] = field(default_factory=list)

    def write(self, containers: list[dict[str, Any]], grace: float = 1.0, **extra: Any) -> Pod:
        pod = Pod(str(self.root / f"pod{len(self.made)}"), f"{self.parent}/web{len(self.made)}")
        os.makedirs(pod.dir)
        spec = {
            "pod": "web", "uid": uuid.uuid4().hex, "grace_period": grace, "cgroup_parent": pod.cgroup_parent,
            "log": {"dir": os.path.join(pod.dir, "logs"), "max_size": 1 << 20, "max_files": 3},
            "backoff": {"initial": 0.1, "max": 0.4, "reset": 600.0},
            "containers": [{"name": "app", "restart_policy": "Never", **c} for c in containers],
            **extra,
        }
        Path(pod.dir, "spec.json").write_text(json.dumps(spec))
        self.made.append(pod)
        return pod

    def start(self, containers: list[dict[str, Any]], grace: float = 1.0, **extra: Any) -> Pod:
        pod = self.write(containers, grace, **extra)
        pod.pid = shim.spawn(pod.dir)
        return pod


@pytest.fixture
def pods(tmp_path: Path, layout: Layout) -> Iterator[Pods]:
    pods = Pods(tmp_path, f"{TEST_ROOT}/{uuid.uuid4().hex[:12]}")
    yield pods
    for pod in pods.made:
        start = pod.status().get("shim_start")
        stopped = shimctl.stop(pod.dir, 10)
        if not stopped and pod.pid and isinstance(start, int) and shimctl.pid_alive(pod.pid, start):
            os.kill(pod.pid, signal.SIGKILL)  # a shim this test started
    parent = Cgroup(pods.parent, layout)
    if parent.exists():
        parent.kill_all(signal.SIGKILL)
        wait_for(lambda: not parent.pids(), what="leftover processes to die")
        parent.remove()
    for mount in set(layout.mounts.values()):
        try:
            os.rmdir(os.path.join(mount, TEST_ROOT))
        except OSError:
            continue  # another test still uses it


def running(c: dict[str, Any]) -> bool:
    return bool(c.get("state") == "running")


def terminated(c: dict[str, Any]) -> bool:
    return bool(c.get("state") == "terminated")


def alive(pid: int) -> bool:
    start = shimctl.proc_start_time(pid)
    return start is not None and shimctl.pid_alive(pid, start)


# -- starting and reporting ----------------------------------------------------------------


def test_container_runs_in_its_cgroup_and_group_with_its_env(pods: Pods) -> None:
    script = 'echo "K=$K"; cat /proc/self/cgroup; exec sleep 60'
    pod = pods.start([{"command": ["sh", "-c", script], "env": {"K": "V"}, "memory_bytes": 64 << 20}])
    status = pod.status()
    assert status["shim_pid"] == pod.pid and status["state"] == "running"
    assert shimctl.pid_alive(pod.pid, status["shim_start"])
    c = pod.wait_container(running, "the container to run")
    assert shimctl.pid_alive(c["pid"], c["pid_start"])
    assert c["cgroup"] == f"{pod.cgroup_parent}/app" and c["restartCount"] == 0
    assert c["pid"] in pod.cgroup().pids()
    assert os.getpgid(c["pid"]) == c["pid"]
    # the shell saw itself in the cgroup before running anything: placed before exec
    output = wait_for(lambda: (text := Path(pod.log()).read_text()).count("\n") >= 3 and text, what="output")
    assert "K=V\n" in output
    assert f":memory:/{c['cgroup']}\n" in output or f"0::/{c['cgroup']}\n" in output


def test_shim_survives_its_spawner(pods: Pods) -> None:
    pod = pods.write([{"command": ["sleep", "60"]}])
    code = "import sys; from services.manager.process.shim import spawn; print(spawn(sys.argv[1]))"
    argv = [sys.executable, "-c", code, pod.dir]
    spawner = subprocess.run(argv, capture_output=True, check=True, timeout=10)
    pod.pid = int(spawner.stdout)
    assert alive(pod.pid)
    assert os.getsid(pod.pid) != os.getsid(0)  # its own session: no signal to ours reaches it
    assert shimctl.proc_stat(pod.pid)[1] != str(os.getpid())  # type: ignore[index]
    c = pod.wait_container(running, "the container to run")
    assert alive(c["pid"])


def test_a_fork_server_starts_shims_that_outlive_it(pods: Pods) -> None:
    server = shim.ShimServer()
    try:
        made = []
        for i in range(2):
            pod = pods.write([{"command": ["sleep", "60"]}])
            pod.pid = shim.spawn(pod.dir, spec=json.loads(Path(pod.dir, "spec.json").read_text()),
                                 driver={"n": i, "name": "ü"}, server=server)
            made.append(pod)
        server_pid = server._proc.pid if server._proc else 0
        for i, pod in enumerate(made):
            status = pod.status()
            assert status["shim_pid"] == pod.pid and alive(pod.pid)
            assert status["driver"] == {"n": i, "name": "ü"}   # kept as given
            assert os.getsid(pod.pid) == pod.pid   # a session of its own
            assert alive(pod.wait_container(running, "the container to run")["pid"])
    finally:
        server.close()
    wait_for(lambda: not alive(server_pid), what="the server to end with its socket")
    for pod in made:
        assert alive(pod.pid) and pod.container()["state"] == "running"
        os.kill(pod.pid, signal.SIGTERM)
        wait_for(lambda pod=pod: pod.status().get("state") == "exited", what="the shim to stop")


def test_the_fork_server_answers_a_bad_spec_and_is_started_again_once_dead(pods: Pods) -> None:
    server = shim.ShimServer()
    try:
        pod = pods.write([{"command": ["sleep", "60"]}])
        with pytest.raises(Unavailable, match="could not start the shim: bad spec: a record's length"):
            shim._through(server, pod.dir, b"pod 3:web\nuid 99:short\n")
        assert pod.status() == {}
        assert server._proc is not None
        server._proc.kill()
        server._proc.wait()
        pod.pid = shim.spawn(pod.dir, spec=json.loads(Path(pod.dir, "spec.json").read_text()),
                             server=server)
        assert alive(pod.pid) and pod.status()["state"] == "running"
    finally:
        server.close()


def test_sigterm_stops_a_process_that_ignores_it(pods: Pods) -> None:
    script = (
        "import signal, subprocess, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen(['setsid', 'sleep', '600'])\n"  # leaves the process group
        "print('ready', child.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    pod = pods.start([{"command": ["python3", "-c", script], "restart_policy": "Always"}], grace=1.0)
    c = pod.wait_container(running, "the container to run")
    ready = wait_for(lambda: Path(pod.log()).read_text().split(), what="the workload to be ready")
    grandchild = int(ready[1])
    started = time.monotonic()
    os.kill(pod.pid, signal.SIGTERM)
    wait_for(lambda: pod.status().get("state") == "exited", timeout=1.0 + 3.0, what="the shim to stop")
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 4.0  # the grace period was given, then SIGKILL
    final = pod.container()
    assert (final["state"], final["reason"], final["signal"], final["exitCode"]) == (
        "terminated", "Signaled", "SIGKILL", 137)
    assert not alive(c["pid"]) and not alive(grandchild)
    assert not pod.cgroup().exists() and not Cgroup(pod.cgroup_parent).exists()
    wait_for(lambda: not alive(pod.pid), what="the shim process to exit")


def test_stop_helper_stops_the_shim_and_tolerates_absence(pods: Pods, tmp_path: Path) -> None:
    pod = pods.start([{"command": ["sleep", "60"]}])
    c = pod.wait_container(running, "the container to run")
    assert shimctl.stop(pod.dir, 5)
    assert pod.status()["state"] == "exited"
    assert (pod.container()["reason"], pod.container()["signal"]) == ("Signaled", "SIGTERM")
    assert not alive(c["pid"])
    assert shimctl.stop(pod.dir, 1)  # already gone
    assert shimctl.stop(str(tmp_path / "nowhere"), 1)


# -- exits and restarts --------------------------------------------------------------------


def test_on_failure_restarts_with_growing_backoff(pods: Pods) -> None:
    pod = pods.start([{"command": ["sh", "-c", "exit 3"], "restart_policy": "OnFailure"}])
    delays: dict[int, float] = {}

    def seen_restarts() -> bool:
        c = pod.container()
        if c.get("state") == "waiting" and c.get("nextRestartAt"):
            assert (c["exitCode"], c["reason"]) == (3, "Error")  # a back-off shows why
            delays[c["restartCount"]] = round(c["nextRestartAt"] - c["finishedAt"], 3)
        return c.get("restartCount", 0) >= 4

    wait_for(seen_restarts, what="four restarts")
    assert sorted(delays) == list(range(len(delays)))  # every waiting period was observed
    assert [delays[i] for i in sorted(delays)][:4] == [0.1, 0.2, 0.4, 0.4]
    last = pod.container()["lastTermination"]
    assert (last["exitCode"], last["reason"]) == (3, "Error")


def test_never_does_not_restart(pods: Pods) -> None:
    pod = pods.start([{"command": ["sh", "-c", "exit 1"], "restart_policy": "Never"}])
    c = pod.wait_container(terminated, "the container to end")
    assert (c["exitCode"], c["reason"], c["restartCount"], c["nextRestartAt"]) == (1, "Error", 0, None)
    assert c["finishedAt"] >= c["startedAt"]


def test_success_under_on_failure_is_completed(pods: Pods) -> None:
    pod = pods.start([{"command": ["true"], "restart_policy": "OnFailure"}])
    c = pod.wait_container(terminated, "the container to end")
    assert (c["exitCode"], c["reason"], c["restartCount"], c["nextRestartAt"]) == (0, "Completed", 0, None)


def test_always_restarts_even_after_success(pods: Pods) -> None:
    pod = pods.start([{"command": ["true"], "restart_policy": "Always"}])
    pod.wait_container(lambda c: c["restartCount"] >= 2, "two restarts")
    assert pod.container()["lastTermination"]["reason"] == "Completed"


def test_memory_hog_is_oom_killed(pods: Pods) -> None:
    hog = "b = b'x' * (200 << 20)"
    pod = pods.start([{"command": ["python3", "-c", hog], "memory_bytes": 32 << 20}])
    c = pod.wait_container(terminated, "the container to end")
    assert (c["reason"], c["exitCode"], c["signal"]) == ("OOMKilled", 137, "SIGKILL")


def test_cpu_limit_holds_a_busy_loop(pods: Pods) -> None:
    pod = pods.start([{"command": ["python3", "-c", "while True: pass"], "cpu_millis": 200}])
    pod.wait_container(running, "the container to run")
    group = pod.cgroup()
    before, t0 = group.usage().cpu_ns, time.monotonic()
    time.sleep(1.0)  # the measurement window, not synchronisation
    after, t1 = group.usage().cpu_ns, time.monotonic()
    share = (after - before) / 1e9 / (t1 - t0)
    assert 0.05 < share < 0.35


def test_a_group_left_with_a_limit_is_reset_for_a_pod_without_one(pods: Pods) -> None:
    pod = pods.write([{"command": ["sleep", "60"]}])
    leftover = pod.cgroup()
    leftover.create()
    leftover.set_limits(cpu_millis=100, memory_bytes=64 << 20)   # an earlier run's
    pod.pid = shim.spawn(pod.dir)
    pod.wait_container(running, "the container to run")
    assert pod.cgroup().usage().memory_limit is None


def test_missing_binary_is_a_start_error(pods: Pods) -> None:
    pod = pods.start([{"command": ["/nonexistent/riklet-test-binary"]}])
    c = pod.wait_container(terminated, "the container to end")
    assert (c["reason"], c["exitCode"]) == ("StartError", 127)
    assert "No such file or directory" in c["message"]


def test_unexecutable_file_is_a_start_error_126(pods: Pods, tmp_path: Path) -> None:
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\n")
    pod = pods.start([{"command": [str(script)]}])
    c = pod.wait_container(terminated, "the container to end")
    assert (c["reason"], c["exitCode"]) == ("StartError", 126)


def test_bad_working_dir_is_a_start_error(pods: Pods) -> None:
    pod = pods.start([{"command": ["true"], "working_dir": "/nonexistent/dir"}])
    c = pod.wait_container(terminated, "the container to end")
    assert c["reason"] == "StartError" and "working_dir" in c["message"]


# -- logs ----------------------------------------------------------------------------------


def test_log_rotation_bounds_a_fast_writer(pods: Pods) -> None:
    writer = "import sys\nfor i in range(50000): sys.stdout.write(f'{i:08d} ' + 'x' * 90 + '\\n')"
    log = {"dir": "", "max_size": 256 << 10, "max_files": 3}
    pod = pods.write([{"command": ["python3", "-c", writer]}])
    spec = json.loads(Path(pod.dir, "spec.json").read_text())
    spec["log"] = {**log, "dir": os.path.join(pod.dir, "logs")}
    Path(pod.dir, "spec.json").write_text(json.dumps(spec))
    pod.pid = shim.spawn(pod.dir)
    c = pod.wait_container(terminated, "the writer to finish")
    assert c["reason"] == "Completed"
    path = pod.log()
    assert tail(path, 1).startswith(b"00049999 ")  # everything written before exit is logged
    files = rotated_files(path)
    assert [f.rsplit("/", 1)[1] for f in files] == ["app.log.2", "app.log.1", "app.log"]
    assert sum(os.path.getsize(f) for f in files) <= 3 * (256 << 10)
    kept = tail(path, None).splitlines()
    assert [int(line[:8]) for line in kept] == list(range(50000 - len(kept), 50000))


def test_stderr_and_stdout_share_one_log(pods: Pods) -> None:
    pod = pods.start([{"command": ["sh", "-c", "echo out; echo err >&2"]}])
    pod.wait_container(terminated, "the container to end")
    assert sorted(Path(pod.log()).read_text().split()) == ["err", "out"]


# -- the spec, the status and pure rules ---------------------------------------------------


def test_a_bad_spec_is_refused_by_spawn_and_by_the_shim(pods: Pods) -> None:
    pod = pods.write([{"command": []}])
    with pytest.raises(InvalidArgument) as err:
        shim.spawn(pod.dir)
    assert err.value.field == "containers[0].command"
    assert pod.status() == {}
    # the binary refuses a spec it cannot parse, before it forks anything
    run = subprocess.run([build.ensure(), pod.dir], input=b"pod 3:web\nuid 99:short\n",
                         capture_output=True, timeout=10)
    assert run.returncode == 2 and b"length does not match" in run.stderr and not run.stdout
    assert pod.status() == {}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"containers": [{"name": "a/b", "command": ["x"]}]}, "containers[0].name"),
        ({"containers": [{"name": "a", "command": ["x"], "restart_policy": "Sometimes"}]},
         "containers[0].restart_policy"),
        ({"containers": [{"name": "a", "command": ["x"], "memory_bytes": -1}]}, "containers[0].memory_bytes"),
        ({"cgroup_parent": "../escape"}, "cgroup_parent"),
        ({"grace_period": "soon"}, "grace_period"),
        ({"log": {"dir": "relative"}}, "log.dir"),
        ({"surprise": 1}, "spec"),
        ({"notify": "relative.sock"}, "notify"),
        ({"notify": "/" + "n" * 107}, "notify"),
    ],
)
def test_parse_spec_names_the_field_at_fault(change: dict[str, Any], field: str) -> None:
    spec = {"pod": "p", "uid": "u", "cgroup_parent": "riklet/x/p", "log": {"dir": "/tmp/l"},
            "containers": [{"name": "a", "command": ["x"]}], **change}
    with pytest.raises(InvalidArgument) as err:
        shimctl.parse_spec(spec)
    assert err.value.field == field


def test_parse_spec_fills_defaults() -> None:
    spec = shimctl.parse_spec({"pod": "p", "uid": "u", "cgroup_parent": "riklet/x/p",
                               "log": {"dir": "/tmp/l"}, "containers": [{"name": "a", "command": ["x"]}]})
    assert spec.grace_period == 30.0 and spec.backoff == BackoffSpec()
    assert spec.containers[0].restart_policy == "Always"
    assert shimctl.parse_spec(shimctl.spec_to_json(spec)) == spec


def test_exit_classification() -> None:
    assert shimctl.classify(0, False).reason == Reason.COMPLETED
    assert shimctl.classify(3 << 8, False).exit_code == 3
    killed = shimctl.classify(signal.SIGKILL, True)
    assert (killed.reason, killed.exit_code) == (Reason.OOM_KILLED, 137)
    term = shimctl.classify(signal.SIGTERM, True)
    assert (term.reason, term.exit_code, term.signal) == (Reason.SIGNALED, 143, "SIGTERM")


def test_backoff_doubles_caps_and_resets() -> None:
    backoff = BackoffSpec(initial=1.0, max=5.0, reset=60.0)
    delays = [shimctl.next_delay(None, 0.5, backoff)]
    for _ in range(4):
        delays.append(shimctl.next_delay(delays[-1], 0.5, backoff))
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert shimctl.next_delay(5.0, 61.0, backoff) == 1.0


def test_pid_alive_rejects_zombies_and_reused_pids() -> None:
    me = os.getpid()
    start = shimctl.proc_start_time(me)
    assert start is not None and shimctl.pid_alive(me, start)
    assert not shimctl.pid_alive(me, start + 1)
    child = os.fork()
    if child == 0:
        os._exit(0)
    child_start = shimctl.proc_start_time(child)
    try:
        wait_for(lambda: (shimctl.proc_stat(child) or ["Z"])[0] == "Z", what="a zombie")
        assert child_start is not None and not shimctl.pid_alive(child, child_start)
    finally:
        os.waitpid(child, 0)


def test_read_status_ignores_missing_and_corrupt_files(tmp_path: Path) -> None:
    assert shimctl.read_status(str(tmp_path)) is None
    (tmp_path / "status.json").write_text("{not json")
    assert shimctl.read_status(str(tmp_path)) is None
    (tmp_path / "status.json").write_text('{"state": "running"}')
    assert shimctl.read_status(str(tmp_path)) is None


# -- the compiled shim: cost, events, logs, building ---------------------------------------


def test_spawn_returns_with_every_container_started(pods: Pods) -> None:
    pod = pods.start([{"name": "app", "command": ["sleep", "60"]},
                      {"name": "bad", "command": ["/nonexistent/riklet-test-binary"]}])
    # no waiting: the first status already has each container running or failed
    app, bad = pod.status()["containers"]
    assert app["state"] == "running" and shimctl.pid_alive(app["pid"], app["pid_start"])
    assert (bad["state"], bad["reason"], bad["exitCode"]) == ("terminated", "StartError", 127)


def test_a_running_shim_costs_under_1_5_mib_pss(pods: Pods) -> None:
    pod = pods.start([{"command": ["sleep", "60"]}])
    with open(f"/proc/{pod.pid}/smaps_rollup") as f:
        pss_kib = next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    assert pss_kib < 1536, f"shim PSS {pss_kib} KiB"


def test_every_status_write_is_announced_on_the_notify_socket(pods: Pods, tmp_path: Path) -> None:
    path = str(tmp_path / "n.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(10)
        pod = pods.start([{"command": ["sleep", "60"]}], notify=path)
        assert sock.recv(256) == b"web"  # the first status
        os.kill(pod.pid, signal.SIGTERM)
        while pod.status().get("state") != "exited":
            assert sock.recv(256) == b"web"  # stopping, the container's end, exited


def test_nobody_listening_on_the_notify_socket_is_harmless(pods: Pods, tmp_path: Path) -> None:
    pod = pods.start([{"command": ["sh", "-c", "exit 3"], "restart_policy": "OnFailure"}],
                     notify=str(tmp_path / "nobody.sock"))
    pod.wait_container(lambda c: c["restartCount"] >= 2, "two restarts")


def test_limits_without_cgroups_end_as_cgroups_unavailable(pods: Pods) -> None:
    pod = pods.write([{"command": ["sleep", "60"], "memory_bytes": 64 << 20, "restart_policy": "Always"}])
    pod.pid = shim.spawn(pod.dir, Layout(0, "/nonexistent"))
    c = pod.container()
    assert (c["state"], c["reason"], c["exitCode"], c["nextRestartAt"]) == (
        "terminated", "CgroupsUnavailable", None, None)
    assert "no writable cgroup hierarchy" in c["message"] and c["cgroup"] is None


def test_messages_are_escaped_json(pods: Pods) -> None:
    name = '/nonexistent/"q"\\\\\nline\tx\u00e9\U0001f600'
    pod = pods.start([{"command": [name]}])
    c = pod.container()
    assert c["message"] == f"{name}: No such file or directory"


def test_log_rotation_matches_the_python_writer_byte_for_byte(pods: Pods, tmp_path: Path) -> None:
    # Each chunk reaches the shim in one read (the workload waits until it is logged), so the
    # Python writer fed the same chunks must leave the same files.
    chunks = [b"a" * 300 + b"\n" + b"b" * 300 + b"\n", b"c" * 2500, b"d\n" * 700, b"\n" * 5,
              b"e" * 999 + b"\n", b"f" * 1000, b"g\n", b"h" * 10 + b"\n" + b"i" * 1200 + b"\n"]
    script = (
        "import glob, os, sys, time\n"
        "def size(f):\n"   # a file rotated away between glob and stat counts as its next name
        "    try: return os.path.getsize(f)\n"
        "    except OSError: return 0\n"
        "chunks = eval(sys.argv[1]); logged = 0\n"
        "for chunk in chunks:\n"
        "    os.write(1, chunk); logged += len(chunk); deadline = time.monotonic() + 10\n"
        "    while sum(size(f) for f in glob.glob(sys.argv[2] + '*') if not f.endswith('.times')) < logged:\n"
        "        assert time.monotonic() < deadline\n"
        "        time.sleep(0.002)\n"
    )
    pod = pods.write([{"command": ["python3", "-c", script, repr(chunks), "LOG"]}])
    spec = json.loads(Path(pod.dir, "spec.json").read_text())
    spec["log"].update(max_size=1000, max_files=20)
    spec["containers"][0]["command"][-1] = pod.log()
    Path(pod.dir, "spec.json").write_text(json.dumps(spec))
    pod.pid = shim.spawn(pod.dir)
    assert pod.wait_container(terminated, "the writer to finish")["reason"] == "Completed"
    writer = RotatingWriter(str(tmp_path / "app.log"), 1000, 20)
    for chunk in chunks:
        writer.write(chunk)
    writer.close()
    expected = {Path(f).name: Path(f).read_bytes() for f in rotated_files(str(tmp_path / "app.log"))}
    assert {Path(f).name: Path(f).read_bytes() for f in rotated_files(pod.log())} == expected
    assert len(expected) > 5


def test_build_rebuilds_a_stale_binary(tmp_path: Path) -> None:
    source, binary = tmp_path / "shim.c", str(tmp_path / "riklet-shim")
    source.write_bytes(Path(build.SOURCE).read_bytes())
    assert build.stale(str(source), binary)
    assert build.ensure(str(source), binary) == binary and not build.stale(str(source), binary)
    built = os.stat(binary).st_mtime_ns
    os.utime(source, ns=(built + 10**9, built + 10**9))
    assert build.stale(str(source), binary)
    build.ensure(str(source), binary)
    assert os.stat(binary).st_mtime_ns > built
    run = subprocess.run([binary], capture_output=True, timeout=10)
    assert run.returncode == 2 and b"usage: riklet-shim POD_DIR" in run.stderr


def test_without_a_compiler_a_missing_shim_names_make_install(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "shim.c"
    source.write_text("int main(void) { return 0; }\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(Unavailable, match="make install"):
        build.ensure(str(source), str(tmp_path / "riklet-shim"))


def test_without_cgroups_stop_kills_a_descendant_that_left_the_group(pods: Pods) -> None:
    script = "setsid sleep 600 & echo $!; exec sleep 600"
    pod = pods.write([{"command": ["sh", "-c", script]}])
    pod.pid = shim.spawn(pod.dir, Layout(0, "/nonexistent"))
    escaped = int(wait_for(lambda: Path(pod.log()).read_text().split(), what="the pid")[0])
    wait_for(lambda: os.getsid(escaped) == escaped, what="it to leave for a session of its own")
    assert shimctl.stop(pod.dir, 5)  # SIGTERM misses it; after the 1 s grace, SIGKILL does not
    assert pod.status()["state"] == "exited" and not alive(escaped)
