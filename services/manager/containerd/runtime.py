"""The containerd runtime: a pod's containers are containerd containers in the agent's
namespace, sharing one network namespace set up through CNI.

containerd's shim holds each running task, so tasks outlive the manager; the manager holds
what containerd does not: the restart policy and its back-off, why a run ended (OOM kills from
the container's cgroup), and the pod's network. Those live in the pod's directory
(``<state>/pods/<name>``): ``driver.json`` (uid, spec hash, network, whether the agent stopped
it) and ``containers.json`` (per container: restarts, last termination, next restart). A
restarted manager reads them and finds the tasks where it left them.

Logs: each task's stdout and stderr go to ``riklet``'s log driver (``logdriver.py``), run by
containerd's shim, into the same rotated files as process pods.

Containers that carry this agent's label but belong to no pod in memory are reported in the
log and by :meth:`ContainerdRuntime.orphans`, never killed: an operator decides (policy).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from typing import Any

from common import cgroups
from common.errors import (
    AlreadyExists,
    Internal,
    InvalidArgument,
    NotFound,
    RikletError,
    Unavailable,
)
from common.imageref import normalize_ref
from common.jsonfile import read_json, write_json
from services.manager.containerd import logdriver, ocispec
from services.manager.containerd.client import (
    LABEL_AGENT,
    LABEL_CONTAINER,
    LABEL_POD,
    LABEL_UID,
    Containerd,
    TaskState,
)
from services.manager.containerd.execproc import ContainerdExec
from services.manager.containerd.exits import StartFailure, classify, should_restart
from services.manager.containerd.images import Images
from services.manager.podevents import NullRecorder, Records
from services.manager.probes import execprobe
from services.manager.runtime import Observed, PodLayout, PodRecord, spec_hash
from services.manager.volumes import tmpfs
from services.manager.volumes.layout import container_mounts

log = logging.getLogger(__name__)

START_SETTLE = 2.0
RECHECK = 0.5  # containerd tells of no exit or restart due: its pods are observed this often
Progress = Callable[[PodRecord, str], None]


class ContainerdRuntime(PodLayout, Images):
    name = "containerd"
    quick_start = False   # an image may have to be pulled first: Creating says so

    def __init__(self, state_dir: str, client: Containerd, networks: Any, *, grace_default: float,
                 log_max_size: int, log_max_files: int, backoff: dict[str, float],
                 insecure_registries: tuple[str, ...] = (), user: tuple[int, int] = (0, 0)) -> None:
        PodLayout.__init__(self, state_dir)
        Images.__init__(self, client, insecure_registries)
        self.networks = networks          # services.manager.containerd.cni.PodNetworks
        self.grace_default = grace_default
        self.log_max_size = log_max_size
        self.log_max_files = log_max_files
        self.backoff = backoff
        self.user = user
        self.on_progress: Progress | None = None
        self.recorder: Records = NullRecorder()   # pod events: Pulling, Pulled
        self.logger = logdriver.install(state_dir)

    # -- names -------------------------------------------------------------------------------


    def container_id(self, pod: str, container: str) -> str:
        cid = f"{self.agent_id}-{pod}_{container}"
        if len(cid) > 76:
            cid = f"{self.agent_id}-" + hashlib.sha256(f"{pod}/{container}".encode()).hexdigest()[:32]
        return cid

    # -- observing ---------------------------------------------------------------------------

    def _driver(self, pod: PodRecord) -> dict[str, Any] | None:
        driver = read_json(os.path.join(self.pod_dir(pod["name"]), "driver.json"))
        if driver is None or driver.get("uid") != pod["uid"] or driver.get("runtime") != self.name:
            return None
        return driver

    def observe(self, pod: PodRecord) -> Observed | None:
        driver = self._driver(pod)
        if driver is None:
            return None
        pdir = self.pod_dir(pod["name"])
        states = read_json(os.path.join(pdir, "containers.json")) or {}
        spec = pod["spec"]
        stopped = bool(driver.get("stopped"))
        changed = False
        containers: list[dict[str, Any]] = []
        for c in spec["containers"]:
            rec = states.setdefault(c["name"], {"restartCount": 0})
            changed |= self._observe_one(pod, c, rec, stopped, driver)
            containers.append(self._status_of(c["name"], rec))
        if changed:
            write_json(os.path.join(pdir, "containers.json"), states)
        running = [c for c in containers if c["state"] == "running"]
        pending = [c for c in containers if c["state"] == "waiting" and c.get("nextRestartAt")]
        started = [c["startedAt"] for c in running if c.get("startedAt")]
        endpoints = list(driver.get("endpoints") or [])
        return Observed(
            alive=bool(running) or (bool(pending) and not stopped), spec_hash=str(driver.get("spec_hash")),
            stopped=stopped, lost=False, containers=containers,
            endpoints=endpoints, cgroup=self.cgroup_parent(pod["name"]),
            pids=[int(c["pid"]) for c in running if c.get("pid")],
            internal_ip=str(driver.get("ip") or "127.0.0.1"),
            started_at=min(started) if started else None,
            blocked=self.blocked_ports.message(endpoints), recheck_after=RECHECK)

    def _observe_one(self, pod: PodRecord, c: dict[str, Any], rec: dict[str, Any], stopped: bool,
                     driver: dict[str, Any]) -> bool:
        """Bring one container's record up to date with its task; restart it when its policy
        and back-off say so. Returns whether the record changed."""
        cid = self.container_id(pod["name"], c["name"])
        task = self.client.task(cid)
        if task is not None and task.status in ("running", "created", "paused", "pausing"):
            changed = rec.get("state") != "running" or rec.get("pid") != task.pid
            rec.update(state="running", pid=task.pid)
            return changed
        if task is not None and task.status == "stopped":
            self._record_exit(pod, c, rec, task, stopped)
            self.client.delete_task(cid)
            return True
        if rec.get("state") == "running":
            # the task is gone without our seeing it stop (containerd lost its state)
            rec.update(state="waiting" if not stopped else "terminated", pid=None,
                       last={"exitCode": None, "signal": None, "reason": "TaskLost",
                             "message": "containerd no longer knows this container's task",
                             "finishedAt": time.time()})
            if not stopped:
                self._schedule_restart(rec, ran_for=0.0)
            return True
        due = rec.get("nextRestartAt")
        if due and not stopped and time.time() >= due:
            self._run(pod, c, rec, driver)
            return True
        if due and stopped:
            rec.update(nextRestartAt=None, state="terminated")
            return True
        return False

    def _record_exit(self, pod: PodRecord, c: dict[str, Any], rec: dict[str, Any], task: TaskState,
                     stopped: bool) -> None:
        oom = False
        with contextlib.suppress(Exception):
            group = cgroups.Cgroup(f"{self.cgroup_parent(pod['name'])}/{c['name']}")
            oom = group.exists() and group.usage().oom_kills > 0
        end = classify(task.exit_status, oom)
        finished = task.exited_at or time.time()
        rec.update(state="terminated", pid=None, last={**end, "finishedAt": finished})
        log.info("container exited", extra={"pod": pod["name"], "container": c["name"],
                                            "exit_code": end["exitCode"], "reason": end["reason"]})
        if not stopped and should_restart(pod["spec"].get("restartPolicy", "Always"), end):
            self._schedule_restart(rec, ran_for=finished - float(rec.get("startedAt") or finished))

    def _schedule_restart(self, rec: dict[str, Any], ran_for: float) -> None:
        previous = rec.get("delay")
        if previous is None or ran_for >= self.backoff["reset"]:
            delay = self.backoff["initial"]
        else:
            delay = min(float(previous) * 2, self.backoff["max"])
        rec.update(state="waiting", delay=delay,
                   nextRestartAt=float((rec.get("last") or {}).get("finishedAt") or time.time()) + delay)

    @staticmethod
    def _status_of(name: str, rec: dict[str, Any]) -> dict[str, Any]:
        last = rec.get("last") or {}
        running = rec.get("state") == "running"
        return {
            "name": name, "state": rec.get("state") or "waiting", "pid": rec.get("pid") if running else None,
            "restartCount": int(rec.get("restartCount") or 0),
            "exitCode": None if running else last.get("exitCode"),
            "signal": None if running else last.get("signal"),
            "reason": None if running else last.get("reason"),
            "message": None if running else last.get("message"),
            "startedAt": rec.get("startedAt"), "finishedAt": None if running else last.get("finishedAt"),
            "nextRestartAt": rec.get("nextRestartAt") if rec.get("state") == "waiting" else None,
        }

    # -- acting ------------------------------------------------------------------------------

    def start(self, pod: PodRecord) -> Observed:
        name, spec = pod["name"], pod["spec"]
        self.client.version()  # containerd down: fail before touching anything
        pdir = self.pod_dir(name)
        os.makedirs(os.path.join(pdir, "logs"), mode=0o700, exist_ok=True)
        self._remove_containers(name)
        host_network = bool(spec.get("hostNetwork"))
        ip, netns = "127.0.0.1", None
        if not host_network:
            reason = self.networks.available()
            if reason:
                raise Unavailable(f"pod networking is not available: {reason}", "network")
            net = self.networks.setup(name)
            ip, netns = net.ip, net.netns
        etc = self._etc_files(pdir, name, ip, host_network)
        driver = {"runtime": self.name, "uid": pod["uid"], "spec_hash": spec_hash(spec), "stopped": False,
                  "ip": ip, "netns": netns, "hostNetwork": host_network, "etc": etc,
                  "endpoints": self._endpoints(spec, ip, host_network)}
        if spec.get("volumes"):   # kept only when the pod has some
            driver["mounts"] = container_mounts(spec, pdir, self.state_dir)
        write_json(os.path.join(pdir, "driver.json"), driver)
        states: dict[str, Any] = {}
        for c in spec["containers"]:
            rec = states[c["name"]] = {"restartCount": 0}
            self._run(pod, c, rec, driver, first=True)
        write_json(os.path.join(pdir, "containers.json"), states)
        obs = self.observe(pod)
        if obs is None:
            raise Internal(f"pod {name} vanished while starting", "pod")
        return obs

    def _run(self, pod: PodRecord, c: dict[str, Any], rec: dict[str, Any], driver: dict[str, Any],
             first: bool = False) -> None:
        """Create (if needed) and start one container's task; a failure that a retry may cure
        (image not pullable, bad image config) waits for the back-off like a crash."""
        cid = self.container_id(pod["name"], c["name"])
        try:
            image = normalize_ref(c["image"])
            self._ensure_image(pod, c["name"], image)
            self._create_container(pod, c, cid, image, driver)
            self.client.delete_task(cid)  # a stopped task left by an interrupted restart
            pid = self.client.create_task(cid, logdriver.uri(
                self.logger, self.log_path(pod["name"], c["name"]), self.log_max_size, self.log_max_files))
            self.client.start_task(cid)
        except Unavailable:
            raise
        except RikletError as exc:
            reason = getattr(exc, "reason", None) or "StartError"
            rec.update(state="terminated", pid=None, last={
                "exitCode": None, "signal": None, "reason": reason, "message": exc.message,
                "finishedAt": time.time()})
            log.warning("container did not start", extra={"pod": pod["name"], "container": c["name"],
                                                          "reason": reason, "error": exc.message})
            self._schedule_restart(rec, ran_for=0.0)
            if not first:
                rec["restartCount"] = int(rec.get("restartCount") or 0) + 1
            return
        if not first:
            rec["restartCount"] = int(rec.get("restartCount") or 0) + 1
        rec.update(state="running", pid=pid, startedAt=time.time(), nextRestartAt=None)

    def _ensure_image(self, pod: PodRecord, container: str, image: str) -> None:
        """The image on the node, pulled first if needed, with Pulling and Pulled events."""
        if self.client.has_image(image):
            return
        said = {"uid": pod["uid"], "container": container}
        self.recorder.record(pod["name"], "Pulling", f"pulling image {image}", **said)
        began = time.monotonic()
        self.ensure_image(image, lambda msg: self._progress(pod, msg))
        self.recorder.record(pod["name"], "Pulled",
                             f"pulled image {image} in {time.monotonic() - began:.1f}s", **said)

    def _progress(self, pod: PodRecord, message: str) -> None:
        if self.on_progress is not None:
            with contextlib.suppress(Exception):
                self.on_progress(pod, message)

    def _create_container(self, pod: PodRecord, c: dict[str, Any], cid: str, image: str,
                          driver: dict[str, Any]) -> None:
        config, chain = self.client.image_config(image)
        try:
            argv = ocispec.argv_of(config, c.get("command") or [], c.get("args") or [])
        except InvalidArgument as exc:
            raise StartFailure("InvalidImageConfig", exc.message) from None
        spec = ocispec.build(
            argv=argv, env=ocispec.env_of(config, c.get("env") or {}),
            cwd=c.get("workingDir") or (config.get("config") or {}).get("WorkingDir") or "/",
            hostname=pod["name"], netns=driver.get("netns"),
            cgroups_path=f"/{self.cgroup_parent(pod['name'])}/{c['name']}",
            memory_bytes=c["resources"].get("memory_bytes"), cpu_millis=c["resources"].get("cpu_millis"),
            etc_files=driver.get("etc") or {}, user=ocispec.user_of(config, self.user),
            volumes=[tuple(m) for m in (driver.get("mounts") or {}).get(c["name"], [])])
        labels = {LABEL_AGENT: self.agent_id, LABEL_POD: pod["name"], LABEL_UID: pod["uid"],
                  LABEL_CONTAINER: c["name"]}
        with self.client.lease() as lease:
            try:
                self.client.prepare_snapshot(cid, chain, lease)
            except AlreadyExists:
                pass  # kept from an earlier run of this container: its filesystem survives restarts
            except NotFound as exc:
                raise StartFailure("ImageNotUnpacked", f"image {image} has no unpacked rootfs: {exc.message}"
                               ) from None
            with contextlib.suppress(AlreadyExists):
                self.client.create_container(cid, image, spec, labels, lease)

    async def probe_exec(self, pod: PodRecord, container: str, argv: list[str],
                         timeout: float) -> tuple[int, bytes]:
        """An exec probe's command, through containerd's exec as ``rikletctl exec`` runs one."""
        cid = self.container_id(pod["name"], container)
        fifo_root = os.path.join(os.path.dirname(self.root), "exec")

        def start() -> ContainerdExec:
            return ContainerdExec(self.client, cid, argv, False, False, (80, 24), fifo_root)
        return await asyncio.to_thread(execprobe.run, start, execprobe.wait_containerd, timeout)

    def stop(self, pod: PodRecord) -> None:
        pdir = self.pod_dir(pod["name"])
        driver = self._driver(pod)
        if driver is None:
            return
        now = time.time()
        first = not driver.get("stopped")
        if first:
            driver.update(stopped=True, stop_at=now)
            write_json(os.path.join(pdir, "driver.json"), driver)
        grace = float(pod["spec"].get("gracePeriod", self.grace_default))
        late = now >= float(driver.get("stop_at") or now) + grace
        for c in pod["spec"]["containers"]:
            cid = self.container_id(pod["name"], c["name"])
            task = self.client.task(cid)
            if task is None or task.status == "stopped":
                continue
            if first:
                self.client.kill(cid, signal.SIGTERM)
            elif late:
                # PID 1 of a container ignores SIGTERM unless it handles it: the grace period
                # is over, kill everything in the container
                self.client.kill(cid, signal.SIGKILL, all_processes=True)

    def cleanup(self, pod: PodRecord) -> None:
        started = os.path.exists(os.path.join(self.pod_dir(pod["name"]), "driver.json"))
        try:
            self._remove_containers(pod["name"])
        except Unavailable:
            if started:
                raise  # its containers may run: removal waits for containerd to come back
            # it never got as far as containerd (which is down): nothing there to remove
        # runc removes each container's group; the pod's group above them is ours to remove,
        # in every hierarchy runc made it in (devices, blkio... as well as riklet's own)
        with contextlib.suppress(Exception):
            cgroups.Cgroup(self.cgroup_parent(pod["name"])).remove()
        with contextlib.suppress(Exception):
            cgroups.prune(self.cgroup_parent(pod["name"]))
        if self.networks is not None:
            self.networks.teardown(pod["name"])
        tmpfs.unmount_under(self.pod_dir(pod["name"]))   # Memory emptyDirs: not into the tree
        shutil.rmtree(self.pod_dir(pod["name"]), ignore_errors=True)

    def _remove_containers(self, pod: str) -> None:
        """Remove every container of this agent's pod: kill, delete task, snapshot, container."""
        for cid, _labels in self.client.containers({LABEL_AGENT: self.agent_id, LABEL_POD: pod}):
            self._remove_container(cid)

    def _remove_container(self, cid: str) -> None:
        task = self.client.task(cid)
        if task is not None and task.status != "stopped":
            self.client.kill(cid, signal.SIGKILL, all_processes=True)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                task = self.client.task(cid)
                if task is None or task.status == "stopped":
                    break
                time.sleep(0.01)
        self.client.delete_task(cid)
        self.client.remove_snapshot(cid)
        self.client.delete_container(cid)

    # -- re-attaching ------------------------------------------------------------------------

    def orphans(self, known: set[str]) -> list[dict[str, str]]:
        """This agent's containers whose pod memory does not know: reported, left running."""
        out = []
        for cid, labels in self.client.containers({LABEL_AGENT: self.agent_id}):
            if labels.get(LABEL_POD) not in known:
                task = self.client.task(cid)
                out.append({"id": cid, "pod": labels.get(LABEL_POD, ""),
                            "container": labels.get(LABEL_CONTAINER, ""),
                            "state": task.status if task else "no task"})
        return out

    # -- details -----------------------------------------------------------------------------

    def _endpoints(self, spec: dict[str, Any], ip: str, host_network: bool) -> list[dict[str, Any]]:
        out = []
        for p in spec.get("ports") or []:
            target = p["target_port"] or p["port"]
            host = p["port"] if p["port"] and not (host_network and p["port"] == target) else 0
            out.append({"host_port": host, "protocol": p["protocol"], "address": ip, "port": target})
        return out

    def _etc_files(self, pdir: str, name: str, ip: str, host_network: bool) -> dict[str, str]:
        etc = os.path.join(pdir, "etc")
        os.makedirs(etc, mode=0o755, exist_ok=True)
        files = {"/etc/hostname": os.path.join(etc, "hostname"), "/etc/hosts": os.path.join(etc, "hosts")}
        with open(files["/etc/hostname"], "w", encoding="utf-8") as fh:
            fh.write(f"{name}\n")
        with open(files["/etc/hosts"], "w", encoding="utf-8") as fh:
            fh.write("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
            if not host_network:
                fh.write(f"{ip}\t{name}\n")
        if os.path.exists("/etc/resolv.conf"):
            files["/etc/resolv.conf"] = os.path.join(etc, "resolv.conf")
            shutil.copyfile("/etc/resolv.conf", files["/etc/resolv.conf"])
        return files
