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
import hashlib
import io
import json
import logging
import os
import re
import select
import shutil
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

import psutil

from common import auth, rotlog
from common.errors import Conflict as ConflictError
from common.errors import ErrorCode, InvalidArgument, NotFound, RikletError, Unavailable, excerpt
from common.model import Workload, dns_label, host_ports, load_json
from common.ports import ApplyView, bindable
from common.rik import instance_id_of
from common.units import parse_cpu, parse_memory
from common.zmqutil import RequestClient
from services.manager.chas.conn import (
    HEADER_TIMEOUT,
    MAX_CONNECTIONS,
    WRITE_TIMEOUT,
    Connections,
    DeadlineReader,
    body_deadline,
)
from services.manager.chas.stats import ChasStats

if TYPE_CHECKING:
    from services.manager.api.node import NodeService

log = logging.getLogger("riklet.chas")

OPENAPI_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openapi.json")
MAX_BODY = 1 << 20                 # bytes of a request body (413 above)
MAX_STORED = 200 * 1024            # JSON bytes of a deployment once normalized (memory keeps 256 KiB)
MAX_PORTS = 64
MAX_ENV = 512
MAX_ARGV = 1024
MAX_MEMORY = 1 << 60
DISK_LOW = 0.05                    # under this share of free disk the node is unhealthy
FOLLOW_POLL = 0.25                 # seconds between the checks that end a log stream

# The pod phase (services.manager.reconcile.status.Phase) as a CHaS container status.
STATUSES: Mapping[str, str] = {
    "Pending": "pending", "Creating": "creating", "Running": "running", "Error": "error",
    "Terminating": "terminating", "Terminated": "stopped",
}

HTTP_STATUS: Mapping[ErrorCode, int] = {
    ErrorCode.INVALID_ARGUMENT: 400, ErrorCode.BAD_FRAME: 400, ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.PERMISSION_DENIED: 403, ErrorCode.NOT_FOUND: 404, ErrorCode.ALREADY_EXISTS: 409,
    ErrorCode.CONFLICT: 409, ErrorCode.TOO_LARGE: 413, ErrorCode.UNAVAILABLE: 503,
    ErrorCode.TIMEOUT: 503, ErrorCode.INTERNAL: 500,
}

METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})
DEPLOY_KEYS = ("image", "name", "exposed_ports", "resources", "environment", "command", "args")
PORT_KEYS = ("container", "protocol", "host")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_ID_ROUTE = re.compile(r"/containers/([^/]+)")
_LOGS_ROUTE = re.compile(r"/containers/([^/]+)/logs")
_DIGITS = re.compile(r"[0-9]{1,18}")
# Route template -> the one method it answers.
ROUTES: Mapping[str, str] = {
    "/openapi.json": "GET", "/containers/deploy": "POST", "/containers": "GET", "/health": "GET",
    "/containers/{container_id}/logs": "GET", "/containers/{container_id}": "DELETE",
}


