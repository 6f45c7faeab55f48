"""A real riklet under test: supervisord and the four services in private directories.

Each Agent gets its own run dir (short: unix socket paths are limited), state dir and ports,
so several can run side by side. Teardown deletes every pod through the API, then stops
supervisord, then kills whatever a broken test left behind (by the pids it recorded).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import grpc

from common import auth, pb
from tests.support import free_ports, wait_for

pb.ensure()
from common.pb import node_pb2 as npb  # noqa: E402
from common.pb import node_pb2_grpc as npb_grpc  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class Agent:
    def __init__(self, config_yaml: str = "") -> None:
        self.base = tempfile.mkdtemp(prefix="rk", dir="/tmp")
        self.run_dir = os.path.join(self.base, "run")
        self.state_dir = os.path.join(self.base, "state")
        api_port, metrics_port, chas_port = free_ports(3)
        self.chas = f"127.0.0.1:{chas_port}"
        self.api = f"127.0.0.1:{api_port}"
        self.metrics = f"127.0.0.1:{metrics_port}"
        self.config = os.path.join(self.base, "riklet.yaml")
        with open(self.config, "w", encoding="utf-8") as fh:
            fh.write(config_yaml)
        self.env = {**os.environ, "RIKLET_RUN_DIR": self.run_dir, "RIKLET_STATE_DIR": self.state_dir,
                    "RIKLET_CONFIG": self.config, "RIKLET_API_ADDRESS": self.api,
                    "RIKLET_METRICS_ADDRESS": self.metrics, "RIKLET_ENDPOINT": self.api,
                    "LOG_LEVEL": "DEBUG",
                    # Test workloads run this venv's interpreter, which lives under /root here:
                    # out of reach of the unprivileged default user (tests of that default
                    # drop this variable).
                    "RIKLET_WORKLOAD_USER": "0"}
        self.env["NODE_PORT"] = str(chas_port)
        self.proc: subprocess.Popen[bytes] | None = None
        self.token_path = os.path.join(self.state_dir, "api-token")
        self.channel = grpc.intercept_channel(grpc.insecure_channel(self.api), *auth.grpc_client_interceptors(
            lambda: auth.read_token(self.token_path)))
        self.stub = npb_grpc.NodeStub(self.channel)
        self.workload_pids: set[int] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Agent:
        out = open(os.path.join(self.base, "supervisord.out"), "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([os.path.join(BIN, "riklet"), "run"], env=self.env,
                                     stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.wait_ready()
        except BaseException:
            # A half-started agent must not outlive the test that could not use it.
            self.dump_logs()
            self.stop()
            self.kill_leftovers()
            raise
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_for(lambda: self.stub.List(npb.ListRequest(), timeout=1) is not None, timeout,
                 what=f"the Node API on {self.api}")
        wait_for(lambda: all(s == "RUNNING" for s in self.statuses().values()), timeout,
                 what="all four services RUNNING")

    def supervisorctl(self, *args: str) -> str:
        res = subprocess.run(
            [os.path.join(BIN, "supervisorctl"), "-c", os.path.join(ROOT, "supervisord.conf"),
             "-s", f"unix://{self.run_dir}/supervisor.sock", *args],
            env=self.env, capture_output=True, text=True, timeout=60)
        return res.stdout

    def statuses(self) -> dict[str, str]:
        out = {}
        for line in self.supervisorctl("status").splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0].startswith("riklet:"):
                out[parts[0].split(":", 1)[1]] = parts[1]
        if set(out) != {"memory", "manager", "monitor", "proxy"}:
            return {"missing": "yes"}
        return out

    def service_pid(self, name: str) -> int:
        return int(self.supervisorctl("pid", f"riklet:{name}").strip())

    def supervisord_pid(self) -> int:
        with open(os.path.join(self.run_dir, "supervisord.pid"), encoding="ascii") as fh:
            return int(fh.read().strip())

    def proxy_workers(self) -> dict[int, int]:
        """Live proxy workers of this agent, pid -> parent pid: children of the proxy keeper
        (supervisord's program ``proxy``) or, orphaned, of supervisord (the agent's subreaper)."""
        parents = {self.supervisord_pid()}
        with contextlib.suppress(ValueError):
            parents.add(self.service_pid("proxy"))
        found = {}
        for pid, stat in live_processes():
            if int(stat[1]) not in parents:
                continue
            with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
                if b"services.proxy" in argv and b"--worker" in argv:
                    found[pid] = int(stat[1])
        return found

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            for pod in self.pods():
                self.stub.Delete(npb.DeleteRequest(name=pod["name"]), timeout=5)
            wait_for(lambda: not self.pods(), 30, what="all pods deleted")
        self.stop()
        self.kill_leftovers()
        self.delete_kernel_table()
        self.channel.close()
        shutil.rmtree(self.base, ignore_errors=True)

    @property
    def kernel_table(self) -> str:
        """The nftables table (family ip) this agent's proxy programs in kernel mode."""
        return "riklet_" + hashlib.sha256(os.path.abspath(self.state_dir).encode()).hexdigest()[:8]

    def delete_kernel_table(self) -> None:
        """A stopped agent keeps its table (its workloads keep running); a test's must go."""
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["nft", "delete", "table", "ip", self.kernel_table], capture_output=True,
                           timeout=10)

    def dump_logs(self, lines: int = 60) -> None:
        """Print the tail of every service log (on failure, for the test report)."""
        logdir = os.path.join(self.state_dir, "log")
        for name in sorted(os.listdir(logdir)) if os.path.isdir(logdir) else []:
            with open(os.path.join(logdir, name), encoding="utf-8", errors="replace") as fh:
                tail = fh.readlines()[-lines:]
            print(f"----- {name} -----\n{''.join(tail)}")

    def kill_leftovers(self) -> None:
        pods = os.path.join(self.state_dir, "pods")
        for status in _glob_status(pods):
            for key in ("shim_pid",):
                pid = status.get(key)
                if pid and pid_alive(int(pid)):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            for c in status.get("containers") or []:
                if c.get("pid") and pid_alive(int(c["pid"])):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(int(c["pid"]), signal.SIGKILL)
        for pid in self.workload_pids:
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    # -- driving -----------------------------------------------------------------------------

    def ctl(self, *args: str, check: bool = True, input: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([os.path.join(BIN, "rikletctl"), *args], env=self.env, input=input,
                             capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"rikletctl {' '.join(args)} failed ({res.returncode}): {res.stderr}")
        return res

    def pods(self) -> list[dict[str, Any]]:
        return json.loads(self.ctl("get", "pods", "-o", "json").stdout)

    def pod(self, name: str) -> dict[str, Any]:
        return json.loads(self.ctl("get", "pod", name, "-o", "json").stdout)

    def wait_phase(self, name: str, phase: str, timeout: float = 20.0) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            pod = self.pod(name)
            if pod["phase"] == phase:
                for c in pod["containers"]:
                    if c.get("pid"):
                        self.workload_pids.add(int(c["pid"]))
                return pod
            return None
        return wait_for(check, timeout, what=f"pod {name} {phase}")

    def chas_request(self, method: str, path: str, body: Any = None, token: bool | str = True,
                     headers: dict[str, str] | None = None, timeout: float = 30.0
                     ) -> tuple[int, dict[str, str], Any]:
        """One request to the CHaS HTTP API: (status, headers with lower-case names, the body
        parsed when it is JSON, else its bytes). ``token``: True sends the agent's token, a
        string sends that one, False none; ``body``: bytes as they are, anything else as JSON."""
        host, port = self.chas.rsplit(":", 1)
        sent = dict(headers or {})
        if isinstance(token, str):
            sent["Authorization"] = f"Bearer {token}"
        elif token:
            with open(os.path.join(self.state_dir, "api-token"), encoding="utf-8") as fh:
                sent["Authorization"] = f"Bearer {fh.read().strip()}"
        data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        try:
            conn.request(method, path, body=data, headers=sent)
            resp = conn.getresponse()
            raw = resp.read()
            got = {k.lower(): v for k, v in resp.getheaders()}
        finally:
            conn.close()
        if got.get("content-type", "").startswith("application/json") and raw:
            return resp.status, got, json.loads(raw)
        return resp.status, got, raw


@contextlib.contextmanager
def chas_agent(config_yaml: str = "") -> Iterator[Agent]:
    """A started agent whose CHaS API answers; its logs are printed if the block fails."""
    a = Agent(config_yaml).start()
    try:
        wait_for(lambda: a.chas_request("GET", "/health")[0] == 200, 30, what="the CHaS API")
        yield a
    except BaseException:
        a.dump_logs()
        raise
    finally:
        a.close()


def _glob_status(pods_dir: str) -> list[dict[str, Any]]:
    out = []
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(pods_dir):
            with contextlib.suppress(OSError, ValueError), \
                    open(os.path.join(pods_dir, name, "status.json"), encoding="utf-8") as fh:
                out.append(json.load(fh))
    return out


def live_processes() -> Iterator[tuple[int, list[str]]]:
    """Every live (not zombie) process: its pid and the fields of /proc/PID/stat after the
    command name (state, ppid, pgrp, session, ...)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                stat = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if stat and stat[0] not in ("Z", "X"):
            yield int(entry), stat


def session_processes(sid: int) -> list[int]:
    """Live processes of session ``sid``. An agent started by :class:`Agent` leads its own
    session, which its services and proxy workers share (orphaned or not); the pods' shims and
    workloads each have a session of their own, so they never show up here."""
    return sorted(pid for pid, stat in live_processes() if int(stat[3]) == sid)
