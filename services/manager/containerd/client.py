"""A small client of containerd's gRPC API: what the containerd driver needs, nothing more.

Every call carries the namespace header; calls that create things a garbage collector could
take (a snapshot before its container exists) run inside a lease. gRPC failures become riklet
errors: containerd down is :class:`Unavailable` naming the socket, a missing object
:class:`NotFound`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from common.errors import AlreadyExists, Conflict, Internal, NotFound, RikletError, Unavailable

INDEX_TYPES = {"application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json"}
SPEC_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
RUNTIME = "io.containerd.runc.v2"
# The labels riklet puts on its containers: which agent, pod (name, uid) and container.
LABEL_AGENT, LABEL_POD, LABEL_UID, LABEL_CONTAINER = (
    "riklet.agent", "riklet.pod", "riklet.uid", "riklet.container")
ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(platform.machine(), platform.machine())


def stubs_missing() -> str | None:
    from common.pb import containerd as gen
    if gen.available():
        return None
    return "containerd's API stubs are not generated (run `make containerd-api`)"


@dataclass(frozen=True)
class TaskState:
    status: str            # created, running, stopped, paused, unknown
    pid: int
    exit_status: int
    exited_at: float | None


@dataclass(frozen=True)
class ImageInfo:
    name: str
    digest: str
    size: int
    created_at: float


class Containerd:
    def __init__(self, address: str, namespace: str, snapshotter: str = "overlayfs",
                 timeout: float = 10.0) -> None:
        self.address = address
        self.namespace = namespace
        self.snapshotter = snapshotter
        self.timeout = timeout
        self._channel: grpc.Channel | None = None
        self._stubs: dict[str, Any] = {}
        self._stub_lock = threading.Lock()   # the reconciler's workers share one channel

    # -- plumbing ----------------------------------------------------------------------------

    def _stub(self, service: str) -> Any:
        stub = self._stubs.get(service)
        if stub is not None:
            return stub
        with self._stub_lock:
            if self._channel is None:
                self._channel = grpc.insecure_channel(
                    f"unix://{self.address}",
                    options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
            stub = getattr(_modules()[service][1], f"{service.capitalize()}Stub")(self._channel)
            self._stubs[service] = stub
            return stub

    def _msg(self, service: str, message: str, /, **fields: Any) -> Any:
        return getattr(_modules()[service][0], message)(**fields)

    def _call(self, service: str, method: str, request: Any, *, lease: str | None = None,
              timeout: float | None = None) -> Any:
        md = [("containerd-namespace", self.namespace)]
        if lease:
            md.append(("containerd-lease", lease))
        try:
            return getattr(self._stub(service), method)(request, metadata=md,
                                                       timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            raise self._error(exc, f"{service}.{method}") from None

    def _stream(self, service: str, method: str, request: Any) -> Iterator[Any]:
        md = [("containerd-namespace", self.namespace)]
        try:
            yield from getattr(self._stub(service), method)(request, metadata=md, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise self._error(exc, f"{service}.{method}") from None

    def _error(self, exc: grpc.RpcError, what: str) -> RikletError:
        code = exc.code() if hasattr(exc, "code") else None
        detail = exc.details() if hasattr(exc, "details") else str(exc)
        if code == grpc.StatusCode.UNAVAILABLE:
            return Unavailable(f"containerd is not reachable at {self.address}: {detail}", "containerd")
        if code == grpc.StatusCode.NOT_FOUND:
            return NotFound(f"containerd: {detail}", "containerd")
        if code == grpc.StatusCode.ALREADY_EXISTS:
            return AlreadyExists(f"containerd: {detail}", "containerd")
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            return Conflict(f"containerd: {detail}", "containerd")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return Unavailable(f"containerd did not answer {what} in time", "containerd")
        return Internal(f"containerd {what}: {detail}", "containerd")

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
            self._stubs.clear()

    def version(self) -> str:
        from google.protobuf import empty_pb2
        return str(self._call("version", "Version", empty_pb2.Empty(), timeout=3).version)

    @contextlib.contextmanager
    def lease(self) -> Iterator[str]:
        """A lease guards what is created under it from garbage collection until released."""
        lid = f"riklet-{uuid.uuid4().hex[:12]}"
        expire = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
        self._call("leases", "Create", self._msg("leases", "CreateRequest", id=lid,
                                                  labels={"containerd.io/gc.expire": expire}))
        try:
            yield lid
        finally:
            with contextlib.suppress(RikletError):
                self._call("leases", "Delete", self._msg("leases", "DeleteRequest", id=lid))

    # -- images ------------------------------------------------------------------------------

    def images(self) -> list[ImageInfo]:
        resp = self._call("images", "List", self._msg("images", "ListImagesRequest"))
        out = []
        for img in resp.images:
            out.append(ImageInfo(name=img.name, digest=img.target.digest, size=int(img.target.size),
                                 created_at=img.created_at.seconds + img.created_at.nanos / 1e9))
        return sorted(out, key=lambda i: i.name)

    def has_image(self, name: str) -> bool:
        try:
            self._call("images", "Get", self._msg("images", "GetImageRequest", name=name))
        except NotFound:
            return False
        return True

    def remove_image(self, name: str) -> None:
        self._call("images", "Delete", self._msg("images", "DeleteImageRequest", name=name, sync=True))

    def read_blob(self, digest: str) -> bytes:
        req = self._msg("content", "ReadContentRequest", digest=digest)
        return b"".join(chunk.data for chunk in self._stream("content", "Read", req))

    def image_config(self, name: str) -> tuple[dict[str, Any], str]:
        """The image's config (Entrypoint, Cmd, Env...) and the chain id of its unpacked rootfs."""
        manifest = self._manifest(name)
        config = json.loads(self.read_blob(manifest["config"]["digest"]))
        return config, chain_id(list((config.get("rootfs") or {}).get("diff_ids") or []))

    def image_layers(self, name: str) -> list[tuple[str, int]]:
        """The image's layers for this platform: (digest, size)."""
        return [(str(la.get("digest")), int(la.get("size") or 0)) for la in self._manifest(name).get("layers")
                or [] if isinstance(la, dict)]

    def _manifest(self, name: str) -> dict[str, Any]:
        img = self._call("images", "Get", self._msg("images", "GetImageRequest", name=name)).image
        desc: dict[str, Any] = {"mediaType": img.target.media_type, "digest": img.target.digest}
        for _ in range(3):
            if desc["mediaType"] not in INDEX_TYPES:
                break
            index = json.loads(self.read_blob(desc["digest"]))
            matches = [m for m in index.get("manifests", [])
                       if (m.get("platform") or {}).get("os", "linux") == "linux"
                       and (m.get("platform") or {}).get("architecture", ARCH) == ARCH]
            if not matches:
                raise NotFound(f"image {name} has no linux/{ARCH} manifest", "image")
            desc = matches[0]
        manifest: dict[str, Any] = json.loads(self.read_blob(desc["digest"]))
        return manifest

    def ingest_progress(self) -> tuple[int, int]:
        """Bytes fetched and expected over the downloads in progress in this namespace."""
        statuses = self.ingest_statuses()
        return sum(s[1] for s in statuses), sum(s[2] for s in statuses)

    def ingest_statuses(self) -> list[tuple[str, int, int]]:
        """The downloads in progress in this namespace: (ref, bytes fetched, bytes expected)."""
        resp = self._call("content", "ListStatuses", self._msg("content", "ListStatusesRequest"))
        return [(str(s.ref), int(s.offset), int(s.total)) for s in resp.statuses]

    # -- snapshots and containers ------------------------------------------------------------

    def prepare_snapshot(self, key: str, parent: str, lease: str) -> None:
        self._call("snapshots", "Prepare", self._msg(
            "snapshots", "PrepareSnapshotRequest", snapshotter=self.snapshotter, key=key, parent=parent),
            lease=lease)

    def mounts(self, key: str) -> list[Any]:
        resp = self._call("snapshots", "Mounts", self._msg(
            "snapshots", "MountsRequest", snapshotter=self.snapshotter, key=key))
        return list(resp.mounts)

    def remove_snapshot(self, key: str) -> None:
        with contextlib.suppress(NotFound):
            self._call("snapshots", "Remove", self._msg(
                "snapshots", "RemoveSnapshotRequest", snapshotter=self.snapshotter, key=key))

    def snapshots(self) -> list[str]:
        req = self._msg("snapshots", "ListSnapshotsRequest", snapshotter=self.snapshotter)
        return [info.name for resp in self._stream("snapshots", "List", req) for info in resp.info]

    def create_container(self, cid: str, image: str, spec: dict[str, Any], labels: dict[str, str],
                         lease: str) -> None:
        from google.protobuf import any_pb2
        mod = _modules()["containers"][0]
        container = mod.Container(
            id=cid, image=image, labels=labels, snapshotter=self.snapshotter, snapshot_key=cid,
            runtime=mod.Container.Runtime(name=RUNTIME),
            spec=any_pb2.Any(type_url=SPEC_TYPE_URL, value=json.dumps(spec).encode()))
        self._call("containers", "Create", mod.CreateContainerRequest(container=container), lease=lease)

    def containers(self, labels: dict[str, str] | None = None) -> list[tuple[str, dict[str, str]]]:
        filters = [",".join(f'labels."{k}"=={v}' for k, v in (labels or {}).items())] if labels else []
        resp = self._call("containers", "List", self._msg("containers", "ListContainersRequest",
                                                          filters=filters))
        return [(c.id, dict(c.labels)) for c in resp.containers]

    def containers_with_images(self) -> list[tuple[str, dict[str, str], str]]:
        resp = self._call("containers", "List", self._msg("containers", "ListContainersRequest"))
        return [(c.id, dict(c.labels), c.image) for c in resp.containers]

    def delete_container(self, cid: str) -> None:
        with contextlib.suppress(NotFound):
            self._call("containers", "Delete", self._msg("containers", "DeleteContainerRequest", id=cid))

    # -- tasks -------------------------------------------------------------------------------

    def create_task(self, cid: str, log_uri: str) -> int:
        req = self._msg("tasks", "CreateTaskRequest", container_id=cid, rootfs=self.mounts(cid),
                        stdout=log_uri, stderr=log_uri)
        return int(self._call("tasks", "Create", req, timeout=30).pid)

    def start_task(self, cid: str) -> None:
        self._call("tasks", "Start", self._msg("tasks", "StartRequest", container_id=cid), timeout=30)

    def task(self, cid: str) -> TaskState | None:
        try:
            p = self._call("tasks", "Get", self._msg("tasks", "GetRequest", container_id=cid)).process
        except NotFound:
            return None
        status = _STATUS.get(int(p.status), "unknown")
        exited = p.exited_at.seconds + p.exited_at.nanos / 1e9 if p.exited_at.seconds > 0 else None
        return TaskState(status=status, pid=int(p.pid), exit_status=int(p.exit_status), exited_at=exited)

    def tasks(self) -> dict[str, TaskState]:
        resp = self._call("tasks", "List", self._msg("tasks", "ListTasksRequest"))
        out = {}
        for p in resp.tasks:
            exited = p.exited_at.seconds + p.exited_at.nanos / 1e9 if p.exited_at.seconds > 0 else None
            out[p.id] = TaskState(status=_STATUS.get(int(p.status), "unknown"), pid=int(p.pid),
                                  exit_status=int(p.exit_status), exited_at=exited)
        return out

    def kill(self, cid: str, sig: int, all_processes: bool = False) -> None:
        with contextlib.suppress(NotFound, Conflict):
            self._call("tasks", "Kill", self._msg("tasks", "KillRequest", container_id=cid, signal=sig,
                                                  all=all_processes))

    def delete_task(self, cid: str) -> None:
        with contextlib.suppress(NotFound):
            self._call("tasks", "Delete", self._msg("tasks", "DeleteTaskRequest", container_id=cid),
                       timeout=30)

    # -- ctr for what is a whole program's work over the API ---------------------------------

    def ctr(self, *args: str, timeout: float = 600, on_line: Callable[[str], None] | None = None
            ) -> str:
        """Run containerd's own ``ctr`` against our socket and namespace (image pull and
        import: fetching, writing content and unpacking layers)."""
        cmd = ["ctr", "-a", self.address, "-n", self.namespace, *args]
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        except FileNotFoundError:
            raise Unavailable("containerd's `ctr` program is not installed", "containerd") from None
        lines: list[str] = []
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if on_line:
                on_line(lines[-1])
            if time.monotonic() > deadline:
                proc.kill()
                break
        code = proc.wait()
        if code != 0:
            tail = " ".join(x.strip() for x in lines[-3:] if x.strip())
            raise Internal(f"ctr {args[0]} {args[1] if len(args) > 1 else ''} failed: {tail}".strip(),
                           "containerd")
        return "\n".join(lines)