class HttpError(Exception):
    """An answer other than a RikletError's: 401, 404 of a route, 405, 411, 413."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if field:
        err["field"] = field
    return {"error": err}


def container_status(record: Mapping[str, Any]) -> str:
    """A pod's CHaS status: its phase in lower case (Terminated is "stopped"); a pod being
    deleted is "terminating" until it is gone."""
    phase = (record.get("status") or {}).get("phase") or "Pending"
    if record.get("desired") == "deleted":
        return "terminating"
    return STATUSES.get(str(phase), "unknown")


def container_summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """The seed's container object (plus ``reason`` and each port's ``protocol``)."""
    spec = record.get("spec") or {}
    containers = spec.get("containers") or [{}]
    image = containers[0].get("image") or None
    status = record.get("status") or {}
    return {
        "id": record.get("uid", ""),
        "name": record.get("name", ""),
        "image": image,
        "status": container_status(record),
        "reason": status.get("reason") or None,
        "ports": [{"host": p.get("port") or None, "container": p.get("target_port") or None,
                   "protocol": str(p.get("protocol", "TCP")).lower()}
                  for p in spec.get("ports") or []],
    }


def format_gb(n: int) -> str:
    """Bytes as the seed writes sizes ("50GB"): GB is 2**30 bytes, as in riklet's units
    (512m = 512 MiB), with one decimal under 10 GB."""
    value = n / float(1 << 30)
    text = f"{value:.0f}" if value >= 10 else f"{value:.1f}".removesuffix(".0")
    return f"{text}GB"


# -- the deploy request ---------------------------------------------------------------------------

@dataclass(frozen=True)
class DeployRequest:
    name: str
    image: str | None
    document: dict[str, Any]     # the workload document for NodeService.apply_document
    digest: str                  # of the request as sent (canonical JSON): idempotence


def _short(value: object) -> str:
    return excerpt(value)


def _opt(data: Mapping[str, Any], key: str) -> Any:
    return data.get(key)  # null is the same as absent


def _port_number(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise InvalidArgument(f"expected a port number from 1 to 65535, got {_short(value)}", field)
    return value


def _strings(value: object, field: str, min_items: int) -> list[str]:
    if not isinstance(value, list) or not min_items <= len(value) <= MAX_ARGV:
        raise InvalidArgument(f"expected a list of {min_items} to {MAX_ARGV} strings", field)
    for i, item in enumerate(value):
        if not isinstance(item, str) or "\0" in item:
            raise InvalidArgument("expected a string without NUL characters", f"{field}[{i}]")
    return list(value)


def _guarded(parse: Callable[[object, str], int], value: object, field: str) -> int:
    try:
        return parse(value, field)
    except (OverflowError, ValueError) as exc:  # a number too large for a float
        raise InvalidArgument(f"cannot parse {_short(value)}", field) from exc


def parse_deploy(data: object) -> DeployRequest:
    """Validate a ``POST /containers/deploy`` body and map it to a workload document; every
    rejection names the body field at fault."""
    if not isinstance(data, dict):
        raise InvalidArgument("expected a JSON object", "body")
    for key in data:
        if key not in DEPLOY_KEYS:
            raise InvalidArgument(f"unknown field (allowed: {', '.join(DEPLOY_KEYS)})", str(key)[:100])
    name = data.get("name")
    if name is None:
        raise InvalidArgument("required: the container's name (a DNS label)", "name")
    if not isinstance(name, str) or len(name) > 63:
        raise InvalidArgument("expected a DNS label of at most 63 characters", "name")
    dns_label(name, "name")

    image = _opt(data, "image")
    if image is not None and (not isinstance(image, str) or not image.strip() or len(image) > 512
                              or any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in image)):
        raise InvalidArgument("expected an image reference like nginx:latest (at most 512 characters, "
                              "no spaces)", "image")
    command = _opt(data, "command")
    if command is not None:
        command = _strings(command, "command", 1)
        if image is None and not command[0]:
            raise InvalidArgument("the program name is empty", "command[0]")
    args = _opt(data, "args")
    if args is not None:
        args = _strings(args, "args", 0)
    if image is None and command is None:
        raise InvalidArgument("give an image, or a command to run on the process runtime", "image")

    container: dict[str, Any] = {"name": name}
    if image is not None:
        container["image"] = image
    if command is not None:
        container["command"] = command
    if args is not None:
        container["args"] = args

    ports = _opt(data, "exposed_ports")
    if ports is not None:
        container["ports"] = _exposed_ports(ports)
    resources = _opt(data, "resources")
    if resources is not None:
        container["resources"] = _resources(resources)
    environment = _opt(data, "environment")
    if environment is not None:
        container["env"] = _environment(environment)

    document = {"apiVersion": "v1", "kind": "Pod", "name": name, "spec": {"containers": [container]}}
    if len(json.dumps(document)) > MAX_STORED:
        raise InvalidArgument(f"the deployment is larger than {MAX_STORED // 1024} KiB once stored", "body")
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()
    return DeployRequest(name=name, image=image, document=document, digest=digest)


def _exposed_ports(value: object) -> list[dict[str, Any]]:
    if not isinstance(value, list) or len(value) > MAX_PORTS:
        raise InvalidArgument(f"expected a list of at most {MAX_PORTS} ports", "exposed_ports")
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, int]] = set()
    for i, raw in enumerate(value):
        where = f"exposed_ports[{i}]"
        if not isinstance(raw, dict):
            raise InvalidArgument("expected an object {container, protocol?, host?}", where)
        for key in raw:
            if key not in PORT_KEYS:
                raise InvalidArgument(f"unknown field (allowed: {', '.join(PORT_KEYS)})",
                                      f"{where}.{str(key)[:100]}")
        if raw.get("container") is None:
            raise InvalidArgument("required: the port the container listens on", f"{where}.container")
        target = _port_number(raw["container"], f"{where}.container")
        proto = raw.get("protocol")
        proto = "tcp" if proto is None else proto
        if not isinstance(proto, str) or proto.lower() not in ("tcp", "udp"):
            raise InvalidArgument(f"expected tcp or udp, got {_short(proto)}", f"{where}.protocol")
        entry: dict[str, Any] = {"target_port": target, "protocol": proto.upper()}
        if raw.get("host") is not None:
            host = _port_number(raw["host"], f"{where}.host")
            if (entry["protocol"], host) in seen:
                raise InvalidArgument(f"host port {host}/{proto.lower()} given twice", f"{where}.host")
            seen.add((entry["protocol"], host))
            entry["port"] = host
        out.append(entry)
    return out


def _resources(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument("expected an object {cpu?, memory?}", "resources")
    for key in value:
        if key not in ("cpu", "memory"):
            raise InvalidArgument("unknown field (allowed: cpu, memory)", f"resources.{str(key)[:100]}")
    out: dict[str, Any] = {}
    cpu = value.get("cpu")
    if cpu is not None:
        if isinstance(cpu, bool) or not isinstance(cpu, (str, int, float)):
            raise InvalidArgument("expected cores as a string or number, like \"0.5\" or \"500m\"",
                                  "resources.cpu")
        out["cpu"] = f"{_guarded(parse_cpu, cpu, 'resources.cpu')}m"
    memory = value.get("memory")
    if memory is not None:
        if isinstance(memory, bool) or not isinstance(memory, (str, int, float)):
            raise InvalidArgument("expected a size like \"512m\" or a number of bytes", "resources.memory")
        size = _guarded(parse_memory, memory, "resources.memory")
        if size > MAX_MEMORY:
            raise InvalidArgument("more than 1 EiB", "resources.memory")
        out["memory"] = size
    return out


def _environment(value: object) -> dict[str, str]:
    if not isinstance(value, dict) or len(value) > MAX_ENV:
        raise InvalidArgument(f"expected an object of at most {MAX_ENV} NAME: value pairs", "environment")
    env: dict[str, str] = {}
    for key, val in value.items():
        if len(key) > 256 or not _ENV_NAME.fullmatch(key):
            raise InvalidArgument("not a valid variable name ([A-Za-z_][A-Za-z0-9_.-]*)",
                                  f"environment.{key[:100]}")
        if isinstance(val, bool) or not isinstance(val, (str, int, float)) or "\0" in str(val):
            raise InvalidArgument("expected a string", f"environment.{key}")
        env[key] = str(val)
    return env


def body_field(field: str | None) -> str | None:
    """A field named by the core (``spec.containers[0].env.X``) as the body names it."""
    if field is None:
        return None
    if field.startswith("args."):
        return "body"
    if not field.startswith("spec"):
        return field
    rest = re.sub(r"^spec\.containers(\[\d+\])?\.?", "", field)
    if rest == field or not rest:
        return "body"
    head, sep, tail = rest.partition(".")
    if head.startswith("ports"):
        return "exposed_ports"
    if head.startswith("env"):
        return "environment" + (sep + tail if tail else "")
    return rest


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
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._streams: set[threading.Event] = set()
        self._streams_lock = threading.Lock()
        self._probe: RequestClient | None = None
        self._probe_lock = threading.Lock()

    @property
    def port(self) -> int:
        if self._server is None:
            return self._requested_port
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and serve on a daemon thread; Unavailable (field chas.port) if the port is taken."""
        try:
            self._server = _Server(self)
        except OSError as exc:
            raise Unavailable(f"cannot listen on {self.host}:{self._requested_port}: {exc.strerror or exc}",
                              "chas.port") from exc
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="chas-http", daemon=True)
        self._thread.start()
        log.info("CHaS API serving", extra={"address": f"{self.host}:{self.port}",
                                             "tls": self.ssl_context is not None})

    def stop(self) -> None:
        with self._streams_lock:
            for stop in self._streams:
                stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
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
        raise NotFound(f"no container with id or name {_short(container_id)}", "container_id")

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
        running = sum(1 for r in records if isinstance(r, dict) and r.get("desired") == "running"
                      and (r.get("status") or {}).get("phase") == "Running")
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
                          "container_count": running},
            "uptime": max(0, int(time.time() - self.started_at)),
            "problems": problems,
        }


