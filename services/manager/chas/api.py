"""The CHaS HTTP API (seed 003, "Inbound API"): deploy, list, delete and read the logs of
containers, and the node's health. A thin adapter over the Node API's core
(:class:`services.manager.api.node.NodeService`): every write goes through ``apply_document`` or
``desire``, so the policy, the port checks and the apply lock are the same as for gRPC.

A CHaS container is a pod of one container, both named after the request's ``name``; its id is
the pod's uid (the name is accepted too wherever an id is). The routes, shapes and status codes
are documented in ``openapi.json`` beside this file, served at ``GET /openapi.json``.

Every other path needs ``Authorization: Bearer <token>``. Errors are always
``{"error": {"code", "message", "field"?}}``; nothing a client sends can stop the server.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import shutil
import ssl
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import psutil

from common import auth
from common.errors import Conflict as ConflictError
from common.errors import InvalidArgument, NotFound, RikletError, Unavailable
from common.model import Workload, host_ports
from common.pod import Phase, instance_id_of, phase_of, ready_of
from common.ports import ApplyView, bindable
from common.zmqutil import RequestClient
from services.manager.chas.conn import (
    HEADER_TIMEOUT,
    MAX_CONNECTIONS,
)
from services.manager.chas.deploy import (
    DEPLOY_KEYS,
    STATUSES,
    DeployRequest,
    body_field,
    container_status,
    container_summary,
    format_gb,
    parse_deploy,
    short,
)
from services.manager.chas.stats import ChasStats

if TYPE_CHECKING:
    from services.manager.api.node import NodeService
    from services.manager.chas.server import Edge

log = logging.getLogger("riklet.chas")

__all__ = ["DEPLOY_KEYS", "OPENAPI_PATH", "STATUSES", "ChasApi", "body_field", "container_status",
           "format_gb", "parse_deploy", "start_from_config"]


OPENAPI_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openapi.json")
DISK_LOW = 0.05                    # under this share of free disk the node is unhealthy

def _bindable(protocol: str, port: int) -> bool:
    try:
        return bindable(protocol, port)
    except OSError as exc:
        log.warning("host port probe failed", extra={"port": port, "error": str(exc)})
        return False


# -- the API --------------------------------------------------------------------------------------

class ChasApi:
    def __init__(self, service: NodeService, stats: ChasStats, *, host: str, port: int,
                 token: Callable[[], str], host_ports: tuple[int, int],
                 ssl_context: ssl.SSLContext | None, started_at: float, disk_path: str,
                 max_connections: int = MAX_CONNECTIONS, header_timeout: float = HEADER_TIMEOUT) -> None:
        self.service = service
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.stats = stats
        self.host = host
        self._requested_port = port
        self.token = token
        self.host_ports = host_ports
        self.ssl_context = ssl_context
        self.started_at = started_at
        self.disk_path = disk_path
        with open(OPENAPI_PATH, encoding="utf-8") as fh:
            self.openapi: dict[str, Any] = json.load(fh)
        self._server: Edge | None = None
        self._streams: set[threading.Event] = set()
        self._streams_lock = threading.Lock()
        self._probe: RequestClient | None = None
        self._probe_lock = threading.Lock()

    @property
    def port(self) -> int:
        if self._server is None:
            return self._requested_port
        return self._server.port

    def start(self) -> None:
        """Bind and serve on a daemon thread; Unavailable (field chas.port) if the port is taken.
        (aiohttp is imported here: about 10 MiB of PSS a node without the CHaS API does not pay.)"""
        from services.manager.chas.server import Edge

        self._server = Edge(self)
        self._server.start()
        log.info("CHaS API serving", extra={"address": f"{self.host}:{self.port}",
                                             "tls": self.ssl_context is not None})

    def stop(self) -> None:
        with self._streams_lock:
            for stop in self._streams:
                stop.set()
        if self._server is not None:
            self._server.stop()
        if self._probe is not None:
            self._probe.close()

    # -- operations (each raises RikletError; the handler turns it into a status) --------------

    def find(self, container_id: str) -> dict[str, Any]:
        """A pod by uid, else by name."""
        if not container_id or len(container_id) > 253:
            raise NotFound("no such container", "container_id")
        memory = self.service.memory
        for lookup in (memory.find, memory.get):  # by index, never the whole list
            with contextlib.suppress(NotFound, InvalidArgument):
                record: dict[str, Any] = lookup(container_id)
                return record
        raise NotFound(f"no container with id or name {short(container_id)}", "container_id")

    def deploy(self, request: DeployRequest) -> tuple[dict[str, Any], bool]:
        """Write the request's pod; (record, created). The identical request again for the same
        name answers the existing pod (created False)."""
        existing: list[bool] = []

        def prepare(workload: Workload, current: ApplyView) -> Workload:
            return self._prepare(request, workload, current, existing)

        try:
            applied = self.service.apply_document(request.document, prepare=prepare)
        except RikletError as exc:
            exc.field = body_field(exc.field)
            raise
        return applied[0][0], not existing

    def _prepare(self, request: DeployRequest, workload: Workload, current: ApplyView,
                 existing: list[bool]) -> Workload:
        """Under the apply lock: refuse names in use, answer a repeat, allocate host ports."""
        name = request.name
        same: dict[str, Any] | None = None
        for record in current:
            if record["name"] == name:
                same = record
            elif (record.get("spec") or {}).get("workload") == name:
                raise ConflictError(f"the name {name} is taken by workload {name} (pod {record['name']})",
                                    "name")
        if same is not None:
            marker = (same.get("spec") or {}).get("chas")
            digest = marker.get("request") if isinstance(marker, dict) else None
            if instance_id_of(same) or not digest:
                raise ConflictError(f"the name {name} is taken by a pod this API did not deploy", "name")
            if same.get("desired") == "deleted":
                raise ConflictError(f"container {name} is being deleted: deploy again once it is gone",
                                    "name")
            if digest != request.digest:
                raise ConflictError(f"container {name} exists with another deployment; containers are not "
                                    "updated in place: delete it first", "name")
            existing.append(True)
            return dataclasses.replace(workload, pods=((name, same["spec"]),))
        pods = []
        for pod_name, spec in workload.pods:
            spec = copy.deepcopy(spec)
            claimed = current.claimed(*self.host_ports) | host_ports(spec)
            for i, port in enumerate(spec.get("ports") or []):
                if not port.get("port"):
                    port["port"] = self._allocate(port["protocol"], claimed, i)
                    claimed.add((port["protocol"], port["port"]))
            spec["chas"] = {"request": request.digest}
            pods.append((pod_name, spec))
        return dataclasses.replace(workload, pods=tuple(pods))

    def _allocate(self, protocol: str, claimed: set[tuple[str, int]], index: int) -> int:
        """The lowest port of chas.host_ports (within policy.host_ports) that no pod claims and
        nothing on the node holds."""
        lo, hi = self.host_ports
        policy = getattr(self.service, "policy", None)
        allowed = getattr(policy, "host_ports", None)
        if allowed is not None:
            lo, hi = max(lo, int(allowed[0])), min(hi, int(allowed[1]))
        for port in range(lo, hi + 1):
            if (protocol, port) not in claimed and _bindable(protocol, port):
                return port
        raise ConflictError(f"no free {protocol.lower()} host port left in chas.host_ports "
                            f"{self.host_ports[0]}-{self.host_ports[1]}", f"exposed_ports[{index}].host")

    def delete(self, container_id: str) -> dict[str, Any]:
        record = self.find(container_id)
        if instance_id_of(record):
            raise ConflictError(f"container {record['name']} is instance {instance_id_of(record)} of the RIK "
                                "scheduler: delete it there", "container_id")
        updated = self.service.desire(record["name"], "deleted")
        return {"id": updated.get("uid", record.get("uid")), "name": updated["name"], "status": "terminating"}

    def list(self) -> dict[str, Any]:
        records = sorted(self.service.memory.list(), key=lambda r: r["name"])
        return {"containers": [container_summary(r) for r in records]}

    def pod_alive(self, name: str, uid: str) -> bool:
        mirror = getattr(self.service, "mirror", None)
        try:
            record = mirror.get(name) if mirror is not None else self.service.memory.get(name)
        except NotFound:
            return False
        except RikletError:
            return True  # cannot tell now: keep streaming
        return record is not None and record.get("uid") == uid

    def ready(self) -> dict[str, Any]:
        """``/readyz``: memory answers (the core reads and writes through it); one record asked
        for, whatever the node holds."""
        try:
            with self._probe_lock:
                if self._probe is None:
                    self._probe = RequestClient(self.service.memory.endpoint, timeout=1.0, retries=0)
                probe = self._probe
            probe.call("pod.list", limit=1)
        except RikletError as exc:
            return {"status": "not_ready", "problems": [f"memory: {exc}"]}
        return {"status": "ready", "problems": []}

    def health(self) -> dict[str, Any]:
        """Seed 003's health body; unhealthy when the monitor or memory does not answer or the
        disk under the state directory is less than 5 % free."""
        problems: list[str] = []
        try:
            realtime = self.service.monitor.call("node.realtime", timeout=1.0, retries=0)
            cpu = float(realtime["cpu"]["currentUsage"])
            memory = float(realtime["memory"]["currentUsage"])
        except (RikletError, KeyError, TypeError, ValueError) as exc:
            problems.append(f"monitor: {exc}")
            vm = psutil.virtual_memory()
            cpu = float(psutil.cpu_percent(None))
            memory = round(100.0 * (vm.total - vm.available) / vm.total, 2) if vm.total else 0.0
        try:
            with self._probe_lock:
                if self._probe is None:
                    self._probe = RequestClient(self.service.memory.endpoint, timeout=1.0, retries=0)
                probe = self._probe
            records = probe.call("pod.list")
            if not isinstance(records, list):
                raise Unavailable("memory answered pod.list with something else than a list", "memory")
        except RikletError as exc:
            problems.append(f"memory: {exc}")
            mirror = getattr(self.service, "mirror", None)
            records = list(mirror.pods().values()) if mirror is not None else []
        running = [r for r in records if isinstance(r, dict) and r.get("desired") == "running"
                   and phase_of(r) is Phase.RUNNING]
        not_ready = sum(1 for r in running if not ready_of(r))
        free = total = 0
        path = self.disk_path
        while not os.path.exists(path) and path != os.path.dirname(path):
            path = os.path.dirname(path)
        try:
            usage = shutil.disk_usage(path)
            free, total = int(usage.free), int(usage.total)
        except OSError as exc:
            problems.append(f"disk: {exc}")
        if total and free < DISK_LOW * total:
            problems.append(f"disk: {100.0 * free / total:.1f} % free under {path} (less than 5 %)")
        healthy = not problems
        self.stats.health(healthy)
        return {
            "status": "healthy" if healthy else "unhealthy",
            "resources": {"cpu_usage": round(cpu, 2), "memory_usage": round(memory, 2),
                          "disk_available": format_gb(free), "disk_available_bytes": free,
                          "container_count": len(running) - not_ready,
                          "containers_not_ready": not_ready},
            "uptime": max(0, int(time.time() - self.started_at)),
            "problems": problems,
        }


def start_from_config(cfg: Any, service: NodeService, stats: ChasStats) -> ChasApi | None:
    """The CHaS API as the configuration says (None when chas.port is 0), started.

    Raises InvalidArgument (chas.bind_address: a non-loopback address without TLS and without
    --insecure; or tls: unreadable files) or Unavailable (chas.port: the port is taken)."""
    if cfg.chas_port == 0:
        return None
    token = auth.load_or_create_token(cfg.token_path)
    tls = bool(cfg.tls_cert_file and cfg.tls_key_file)
    auth.check_exposure(cfg.chas_bind_address, tls, cfg.security_insecure, "the CHaS API",
                        "chas.bind_address")
    context = auth.server_ssl_context(cfg.tls_cert_file, cfg.tls_key_file, cfg.tls_ca_file) if tls else None
    try:
        started_at = psutil.Process(os.getpid()).create_time()
    except psutil.Error:
        started_at = time.time()
    lo, hi = cfg.chas_host_ports
    api = ChasApi(service, stats, host=cfg.chas_bind_address, port=cfg.chas_port, token=lambda: token,
                  host_ports=(int(lo), int(hi)), ssl_context=context, started_at=started_at,
                  disk_path=cfg.paths_state_dir, max_connections=cfg.chas_max_connections,
                  header_timeout=cfg.chas_header_timeout)
    api.start()
    return api