_STATUS = {0: "unknown", 1: "created", 2: "running", 3: "stopped", 4: "paused", 5: "pausing"}


def chain_id(diff_ids: list[str]) -> str:
    """The snapshot name of an unpacked rootfs, from its layers' uncompressed digests."""
    import hashlib
    if not diff_ids:
        raise NotFound("the image has no layers", "image")
    chain = diff_ids[0]
    for d in diff_ids[1:]:
        chain = "sha256:" + hashlib.sha256(f"{chain} {d}".encode()).hexdigest()
    return chain


_MODULES: dict[str, tuple[Any, Any]] = {}
_MODULES_LOCK = threading.Lock()


def _modules() -> dict[str, tuple[Any, Any]]:
    """The generated stubs, imported on first use (they exist only after `make containerd-api`).
    Filled whole under a lock: a thread must never see the table half imported by another."""
    with _MODULES_LOCK:
        if not _MODULES:
            missing = stubs_missing()
            if missing:
                raise Unavailable(missing, "containerd")
            import importlib
            base = "common.pb.ctrd.services"
            loaded = {}
            for service, mod in (("version", "version"), ("leases", "leases"), ("images", "images"),
                                 ("content", "content"), ("snapshots", "snapshots"),
                                 ("containers", "containers"), ("tasks", "tasks")):
                loaded[service] = (importlib.import_module(f"{base}.{service}.v1.{mod}_pb2"),
                                   importlib.import_module(f"{base}.{service}.v1.{mod}_pb2_grpc"))
            _MODULES.update(loaded)
    return _MODULES

