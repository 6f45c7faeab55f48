"""riklet as the proxy benchmark runs it: a real agent (supervisord, the four services, the
proxy's keeper and worker) with one process pod whose TCP and UDP host ports point at the
benchmark's backends, in the proxy mode asked for (``proxy.mode`` in the agent's YAML).

The pod's own process only holds the pod up (``sleep``): the endpoints (127.0.0.1:target) are
the shared nginx backend and UDP echo server every proxy in the benchmark forwards to.

Kernel mode is reported unavailable, with the reason, rather than measured as something else:
when the configuration does not accept ``proxy.mode``, when the agent does not start, or when
no nftables table named ``riklet*`` appears once the routes are live (the proxy forwards in
userspace then).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess

from bench.proxy_restart import current_worker
from tests.stack import BIN, Agent
from tests.support import free_ports, wait_for


def config_error(yaml_text: str) -> str | None:
    """Why riklet's configuration refuses ``yaml_text`` (its own message), or None."""
    path = os.path.join("/tmp", f"bench-proxy-config-{os.getpid()}.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(yaml_text)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RIKLET_")}
        done = subprocess.run([os.path.join(BIN, "riklet"), "config", "show"], capture_output=True,
                              text=True, env=env | {"RIKLET_CONFIG": path}, timeout=30)
    finally:
        os.unlink(path)
    if done.returncode == 0 and "configuration error" not in done.stdout + done.stderr:
        return None
    lines = (done.stderr or done.stdout).strip().splitlines()
    return lines[-1].replace(path, "the agent's YAML") if lines else f"exit {done.returncode}"


def nft_tables() -> list[str]:
    """Names of the nftables tables in this network namespace."""
    done = subprocess.run(["nft", "-j", "list", "tables"], capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        return []
    items = json.loads(done.stdout).get("nftables", [])
    return [str(i["table"]["name"]) for i in items if "table" in i]


def http_ok(port: int) -> bool:
    """One request on a new connection through ``port`` answered 200 by the nginx backend."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"GET /1k HTTP/1.0\r\n\r\n")
            return s.recv(12).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


class RikletAgent:
    """One agent in ``mode`` ("kernel" or "userspace"); ``unavailable`` says why it could not be
    measured (then nothing is left running)."""

    def __init__(self, mode: str, tcp_target: int, udp_target: int) -> None:
        self.mode, self.name = mode, f"riklet-{mode}"
        self.tcp_target, self.udp_target = tcp_target, udp_target
        self.tcp_port, self.udp_port = free_ports(1)[0], free_ports(1, socket.SOCK_DGRAM)[0]
        self.agent: Agent | None = None
        self.unavailable: str | None = None

    def start(self) -> RikletAgent:
        yaml_text = f"proxy:\n  mode: {self.mode}\n"
        refused = config_error(yaml_text)
        if refused and self.mode == "kernel":
            self.unavailable = f"the configuration refuses proxy.mode: {refused}"
            return self
        if refused:     # a riklet from before the setting: userspace is all it has
            yaml_text = ""
        try:
            self._start_agent(yaml_text)
            if self.mode == "kernel":
                self._check_kernel()
        except (AssertionError, OSError, subprocess.SubprocessError) as exc:
            self.unavailable = self.unavailable or f"{type(exc).__name__}: {exc}"
        if self.unavailable:
            self.close()
        return self

    def _start_agent(self, yaml_text: str) -> None:
        self.agent = Agent(yaml_text)
        self.agent.env["LOG_LEVEL"] = "INFO"    # no debug lines in the measured CPU
        self.agent.start()
        self.agent.ctl("run", "bench", "--port", f"{self.tcp_port}:{self.tcp_target}",
                       "--port", f"{self.udp_port}:{self.udp_target}/udp", "--", "sleep", "1000000")
        self.agent.wait_phase("bench", "Running")
        wait_for(lambda: http_ok(self.tcp_port), 15, f"{self.name}: the host port answering")

    def _check_kernel(self) -> None:
        assert self.agent is not None
        # this agent's own table where tests.stack knows its name, else any riklet* one
        own = getattr(self.agent, "kernel_table", None)
        def mine(table: str) -> bool:
            return table == own if own else table.startswith("riklet")
        try:
            wait_for(lambda: [t for t in nft_tables() if mine(t)], 5, "an nftables table riklet*")
        except AssertionError:
            self.unavailable = ("no nftables table riklet* once the routes were live: "
                                "the proxy forwards in userspace")

    def pin(self, cpu: int) -> None:
        """Pin every thread of the proxy's worker to ``cpu`` (a peer of taskset'd HAProxy/nginx)."""
        assert self.agent is not None
        worker = current_worker(self.agent)
        for tid in os.listdir(f"/proc/{worker}/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), {cpu})

    def proxy_pids(self) -> list[int]:
        """Every process of the proxy: the keeper and its worker."""
        assert self.agent is not None
        return [self.agent.service_pid("proxy"), current_worker(self.agent)]

    def kill_all(self) -> list[int]:
        """``kill -9`` of the keeper and its worker, back to back; returns their pids."""
        pids = self.proxy_pids()
        for pid in pids:    # the keeper first: it would start another worker at once for a dead one
            os.kill(pid, signal.SIGKILL)
        return pids

    def settled(self, old: list[int]) -> bool:
        """A new keeper and worker are up (after ``kill_all`` returned ``old``)."""
        assert self.agent is not None
        now = self.proxy_pids()
        return now[0] not in old and now[1] not in old and len(self.agent.proxy_workers()) == 1

    def close(self) -> None:
        if self.agent is not None:
            self.agent.close()
            self.agent = None

