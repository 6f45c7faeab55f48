"""The process runtime: each pod's commands run under a per-pod shim that outlives the manager.

A pod's directory (``<state>/pods/<name>``) holds the shim's ``status.json``, its ``shim.log``
and ``logs/``. The shim is given its spec on its stdin, and with it this driver's facts (uid,
spec hash, endpoints), which it keeps in status.json's ``driver``: one file per pod, written by
its shim alone. A shim that was told to stop says so (state ``stopping``, then ``exited``).
Re-attaching after a manager restart is reading that file: the shim never depended on the
manager. Pods started by an earlier version kept the facts in ``driver.json``, still read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
from typing import Any

from common import cgroups
from common.errors import Conflict, RikletError, Unavailable
from common.jsonfile import read_json, write_json
from services.manager.probes import execprobe
from services.manager.process import shim, shimctl
from services.manager.process.execplan import ProcessExec
from services.manager.runtime import Observed, PodLayout, PodRecord, spec_hash
from services.manager.volumes import layout as volume_layout

log = logging.getLogger(__name__)


_Signature = tuple[int, int, int] | None
_LEGACY_DRIVER = "driver.json"   # where an earlier version kept the driver's facts
_STOPPED = ("stopping", "exited")   # a shim in these states was told to stop


def _signature(pdir: str) -> _Signature:
    """status.json's inode, mtime and size: it is replaced by rename on every write, so new
    content shows as a new inode, time or size. None when it is missing."""
    try:
        status = os.stat(os.path.join(pdir, shimctl.STATUS_FILE))
    except OSError:
        return None
    return status.st_ino, status.st_mtime_ns, status.st_size


def _driver(pdir: str, st: dict[str, Any]) -> dict[str, Any] | None:
    """The driver's facts: kept by the shim, or (a pod started by an earlier version) in
    driver.json."""
    driver = st.get("driver")
    if isinstance(driver, dict):
        return driver
    return read_json(os.path.join(pdir, _LEGACY_DRIVER)) if st else None


def _remove_pod_dir(pdir: str) -> None:
    """The pod's directory, gone: the files a pod's directory holds are removed by name, which
    costs a third of the system calls of a tree walk; anything else there falls back to one."""
    try:
        logs = os.path.join(pdir, "logs")
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(logs):
                os.unlink(os.path.join(logs, name))
            os.rmdir(logs)
        for name in (shimctl.STATUS_FILE, shimctl.SHIM_LOG):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(pdir, name))
        os.rmdir(pdir)
    except FileNotFoundError:
        pass
    except OSError:
        shutil.rmtree(pdir, ignore_errors=True)


def free_port(protocol: str) -> int:
    kind = socket.SOCK_DGRAM if protocol == "UDP" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ProcessRuntime(PodLayout):
    name = "process"
    quick_start = True

    def __init__(self, state_dir: str, grace_default: float, log_max_size: int, log_max_files: int,
                 backoff: dict[str, float], user: tuple[int, int] | None = None,
                 notify_socket: str | None = None) -> None:
        super().__init__(state_dir)
        self.layout = cgroups.detect()  # once: detecting costs ~20 stats, paid per cleanup before
        self.grace_default = grace_default
        self.log_max_size = log_max_size
        self.log_max_files = log_max_files
        self.backoff = backoff
        self.user = user
        self.notify_socket = notify_socket  # where each shim announces a new status of its pod
        self.shims = shim.ShimServer()   # forks each pod's shim: no program start per pod
        # Per pod, the files' signature and the live holder as of the last observe: what lets
        # the reconciler's safety-net resync skip a pod nothing happened to (see unchanged()).
        self._seen: dict[str, tuple[_Signature, tuple[int, int] | None]] = {}

    async def probe_exec(self, pod: PodRecord, container: str, argv: list[str],
                         timeout: float) -> tuple[int, bytes]:
        """An exec probe's command, run as ``rikletctl exec`` runs one in ``container``."""
        spec = next(c for c in pod["spec"]["containers"] if c["name"] == container)

        def start() -> ProcessExec:
            obs = self.observe(pod)
            pids = [int(c["pid"]) for c in (obs.containers if obs else ())
                    if c.get("name") == container and c.get("state") == "running" and c.get("pid")]
            if not pids:
                raise Conflict(f"container {container} is not running", "container")
            return ProcessExec(pids[0], spec, argv, False, False, (80, 24), self.layout)
        return await asyncio.to_thread(execprobe.run, start, execprobe.wait_popen, timeout)

    # -- observing ---------------------------------------------------------------------------

    def observe(self, pod: PodRecord) -> Observed | None:
        pdir = self.pod_dir(pod["name"])
        signature = _signature(pdir)  # before reading: a write after it shows as a change later
        st = shim.read_status(pdir) or {}
        driver = _driver(pdir, st)
        if driver is None or driver.get("uid") != pod["uid"] or driver.get("runtime", "process") != "process":
            return None
        holder = (int(st.get("shim_pid", 0)), int(st.get("shim_start", 0)))
        alive = bool(st) and shim.pid_alive(*holder)
        containers = list(st.get("containers") or [])
        finished = st.get("state") == "exited"
        lost = bool(st) and not alive and not finished
        pids = [int(c["pid"]) for c in containers if c.get("state") == "running" and c.get("pid")]
        started = [c.get("startedAt") for c in containers if c.get("startedAt")]
        endpoints = list(driver.get("endpoints") or [])
        self._seen[pod["name"]] = (signature, holder if alive else None)
        return Observed(
            alive=alive, spec_hash=str(driver.get("spec_hash")),
            stopped=st.get("state") in _STOPPED or bool(driver.get("stopped")),
            lost=lost, containers=containers, endpoints=endpoints,
            cgroup=self.cgroup_parent(pod["name"]), pids=pids,
            started_at=min(started) if started else None,
            blocked=self.blocked_ports.message(endpoints), holder=holder if alive else None)

    def unchanged(self, name: str) -> bool:
        """Whether nothing can have happened to the pod since it was last observed: its files
        carry the same signature (the shim rewrites status.json on every change) and its shim
        still lives. One stat and one read of /proc/PID/stat, instead of the JSON read of an
        observe; False whenever in doubt."""
        signature, holder = self._seen.get(name, (None, None))
        if signature is None or holder is None:
            return False
        return _signature(self.pod_dir(name)) == signature and shim.pid_alive(*holder)

    # -- acting ------------------------------------------------------------------------------

    def start(self, pod: PodRecord) -> Observed:
        name, spec = pod["name"], pod["spec"]
        pdir = self.pod_dir(name)
        os.makedirs(os.path.join(pdir, "logs"), mode=0o700, exist_ok=True)
        self._kill_leftovers(name)
        endpoints, env_ports = self._endpoints(spec)
        for stale in (shimctl.STATUS_FILE, _LEGACY_DRIVER):   # an earlier run's, or another runtime's
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(pdir, stale))
        # returns once every container has started (or failed to) once, and status.json says so
        shim.spawn(pdir, self.layout, self._shim_spec(pod, env_ports),
                   driver={"uid": pod["uid"], "spec_hash": spec_hash(spec), "endpoints": endpoints},
                   server=self.shims)
        obs = self.observe(pod)
        if obs is None:
            raise Unavailable(f"the shim of pod {name} did not report", "pod")
        return obs

    def stop(self, pod: PodRecord) -> None:
        """SIGTERM to the shim, which records the stop in status.json itself. A dead shim's
        leftovers are killed here, and its status finished for it: the pod reads as stopped."""
        pdir = self.pod_dir(pod["name"])
        _, holder = self._seen.get(pod["name"], (None, None))
        if holder is not None and shim.pid_alive(*holder):   # as observed: nothing to read
            with contextlib.suppress(ProcessLookupError):
                os.kill(holder[0], signal.SIGTERM)
            return
        st = shim.read_status(pdir) or {}
        pid, start = int(st.get("shim_pid", 0)), int(st.get("shim_start", 0))
        if shim.pid_alive(pid, start):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        elif st:
            # No shim to enforce the grace period: whatever it left behind is killed now.
            self._kill_leftovers(pod["name"])
            if st.get("state") != "exited":
                write_json(os.path.join(pdir, shimctl.STATUS_FILE), {**st, "state": "exited"})

    def cleanup(self, pod: PodRecord) -> None:
        """Nothing of the pod stays: its processes, its cgroups (the shim removes them when it
        ends; one that died cannot) and its directory, logs included."""
        pdir = self.pod_dir(pod["name"])
        st = shim.read_status(pdir) or {}
        group = cgroups.Cgroup(self.cgroup_parent(pod["name"]), self.layout)
        # A shim that said "exited" had killed every process of the pod first, and removed
        # its groups unless it says one was left (a shim of an earlier version, which kept no
        # "driver" there, did not say: its groups are looked for).
        finished = st.get("state") == "exited" and not st.get("cgroups_left")
        if not finished or ("driver" not in st and group.exists()):
            # Its shim did not finish its work (killed, lost, a group still busy): what it would
            # have removed, is removed here.
            self._kill_leftovers(pod["name"])
            with contextlib.suppress(RikletError, OSError):  # best effort: the agent prunes at stop
                group.remove()   # waits a moment for killed processes to be reaped
            with contextlib.suppress(RikletError):
                cgroups.prune(group.relpath)
        _remove_pod_dir(pdir)
        self._seen.pop(pod["name"], None)

    # -- details -----------------------------------------------------------------------------

    def _kill_leftovers(self, name: str) -> None:
        """Processes of a pod whose shim died are orphans nobody reaps logs from: kill them."""
        st = shim.read_status(self.pod_dir(name)) or {}
        for c in st.get("containers") or []:
            if c.get("state") == "running" and c.get("pid") and shim.pid_alive(
                    int(c["pid"]), int(c.get("pid_start") or 0)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(int(c["pid"]), signal.SIGKILL)
        group = cgroups.Cgroup(self.cgroup_parent(name), self.layout)
        with contextlib.suppress(Exception):
            if group.exists():
                group.kill_all(signal.SIGKILL)

    def _endpoints(self, spec: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, dict[str, str]]]:
        """Where each port's traffic goes. Target port 0 asks for a free port, given to the
        container as ``PORT`` (first such port) and ``PORT_<N>``."""
        endpoints: list[dict[str, Any]] = []
        env: dict[str, dict[str, str]] = {}
        for i, p in enumerate(spec.get("ports") or []):
            target = p["target_port"] or free_port(p["protocol"])
            if not p["target_port"]:
                cenv = env.setdefault(p["container"], {})
                cenv.setdefault("PORT", str(target))
                cenv[f"PORT_{i}"] = str(target)
            # The workload binds a host port equal to its target itself: nothing to proxy.
            host = p["port"] if p["port"] and p["port"] != target else 0
            endpoints.append({"host_port": host, "protocol": p["protocol"],
                              "address": "127.0.0.1", "port": target})
        return endpoints, env

    def _shim_spec(self, pod: PodRecord, env_ports: dict[str, dict[str, str]]) -> dict[str, Any]:
        spec = pod["spec"]
        pdir = self.pod_dir(pod["name"])
        vols = volume_layout.prepare(spec, pdir, self.state_dir, host_targets=True)
        return {
            "pod": pod["name"], "uid": pod["uid"],
            "grace_period": float(spec.get("gracePeriod", self.grace_default)),
            "cgroup_parent": self.cgroup_parent(pod["name"]),
            "log": {"dir": os.path.join(pdir, "logs"), "max_size": self.log_max_size,
                    "max_files": self.log_max_files},
            "backoff": self.backoff,
            "notify": self.notify_socket,
            "tmpfs": [[d, size or 0] for d, size in vols.tmpfs],
            "containers": [{
                "name": c["name"], "command": list(c["command"]) + list(c.get("args") or []),
                "env": {**c.get("env", {}), **env_ports.get(c["name"], {})},
                "working_dir": c.get("workingDir"),
                "cpu_millis": c["resources"].get("cpu_millis"),
                "memory_bytes": c["resources"].get("memory_bytes"),
                "restart_policy": spec.get("restartPolicy", "Always"),
                "user": list(self.user) if self.user is not None else None,
                "mounts": [[m.source, m.target, m.read_only] for m in vols.mounts.get(c["name"], ())],
            } for c in spec["containers"]],
        }

