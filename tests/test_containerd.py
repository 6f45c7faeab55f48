"""The containerd runtime end to end: a real agent (supervisord, four services) driving a
private containerd, CNI plugins and a private registry. Under CI=true a missing containerd
fails these tests instead of skipping them (see tests/support.need)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.stack import Agent
from tests.support import free_port, parse_prometheus, wait_for

pytestmark = pytest.mark.integration


class CtrAgent:
    """An agent wired to the session's private containerd, with its own namespace, bridge and
    subnet, and the busybox image imported."""

    def __init__(self, env: Any, image: Any, insecure: str = "") -> None:
        tag = uuid.uuid4().hex[:6]
        self.env = env
        self.namespace = f"rkt-{tag}"
        self.bridge = f"rkb{tag}"
        self.subnet = f"10.{random.randint(100, 250)}.{random.randint(0, 255)}.0/24"
        self.image = image.ref
        self.agent = Agent(
            f"containerd:\n  address: {env.socket}\n  namespace: {self.namespace}\n"
            + (f"  insecure_registries: ['{insecure}']\n" if insecure else "")
            + f"network:\n  bridge: {self.bridge}\n  subnet: {self.subnet}\n"
            "policy:\n  allow_host_network: true\n"
            "restart:\n  backoff_initial: 0.5s\n")
        self.agent_id = hashlib.sha256(os.path.abspath(self.agent.state_dir).encode()).hexdigest()[:8]
        self.archive = image.archive

    def start(self) -> CtrAgent:
        self.agent.start()
        out = self.agent.ctl("image", "import", self.archive).stdout
        assert self.image in out.split()
        return self

    def ctr(self, *args: str) -> str:
        return str(self.env.ctr(*args, namespace=self.namespace, check=True).stdout)

    def containers(self) -> list[str]:
        return [line for line in self.ctr("containers", "ls", "-q").split() if line]

    def netns(self) -> list[str]:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return [line.split()[0] for line in out.splitlines()
                if line.startswith(f"riklet-{self.agent_id}-")]

    def ip_reservations(self) -> list[str]:
        d = os.path.join(self.agent.state_dir, "cni", "ipam")
        out = []
        for _root, _dirs, files in os.walk(d):
            out += [f for f in files if f[0].isdigit()]
        return out

    def cgroups(self) -> list[str]:
        out = []
        for controller in ("memory", "cpu", "cpuacct", "pids"):
            base = f"/sys/fs/cgroup/{controller}/riklet/{self.agent_id}"
            if os.path.isdir(base):
                out += [f"{controller}:{d}" for d in os.listdir(base)
                        if os.path.isdir(os.path.join(base, d))]
        return sorted(out)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            for pod in self.agent.pods():
                self.agent.ctl("delete", pod["name"], check=False)
            wait_for(lambda: not self.agent.pods(), 30, "pods deleted")
        self.agent.close()
        # whatever a failed test left behind
        for cid in self.containers():
            self.env.ctr("tasks", "kill", "-s", "SIGKILL", "-a", cid, namespace=self.namespace)
            with contextlib.suppress(AssertionError):
                wait_for(lambda c=cid: "RUNNING" not in self.env.ctr(
                    "tasks", "ls", namespace=self.namespace).stdout.split(c, 1)[-1][:80], 5, "task dead")
            self.env.ctr("tasks", "rm", "-f", cid, namespace=self.namespace)
            self.env.ctr("containers", "rm", cid, namespace=self.namespace)
        for ns in self.netns():
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        for name in self.ctr("images", "ls", "-q").split():
            self.env.ctr("images", "rm", name, namespace=self.namespace)
        self.env.ctr("namespaces", "rm", self.namespace)


@pytest.fixture
def ctr_agent(containerd_env: Any, busybox_archive: Any,
              request: pytest.FixtureRequest) -> Iterator[CtrAgent]:
    a = CtrAgent(containerd_env, busybox_archive)
    try:
        a.start()
        yield a
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            a.agent.dump_logs()
        a.close()


def http_get(host: str, port: int, path: str = "/hostname", timeout: float = 3) -> bytes:
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=timeout) as resp:
        return bytes(resp.read())


def container_of(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod["containers"] if c["name"] == name)


# -- running, logs, networking, stop and remove -----------------------------------------------


def test_run_serve_logs_stop_remove(ctr_agent: CtrAgent) -> None:
    a, host_port = ctr_agent, free_port()
    a.agent.ctl("run", "web", "--image", a.image, "--port", f"{host_port}:8080", "--grace", "1",
                "--env", "GREETING=hello from env", "--",
                "sh", "-c", 'echo "$GREETING"; echo to-stderr >&2; exec httpd -f -p 8080 -h /etc')
    pod = a.agent.wait_phase("web", "Running", 30)
    ip = pod["endpoints"][0]["address"]
    assert ip != "127.0.0.1" and pod["endpoints"][0]["port"] == 8080
    # the pod's own IP, then the node's port through the riklet proxy
    assert wait_for(lambda: http_get(ip, 8080), 10, "pod IP serving") == b"web\n"
    assert wait_for(lambda: http_get("127.0.0.1", host_port), 10, "host port via proxy") == b"web\n"
    logs = wait_for(lambda: (out := a.agent.ctl("logs", "web").stdout) and "to-stderr" in out and out,
                    10, "both streams in the log")
    assert "hello from env\n" in logs
    # the log driver keeps times: a recent since keeps the line, stamped as docker logs -t
    stamped = a.agent.ctl("logs", "web", "--since", "5m", "--timestamps").stdout.splitlines()
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z "
    assert any(re.fullmatch(stamp + "hello from env", line) for line in stamped), stamped
    assert a.containers() == [f"{a.agent_id}-web_web"]
    assert len(a.netns()) == 1

    # httpd as PID 1 ignores SIGTERM: stop escalates to SIGKILL after the 1 s grace period
    a.agent.ctl("stop", "web")
    stopped = a.agent.wait_phase("web", "Terminated", 15)
    assert stopped["containers"][0]["state"] == "terminated"
    a.agent.ctl("delete", "web")
    wait_for(lambda: not a.agent.pods(), 15, "pod removed")
    assert a.containers() == []
    assert a.netns() == [] and a.ip_reservations() == []
    snapshots = a.ctr("snapshots", "ls")
    assert f"{a.agent_id}-web" not in snapshots


def test_exit_code_and_restart_policy(ctr_agent: CtrAgent) -> None:
    a = ctr_agent
    a.agent.ctl("run", "once", "--image", a.image, "--restart", "Never", "--", "sh", "-c", "exit 3")
    pod = a.agent.wait_phase("once", "Error", 20)
    assert pod["exitCode"] == 3 and pod["containers"][0]["exitCode"] == 3
    assert pod["reason"] == "Error"

    a.agent.ctl("run", "crash", "--image", a.image, "--restart", "Always", "--",
                "sh", "-c", "echo run; exit 1")
    wait_for(lambda: a.agent.pod("crash")["restartCount"] >= 2, 20, "two restarts")
    assert a.agent.ctl("logs", "crash").stdout.count("run\n") >= 3


def test_memory_limit_oom_kills(ctr_agent: CtrAgent) -> None:
    a = ctr_agent
    a.agent.ctl("run", "hog", "--image", a.image, "--memory", "32m", "--restart", "Never", "--",
                "dd", "if=/dev/zero", "of=/dev/null", "bs=100M", "count=1")
    pod = a.agent.wait_phase("hog", "Error", 30)
    c = pod["containers"][0]
    assert (c["reason"], c["exitCode"]) == ("OOMKilled", 137), pod


def test_cpu_quota_throttles(ctr_agent: CtrAgent) -> None:
    a = ctr_agent
    a.agent.ctl("run", "spin", "--image", a.image, "--cpu", "0.5", "--memory", "64m", "--",
                "sh", "-c", "while :; do :; done")
    a.agent.wait_phase("spin", "Running", 30)
    def group(controller: str) -> str:
        for mount in (controller, "cpu,cpuacct"):
            path = f"/sys/fs/cgroup/{mount}/riklet/{a.agent_id}/spin/spin"
            if os.path.isdir(path):
                return path
        raise AssertionError(f"no {controller} cgroup for the container")

    with open(os.path.join(group("cpu"), "cpu.cfs_quota_us")) as fh:
        assert int(fh.read()) == 50_000

    def usage() -> tuple[float, int]:
        with open(os.path.join(group("cpuacct"), "cpuacct.usage")) as fh:
            return time.monotonic(), int(fh.read())

    t0, u0 = usage()
    deadline = t0 + 3.0
    while time.monotonic() < deadline:  # a measuring window, not a wait for an event
        time.sleep(0.1)
    t1, u1 = usage()
    share = (u1 - u0) / 1e9 / (t1 - t0)
    assert 0.45 <= share <= 0.55, f"the busy loop used {share:.2f} CPU under a 0.5 quota"

    # the same figures, per container, on the monitor's /metrics
    def scraped() -> dict[str, dict[str, float]]:
        with urllib.request.urlopen(f"http://{a.agent.metrics}/metrics", timeout=5) as resp:
            return parse_prometheus(resp.read().decode())[1]

    # The monitor serves its last sample (taken once per metric_resolution, 5 s): wait for a
    # pass after the measuring window.
    labels = '{container="spin",pod="spin"}'
    samples = wait_for(lambda: (m := scraped()).get("riklet_container_cpu_seconds_total", {}).get(labels, 0)
                       >= (u1 - u0) / 1e9 and m, 15, "per-container series past the window")
    assert samples["riklet_container_memory_limit_bytes"][labels] == 64 * 2**20
    assert 0 < samples["riklet_container_memory_working_set_bytes"][labels] < 64 * 2**20


def test_containers_of_a_pod_share_localhost(ctr_agent: CtrAgent, tmp_path: Any) -> None:
    a = ctr_agent
    manifest = {"name": "duo", "spec": {"containers": [
        {"name": "server", "image": a.image, "command": ["httpd", "-f", "-p", "8081", "-h", "/etc"]},
        {"name": "client", "image": a.image, "command": [
            "sh", "-c", "until wget -qO- http://127.0.0.1:8081/hostname; do sleep 0.1; done; "
                        "exec sleep 3600"]},
    ]}}
    path = tmp_path / "duo.json"
    path.write_text(json.dumps(manifest))
    a.agent.ctl("apply", "-f", str(path))
    a.agent.wait_phase("duo", "Running", 30)
    wait_for(lambda: "duo\n" in a.agent.ctl("logs", "duo", "-c", "client").stdout, 15,
             "the client reaching the server on localhost")
    assert len(a.netns()) == 1


def test_host_network(ctr_agent: CtrAgent) -> None:
    a, port = ctr_agent, free_port()
    a.agent.ctl("run", "hostnet", "--image", a.image, "--host-network", "--",
                "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", "/etc")
    a.agent.wait_phase("hostnet", "Running", 30)
    assert wait_for(lambda: http_get("127.0.0.1", port), 10, "host network server") == b"hostnet\n"
    assert a.netns() == []


# -- images -----------------------------------------------------------------------------------


def test_pull_from_registry_ls_and_rm(containerd_env: Any, busybox_archive: Any, registry: Any,
                                      request: pytest.FixtureRequest) -> None:
    a = CtrAgent(containerd_env, busybox_archive, insecure=registry.address)
    try:
        a.start()
        ref = f"{registry.address}/busybox:latest"
        a.agent.ctl("run", "pulled", "--image", ref, "--", "sleep", "3600")
        a.agent.wait_phase("pulled", "Running", 60)
        told = json.loads(a.agent.ctl("events", "pulled", "-o", "json").stdout)
        assert [e["reason"] for e in told][:4] == ["Scheduled", "Pulling", "Pulled", "Started"]
        assert told[2]["container"] == "pulled" and f"pulled image {ref} in " in told[2]["message"]
        names = [i["name"] for i in json.loads(a.agent.ctl("image", "ls", "-o", "json").stdout)]
        assert ref in names and a.image in names

        # an image that is in use cannot be removed; once its pod is gone it can
        refused = a.agent.ctl("image", "rm", ref, check=False)
        assert refused.returncode == 1 and "pulled" in refused.stderr
        a.agent.ctl("delete", "pulled")
        wait_for(lambda: not a.agent.pods(), 15, "pod removed")
        assert a.agent.ctl("image", "rm", ref).stdout.strip() == f"deleted {ref}"
        assert ref not in a.agent.ctl("image", "ls").stdout

        # rikletctl image pull reports and prints the name
        out = a.agent.ctl("image", "pull", ref)
        assert out.stdout.strip() == ref

        # missing image: Error with the reason, and the agent goes on
        a.agent.ctl("run", "missing", "--image", f"{registry.address}/nope:1", "--", "true")
        pod = a.agent.wait_phase("missing", "Error", 60)
        assert pod["reason"] == "ErrImagePull" and "nope" in (pod["message"] or "")
        def failures() -> list[dict[str, Any]]:
            told = json.loads(a.agent.ctl("events", "missing", "-o", "json").stdout)
            return [e for e in told if e["reason"] == "Failed"]
        failed = wait_for(failures, 30, "the failed pull told")
        assert failed[0]["type"] == "Warning" and "ErrImagePull" in failed[0]["message"]
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            a.agent.dump_logs()
        a.close()


def test_bad_image_input_is_refused(ctr_agent: CtrAgent, tmp_path: Any) -> None:
    a = ctr_agent
    res = a.agent.ctl("image", "rm", "bad ref", check=False)
    assert res.returncode == 1 and "image" in res.stderr
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    res = a.agent.ctl("image", "import", str(empty), check=False)
    assert res.returncode == 1 and "empty" in res.stderr
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar archive" * 100)
    res = a.agent.ctl("image", "import", str(junk), check=False)
    assert res.returncode != 0
    assert a.agent.ctl("image", "ls").stdout.count("\n") == 2  # header and busybox only


# -- lifecycle at scale and across restarts -----------------------------------------------------


def test_fifty_create_delete_cycles_leak_nothing(ctr_agent: CtrAgent) -> None:
    a = ctr_agent
    for batch in range(5):
        names = [f"cyc{batch}-{i}" for i in range(10)]
        for n in names:
            a.agent.ctl("run", n, "--image", a.image, "--grace", "0", "--", "sleep", "3600")
        for n in names:
            a.agent.wait_phase(n, "Running", 60)
        for n in names:
            a.agent.ctl("delete", n)
        wait_for(lambda: not a.agent.pods(), 60, "batch deleted")
    assert a.containers() == []
    assert a.netns() == []
    assert a.ip_reservations() == []
    assert a.cgroups() == []
    ours = [s for s in a.ctr("snapshots", "ls").splitlines() if f"{a.agent_id}-" in s]
    assert ours == []


def test_manager_restart_keeps_containers_running(ctr_agent: CtrAgent) -> None:
    a = ctr_agent
    a.agent.ctl("run", "keep", "--image", a.image, "--", "sh", "-c", "echo started; exec sleep 3600")
    pid = a.agent.wait_phase("keep", "Running", 30)["containers"][0]["pid"]
    # a container with this agent's label that no pod owns: reported at start, left alone
    a.ctr("containers", "create", "--label", f"riklet.agent={a.agent_id}", "--label", "riklet.pod=ghost",
          a.image, f"{a.agent_id}-ghost_c", "true")
    a.agent.supervisorctl("restart", "riklet:manager")
    a.agent.wait_ready()
    pod = a.agent.wait_phase("keep", "Running", 30)
    assert pod["containers"][0]["pid"] == pid and pod["restartCount"] == 0

    def orphan_logged() -> bool:
        with open(os.path.join(a.agent.state_dir, "log", "manager.log"), encoding="utf-8") as fh:
            return any("container of no known pod" in line and "ghost" in line for line in fh)
    wait_for(orphan_logged, 20, "the orphan container reported")
    assert f"{a.agent_id}-ghost_c" in a.containers()
    # the adopted container is still managed: killed, it is restarted by the new manager
    os.kill(pid, 9)
    wait_for(lambda: (p := a.agent.pod("keep"))["restartCount"] == 1 and p["phase"] == "Running", 20,
             "restart after the kill")
    # the whole agent
    pid = a.agent.pod("keep")["containers"][0]["pid"]
    a.agent.stop()
    assert os.path.exists(f"/proc/{pid}")
    a.agent.start()
    pod = a.agent.wait_phase("keep", "Running", 30)
    assert pod["containers"][0]["pid"] == pid
    assert a.agent.ctl("logs", "keep").stdout.count("started\n") == 2


# -- no containerd ------------------------------------------------------------------------------


def test_without_containerd_image_pods_fail_and_process_pods_run() -> None:
    sock = f"/tmp/no-containerd-{uuid.uuid4().hex[:8]}.sock"
    agent = Agent(f"containerd:\n  address: {sock}\n")
    try:
        agent.start()
        agent.ctl("run", "img", "--image", "riklet.test/busybox:latest", "--", "true")
        pod = agent.wait_phase("img", "Error", 20)
        assert pod["reason"] == "RuntimeUnavailable" and sock in (pod["message"] or "")
        agent.ctl("run", "proc", "--", "sleep", "3600")
        agent.wait_phase("proc", "Running", 20)
        res = agent.ctl("image", "ls", check=False)
        assert res.returncode == 3 and sock in res.stderr
    finally:
        agent.close()