# -- HTTP -----------------------------------------------------------------------------------------

class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 256          # a burst of connects is accepted, then shed if idle

    def __init__(self, api: ChasApi) -> None:
        self.api = api
        self.ssl_context = api.ssl_context
        self.connections = Connections(api.max_connections)
        if ":" in api.host:
            self.address_family = socket.AF_INET6
        super().__init__((api.host.strip("[]"), api._requested_port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer's would look the host name up (getfqdn): nothing here needs it.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.connections.admit(request) is None:  # every connection is in a request
            if self.ssl_context is None:
                body = json.dumps(error_body("unavailable", "too many connections; retry later")).encode()
                with contextlib.suppress(OSError):
                    request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                    b"Connection: close\r\nContent-Length: " + str(len(body)).encode()
                                    + b"\r\n\r\n" + body)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connections.leave(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.leave(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys
        exc = sys.exc_info()[1]
        if isinstance(exc, (OSError, ssl.SSLError)):
            log.debug("connection ended", extra={"client": str(client_address[0]), "error": str(exc)})
        else:
            log.error("connection failed", exc_info=True, extra={"client": str(client_address[0])})


Reply = tuple[int, Any, tuple[tuple[str, str], ...]]   # status, JSON (or bytes), extra headers


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "riklet-chas"
    sys_version = ""
    timeout = WRITE_TIMEOUT
    disable_nagle_algorithm = True   # a keep-alive answer must not wait for the client's delayed ACK
    _headers_buffer: list[bytes]     # http.server's: the head being built, written by flush_headers()

    # -- connection plumbing ------------------------------------------------------------------

    def setup(self) -> None:
        self._expect_continue = False
        self._conn = self.server.connections.get(self.request)
        if self.server.ssl_context is not None:
            self.request.settimeout(self.server.api.header_timeout)  # the handshake is part of the head
            self.request = self.server.ssl_context.wrap_socket(self.request, server_side=True)
            self._conn.sock = self.request
        super().setup()
        self.rfile.close()  # reads go through the deadline reader instead
        self._reader = DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self.server.ssl_context is not None:
                with contextlib.suppress(OSError):
                    self.request.close()

    def handle_one_request(self) -> None:
        """http.server's, except that every method reaches the router (which answers 405 with
        Allow) instead of only those with a ``do_`` method (501), and that the head must arrive
        within chas.header_timeout of the moment the server starts waiting for it."""
        self._reader.deadline = time.monotonic() + self.server.api.header_timeout
        self._reader.received = 0
        self.raw_requestline = b""
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.requestline = self.request_version = self.command = ""
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():
                return
            if self.request_version == "HTTP/0.9":
                self.send_error(HTTPStatus.BAD_REQUEST, "HTTP/0.9 is not supported")
                return
            self._reader.deadline = None
            self._conn.busy = True   # a request in progress: never closed to make room
            try:
                self._dispatch()
                self.wfile.flush()
            finally:
                self._conn.busy = False
                self._conn.since = time.monotonic()
        except TimeoutError:
            self.close_connection = True
            if self.raw_requestline or self._reader.received:
                self._head_timeout()

    def _head_timeout(self) -> None:
        """408 to a client that began a request and did not finish its head in time (one that
        sent nothing is closed without a word)."""
        if not getattr(self, "command", None):
            self.command = self.requestline = ""
            self.request_version = "HTTP/1.0"
        with contextlib.suppress(OSError):
            self.send_error(HTTPStatus.REQUEST_TIMEOUT, "the request's headers did not arrive within "
                            f"{self.server.api.header_timeout:g} s (chas.header_timeout)")

    def version_string(self) -> str:
        return self.server_version

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # one structured line per request is written by _dispatch

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def handle_expect_100(self) -> bool:
        self._expect_continue = True  # sent only once the body is known to be acceptable
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol errors http.server finds itself (request line, headers): same JSON shape."""
        self.close_connection = True
        if getattr(self, "request_version", "HTTP/0.9") in ("HTTP/0.9", ""):
            self.request_version = "HTTP/1.0"  # answer with a status line, whatever was asked
        err = {414: "too_large", 431: "too_large", 408: "timeout"}.get(code, "invalid_argument")
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._begin()
        self._method = "OTHER"
        with contextlib.suppress(OSError):
            self._write_json(code, error_body(err, message or phrase), ())
        self._done()

    # -- one request --------------------------------------------------------------------------

    def _begin(self) -> None:
        self._t0 = time.perf_counter()
        self._latency: float | None = None
        self._status = 0
        self._template = "other"
        command = getattr(self, "command", None) or ""
        self._method = command if command in METHODS else "OTHER"
        self._error: str | None = None
        self._deploy = False

    def _done(self) -> None:
        elapsed = time.perf_counter() - self._t0
        api = self.server.api
        if self._status:
            api.stats.request(self._method, self._template, self._status, self._latency or elapsed)
            if self._error:
                api.stats.error(self._error)
            if self._deploy:
                api.stats.deployment(self._status < 300)
        raw_path = getattr(self, "path", "") or ""
        log.info("request", extra={
            "method": self._method, "path": urlsplit(raw_path).path[:256] if raw_path else "",
            "endpoint": self._template, "status": self._status or None,
            "duration_ms": round(elapsed * 1000, 2), "client": str(self.client_address[0])})

    def _dispatch(self) -> None:
        self._begin()
        te = self.headers.get("Transfer-Encoding")
        length = self.headers.get("Content-Length")
        self._unread_body = te is not None or (length is not None and length.strip() != "0")
        try:
            reply = self._route()
            if reply is not None:
                self._write(*reply)
        except HttpError as exc:
            self._fail(exc.status, exc.code, exc.message, exc.field, exc.headers)
        except RikletError as exc:
            self._fail(HTTP_STATUS.get(exc.code, 500), exc.code.value, exc.message, exc.field, ())
        except (BrokenPipeError, ConnectionResetError, TimeoutError, ssl.SSLError):
            self.close_connection = True
        except Exception:
            log.exception("request failed", extra={"method": self._method, "endpoint": self._template})
            self._fail(500, "internal", "internal error", None, ())
        finally:
            self._done()

    def _fail(self, status: int, code: str, message: str, field: str | None,
              headers: tuple[tuple[str, str], ...]) -> None:
        if self._status:  # the answer had begun (a stream): nothing can be added
            self.close_connection = True
            return
        self._error = code
        with contextlib.suppress(OSError):
            self._write_json(status, error_body(code, message, field), headers)

    def _write(self, status: int, payload: Any, headers: tuple[tuple[str, str], ...]) -> None:
        if isinstance(payload, bytes):
            self._send(status, payload, "text/plain; charset=utf-8", headers)
        else:
            self._write_json(status, payload, headers)

    def _write_json(self, status: int, payload: Any, headers: tuple[tuple[str, str], ...]) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", headers)

    def _send(self, status: int, body: bytes, content_type: str,
              headers: tuple[tuple[str, str], ...]) -> None:
        if getattr(self, "_unread_body", False):
            self.close_connection = True  # a body we did not read must not be taken for a request
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in headers:
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        # Head and body in one write: a second small write would wait for the client's
        # delayed ACK of the first (about 40 ms per keep-alive request).
        self._headers_buffer.append(b"\r\n" + (body if self.command != "HEAD" else b""))
        self.flush_headers()
        self._status = status

    # -- routing ------------------------------------------------------------------------------

    def _route(self) -> Reply | None:
        api = self.server.api
        parts = urlsplit(self.path)
        path = parts.path
        container_id = ""
        if path in ("/openapi.json", "/containers/deploy", "/containers", "/health"):
            self._template = path
        elif m := _LOGS_ROUTE.fullmatch(path):
            self._template, container_id = "/containers/{container_id}/logs", unquote(m.group(1))
        elif m := _ID_ROUTE.fullmatch(path):
            self._template, container_id = "/containers/{container_id}", unquote(m.group(1))
        if self._template != "/openapi.json" and not auth.bearer_ok(self.headers.get("Authorization"),
                                                                   api.token()):
            raise HttpError(401, ErrorCode.UNAUTHENTICATED.value,
                            "missing or wrong bearer token: send Authorization: Bearer <token> "
                            "(see auth.token_file)", "Authorization",
                            (("WWW-Authenticate", 'Bearer realm="riklet"'),))
        if self._template == "other":
            raise HttpError(404, ErrorCode.NOT_FOUND.value, "no such endpoint (see GET /openapi.json)",
                            "path")
        self._allow(ROUTES[self._template])
        logs = self._template == "/containers/{container_id}/logs"
        query = self._query(parts.query, ("tail", "follow", "container") if logs else ())
        if self._template == "/openapi.json":
            return 200, api.openapi, ()
        if self._template == "/containers/deploy":
            self._deploy = True
            return self._deploy_route()
        if self._template == "/containers":
            return 200, api.list(), ()
        if self._template == "/health":
            return 200, api.health(), ()
        if self._template == "/containers/{container_id}/logs":
            return self._logs(container_id, query)
        return 200, api.delete(container_id), ()

    def _allow(self, method: str) -> None:
        if self.command != method:
            raise HttpError(405, "method_not_allowed", f"{self._template} answers {method}",
                            "method", (("Allow", method),))

    def _query(self, query: str, allowed: tuple[str, ...]) -> dict[str, str]:
        try:
            pairs = parse_qsl(query, keep_blank_values=True, max_num_fields=16)
        except ValueError as exc:
            raise InvalidArgument(f"cannot parse the query string: {exc}", "query") from exc
        out: dict[str, str] = {}
        for key, value in pairs:
            if key not in allowed:
                hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
                raise InvalidArgument(f"unknown query parameter{hint}", f"query.{key[:100]}")
            if key in out:
                raise InvalidArgument("given twice", f"query.{key}")
            out[key] = value
        return out

    # -- deploy -------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding") is not None:
            raise HttpError(411, "length_required", "send the body with a Content-Length, not chunked",
                            "Content-Length")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            raise HttpError(411, "length_required", "a Content-Length is required", "Content-Length")
        if len(set(lengths)) != 1 or not _DIGITS.fullmatch(lengths[0].strip()):
            raise HttpError(400, ErrorCode.INVALID_ARGUMENT.value, "expected one decimal Content-Length",
                            "Content-Length")
        size = int(lengths[0].strip())
        if size > MAX_BODY:
            raise HttpError(413, ErrorCode.TOO_LARGE.value,
                            f"the body is larger than {MAX_BODY // 1024} KiB", "body")
        if self._expect_continue:
            self.send_response_only(100)
            self.end_headers()
        allowed = body_deadline(size, self.server.api.header_timeout)
        self._reader.deadline = time.monotonic() + allowed
        try:
            data = self.rfile.read(size)
        except TimeoutError:
            raise HttpError(408, ErrorCode.TIMEOUT.value, f"the body ({size} bytes) did not arrive within "
                            f"{allowed:.3g} s", "body") from None
        finally:
            self._reader.deadline = None
        if len(data) < size:
            raise ConnectionResetError("the client sent less than its Content-Length")
        self._unread_body = False
        return data

    def _deploy_route(self) -> Reply:
        raw = self._read_body()
        data = load_json(raw, "body", MAX_BODY)  # size, depth, then the decoder
        request = parse_deploy(data)
        record, created = self.server.api.deploy(request)
        summary = container_summary(record)
        headers = (("Location", f"/containers/{summary['id']}"),) if created else ()
        return (201 if created else 200), summary, headers

    # -- logs ---------------------------------------------------------------------------------

    def _logs(self, container_id: str, query: dict[str, str]) -> Reply | None:
        api = self.server.api
        tail: int | None = None
        if "tail" in query:
            if not _DIGITS.fullmatch(query["tail"]):
                raise InvalidArgument("expected a non-negative integer (lines)", "query.tail")
            tail = int(query["tail"])
        follow = query.get("follow", "false").lower()
        if follow not in ("true", "false", "1", "0", "yes", "no", ""):
            raise InvalidArgument("expected true or false", "query.follow")
        container = query.get("container", "")
        if container:
            if len(container) > 63:
                raise InvalidArgument("expected a container name (a DNS label)", "query.container")
            dns_label(container, "query.container")
        record = api.find(container_id)
        try:
            path = api.service.log_file(record["name"], container)
        except InvalidArgument as exc:
            if exc.field == "container":
                exc.field = "query.container"
            raise
        if follow not in ("true", "1", "yes"):
            return 200, rotlog.tail(path, tail), ()
        self._stream(path, tail, record)
        return None

    def _stream(self, path: str, tail: int | None, record: Mapping[str, Any]) -> None:
        api = self.server.api
        stop = threading.Event()
        new = rotlog.follow(path, stop)  # before tail(): nothing written in between is lost
        try:
            data = rotlog.tail(path, tail)
            self.close_connection = True
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Connection", "close")
            self.end_headers()
            self._status = 200
            self._latency = time.perf_counter() - self._t0
            with api._streams_lock:
                api._streams.add(stop)
            threading.Thread(target=self._watch, args=(stop, str(record["name"]), str(record.get("uid"))),
                             name="chas-follow", daemon=True).start()
            for chunk in _chunks(data):
                self._chunk(chunk)
            for chunk in new:
                self._chunk(chunk)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client went away
        finally:
            stop.set()
            with api._streams_lock:
                api._streams.discard(stop)
            close = getattr(new, "close", None)
            if close is not None:
                close()

    def _chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    def _watch(self, stop: threading.Event, name: str, uid: str) -> None:
        """End a follow stream when the client closes (or sends anything: it has nothing to
        send) or when the pod is gone; a final short wait lets its last output through."""
        sock = self.connection
        while not stop.wait(FOLLOW_POLL):
            try:
                readable, _, _ = select.select([sock], [], [], 0)
            except (OSError, ValueError):
                break
            if readable:
                break
            if not self.server.api.pod_alive(name, uid):
                stop.wait(2 * FOLLOW_POLL)
                break
        stop.set()


def _chunks(data: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


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
