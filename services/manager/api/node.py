"""The Node API (gRPC): validates at the boundary, writes desired state to memory.

Nothing here runs a workload: the reconciler does, from what memory says. riklet errors become
gRPC status codes with the field at fault in the message (``field: message``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import grpc

from common.app import is_app_file, parse_app
from common.errors import ErrorCode, InvalidArgument, NotFound, RikletError, Unavailable, bounded
from common.memclient import MemoryClient
from common.model import Workload, dns_label, load_manifest, parse_workload
from common.pb import node_pb2 as pb
from common.pb import node_pb2_grpc as pb_grpc
from common.policy import Policy
from common.ports import ApplyView, check_ports, wanted_ports
from common.zmqutil import RequestClient
from services.manager.api import logs, resize
from services.manager.api.apps import apply_app
from services.manager.api.listing import ListReply, PodMessages, pod_message
from services.manager.api.podevents import EventsApi
from services.manager.api.pulls import pull_progress
from services.manager.api.volumes import VolumeRpcs, check_claims
from services.manager.applylocks import ApplyLocks
from services.manager.volumes.store import VolumeStore

log = logging.getLogger(__name__)

_GRPC_CODES = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.BAD_FRAME: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorCode.CONFLICT: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.TIMEOUT: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}

# gRPC carries the status message in a trailer, percent-encoding every non-ASCII byte (3x), and a
# peer refuses trailers over its 8 KiB metadata limit: the client then sees RESOURCE_EXHAUSTED
# instead of the real code. 2 KiB encodes to at most 6 KiB.
MAX_GRPC_MESSAGE_BYTES = 2048

# A List reply holds at most this many pods (the client pages on); an unpaged List reads
# memory in pages of MEMORY_PAGE so that no IPC frame grows with the node.
MAX_LIST_PAGE = 1000
MEMORY_PAGE = 500

T = TypeVar("T")


MAX_IMPORT = 16 << 30


def _image_ref(value: str) -> str:
    text = value.strip()
    if not text or len(text) > 512 or any(ch.isspace() or ord(ch) < 32 for ch in text):
        raise InvalidArgument("expected an image reference like registry:5000/name:tag", "image")
    return text


def _continue_from(token: str) -> str:
    """The pod name a continue token carries (a page starts after it)."""
    try:
        return dns_label(token, "continue_token")
    except InvalidArgument:
        raise InvalidArgument("not a continue token a List reply gave", "continue_token") from None


class NodeService(EventsApi, VolumeRpcs, pb_grpc.NodeServicer):
    def __init__(self, memory: MemoryClient, mirror: Any, monitor: RequestClient,
                 log_path: Callable[[str, str], str], grace_default: float,
                 poke: Callable[[str | None], None], images: Any = None,
                 policy: Policy | None = None,
                 offer: Callable[[dict[str, Any]], None] | None = None, recorder: Any = None,
                 volumes: VolumeStore | None = None) -> None:
        self.memory = memory
        self.recorder = recorder      # pod events (services.manager.podevents.Recorder), or None
        self.volumes = volumes        # named volumes (rpcs in api/volumes.py)
        self.policy = policy or Policy()
        self.images = images          # the containerd runtime: list, pull, import, remove
        self.mirror = mirror
        self.monitor = monitor
        self.log_path = log_path
        self.grace_default = grace_default
        self.poke = poke
        # A record just written goes to the reconciler as is (the reconciler's offer), or by
        # name when there is none: then the pod is synced once memory's event has brought it.
        self.offer = offer or (lambda record: poke(record["name"]))
        # Checks and writes of applies that could meet must not interleave (shared with the
        # RIK scheduler link); applies that cannot meet run side by side.
        self.apply_locks = ApplyLocks()
        self._messages = PodMessages()
        # (pod, container) -> memory in use now: a resize below it is refused (set by main)
        self.usage_of: resize.UsageOf | None = None
        self._watchers: list[queue.Queue[tuple[str, dict[str, Any]] | None]] = []
        self._watch_lock = threading.Lock()
        self.execs: Any = None   # services.manager.api.execstream.Execs, set by the wiring

    # -- plumbing ----------------------------------------------------------------------------

    def _call(self, context: grpc.ServicerContext, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except RikletError as exc:
            context.abort(_GRPC_CODES[exc.code], bounded(str(exc), MAX_GRPC_MESSAGE_BYTES))
            raise  # unreachable: abort raises

    def _pod_name(self, name: str) -> str:
        return dns_label(name, "name")

    def _record(self, name: str) -> dict[str, Any]:
        return self.memory.get(self._pod_name(name))

    # -- unary -------------------------------------------------------------------------------

    def Apply(self, request: pb.ApplyRequest, context: grpc.ServicerContext) -> pb.ApplyResponse:
        return self._call(context, lambda: self._apply(request.manifest, request.format))

    def _apply(self, manifest: str, fmt: str) -> pb.ApplyResponse:
        document = load_manifest(manifest, fmt)
        if is_app_file(document):   # the seed's App file (common/app.py)
            return apply_app(self, parse_app(document))
        applied = self.apply_document(document)
        return pb.ApplyResponse(pods=[pod_message(r) for r, _ in applied], changed=[c for _, c in applied])

    # -- the core both APIs share (the CHaS HTTP API is a thin adapter over these) -----------

    def apply_document(self, document: Mapping[str, Any],
                       prepare: Callable[[Workload, ApplyView], Workload] | None = None
                       ) -> list[tuple[dict[str, Any], bool]]:
        """Validate a workload document, check it against the node's policy and the ports in
        use, and write its pods' desired state; returns (record, changed) per pod.

        ``prepare`` may rewrite the parsed workload under the apply lock, seeing the pods it
        names, the pods of its workload and memory's claimed ports (the CHaS API allocates host
        ports there). Only those records are read: the cost does not grow with the node's pods."""
        return self.apply_workload(parse_workload(document, self.grace_default), prepare)

    def apply_workload(self, workload: Workload,
                       prepare: Callable[[Workload, ApplyView], Workload] | None = None
                       ) -> list[tuple[dict[str, Any], bool]]:
        """:meth:`apply_document` of a workload already parsed."""
        with self.apply_locks.hold(workload, picks_ports=prepare is not None):
            if prepare is not None or wanted_ports(workload):
                # Host ports: who holds them is read first (and checked against the node);
                # the ports lock keeps another apply from claiming them meanwhile.
                current = ApplyView(self.memory, workload)
                if prepare is not None:
                    workload = prepare(workload, current)
                    current = ApplyView(self.memory, workload)  # the ports it chose have holders too
                for _, spec in workload.pods:
                    self.policy.check(spec)
                    check_claims(spec, self.volumes)
                check_ports(workload, current)
            else:
                for _, spec in workload.pods:
                    self.policy.check(spec)
                    check_claims(spec, self.volumes)
            if self.usage_of is not None and self.mirror is not None:
                for name, spec in workload.pods:   # a re-apply may lower a running pod's memory
                    resize.check_memory(self.mirror.get(name), spec, self.usage_of)
            # One write: the pods, the ownership of their names, and the extra replicas' delete,
            # all or nothing.
            results = self.memory.apply_workload(workload.name, workload.pods)
        records = [r["pod"] for r in results]
        self._applied_events([r["pod"] for r in results if r.get("changed", True)])   # before any start
        for r in records:
            self.offer(r)
        log.info("applied", extra={"workload": workload.name, "pod": [r["name"] for r in records]})
        return [(r["pod"], bool(r.get("changed", True))) for r in results]

    def desire(self, name: str, desired: str) -> dict[str, Any]:
        """Set a pod's desired state (``running``, ``stopped``, ``deleted``); returns the record."""
        result = self.memory.set_desired(self._pod_name(name), desired)
        record: dict[str, Any] = result.get("pod", result)
        self.offer(record)
        if desired != "running" and (recorder := self.recorder) is not None:
            recorder.record(record["name"], "Killing", f"stopping the pod: it is wanted {desired}",
                            uid=record["uid"])
        return record

    def _applied_events(self, records: list[dict[str, Any]]) -> None:
        """Scheduled for a new pod, Applied for one whose spec or desired state changed."""
        recorder = self.recorder
        if recorder is None:
            return
        for r in records:
            workload = (r.get("spec") or {}).get("workload") or r["name"]
            if r.get("generation", 1) == 1:
                recorder.record(r["name"], "Scheduled", f"accepted on this node (workload {workload})",
                                uid=r["uid"])
            else:
                recorder.record(r["name"], "Applied", f"wanted running at generation {r['generation']}",
                                uid=r["uid"])

    def log_file(self, name: str, container: str = "") -> str:
        """The path of a container's current log file (created empty if it has not started)."""
        return self._log_file(name, container)

    def Delete(self, request: pb.DeleteRequest, context: grpc.ServicerContext) -> pb.DeleteResponse:
        return self._call(context, lambda: self._delete(request))

    def _delete(self, request: pb.DeleteRequest) -> pb.DeleteResponse:
        given = [f for f, set_ in (("name", request.name), ("workload", request.workload),
                                   ("all", request.all)) if set_]
        if len(given) != 1:
            raise InvalidArgument("give one of a pod name, a workload or all", given[-1] if given else "name")
        if request.name:
            return pb.DeleteResponse(pod=self._desire(request.name, "deleted"))
        # Many pods in one transaction: their events reach the reconciler as one batch.
        names = self.memory.delete_many(request.workload or None)
        if (recorder := self.recorder) is not None:
            for name in names:
                recorder.record(name, "Killing", "stopping the pod: it is wanted deleted")
        log.info("deleted", extra={"workload": request.workload or None, "pods": len(names)})
        return pb.DeleteResponse(deleted=names)

    def Stop(self, request: pb.StopRequest, context: grpc.ServicerContext) -> pb.StopResponse:
        return pb.StopResponse(pod=self._call(context, lambda: self._desire(request.name, "stopped")))

    def _desire(self, name: str, desired: str) -> pb.Pod:
        return pod_message(self.desire(name, desired))

    def Resize(self, request: pb.ResizeRequest, context: grpc.ServicerContext) -> pb.ResizeResponse:
        return self._call(context, lambda: self._resize(request))

    def _resize(self, request: pb.ResizeRequest) -> pb.ResizeResponse:
        record = self._record(request.name)
        spec = resize.resized_spec(record, request.container, request.cpu, request.memory)
        resize.check_memory(record, spec, self.usage_of, "memory")
        with self.apply_locks.keys({("pod", record["name"]), ("workload", spec.get("workload", ""))}):
            # fenced: a pod applied or deleted since it was read is not resized (Conflict)
            result = self.memory.apply(record["name"], spec, uid=record["uid"],
                                       generation=record["generation"])
        self.offer(result["pod"])
        log.info("resize asked", extra={"pod": record["name"], "container": request.container})
        return pb.ResizeResponse(pod=pod_message(result["pod"]))

    def Get(self, request: pb.GetRequest, context: grpc.ServicerContext) -> pb.Pod:
        return self._call(context, lambda: pod_message(self._record(request.name)))

    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> ListReply:
        return self._call(context, lambda: self._list(request))

    def _list(self, request: pb.ListRequest) -> ListReply:
        """Pods in name order, read from memory a page at a time (bounded IPC frames): first each
        pod's (name, uid, version), then only the records not already converted. A pod name is
        the continue token, so a page starts after it whatever changed meanwhile."""
        after = _continue_from(request.continue_token) if request.continue_token else None
        if len(request.workload) > 253:  # no workload has such a name
            return ListReply.of([])
        workload = request.workload or None
        if request.limit:
            limit = min(request.limit, MAX_LIST_PAGE)
            stamps = self.memory.stamps(after=after, limit=limit + 1, workload=workload)  # +1: more?
            token = stamps[limit - 1][0] if len(stamps) > limit else ""
            return ListReply.of(self._pods(stamps[:limit]), token)
        pods = []
        while True:
            stamps = self.memory.stamps(after=after, limit=MEMORY_PAGE, workload=workload)
            pods.extend(self._pods(stamps))
            if len(stamps) < MEMORY_PAGE:
                return ListReply.of(pods)
            after = stamps[-1][0]

    def _pods(self, stamps: list[tuple[str, str, int]]) -> list[bytes]:
        """The messages of the pods stamped (name, uid, version), in that order: from the cache,
        else read from memory (a pod removed since it was stamped is left out)."""
        found = {name: self._messages.cached(name, uid, version) for name, uid, version in stamps}
        missing = [name for name, message in found.items() if message is None]
        if missing:
            for record in self.memory.list(names=missing, encoded=True):
                found[record["name"]] = self._messages.put(record)
        return [message for message in found.values() if message is not None]

    def NodeInfo(self, request: pb.NodeInfoRequest, context: grpc.ServicerContext) -> pb.NodeInfoResponse:
        def run() -> pb.NodeInfoResponse:
            resources = self.monitor.call("node.resources")
            realtime = self.monitor.call("node.realtime")
            try:
                proxy = json.dumps(self.monitor.call("proxy.stats"))
            except RikletError:     # an older monitor: the node's figures still answer
                proxy = ""
            return pb.NodeInfoResponse(resources_json=json.dumps(resources),
                                       realtime_json=json.dumps(realtime), proxy_json=proxy)
        return self._call(context, run)

    # -- images ------------------------------------------------------------------------------

    def _image_runtime(self) -> Any:
        if self.images is None:
            raise Unavailable("no containerd runtime is configured on this node", "image")
        return self.images

    def ListImages(self, request: pb.ListImagesRequest, context: grpc.ServicerContext
                   ) -> pb.ListImagesResponse:
        def run() -> pb.ListImagesResponse:
            return pb.ListImagesResponse(images=[
                pb.Image(name=i.name, digest=i.digest, size=i.size, created_at=i.created_at)
                for i in self._image_runtime().images()])
        return self._call(context, run)

    def RemoveImage(self, request: pb.RemoveImageRequest, context: grpc.ServicerContext
                    ) -> pb.RemoveImageResponse:
        def run() -> pb.RemoveImageResponse:
            ref = _image_ref(request.image)
            return pb.RemoveImageResponse(image=self._image_runtime().remove_image(ref))
        return self._call(context, run)

    def PullImage(self, request: pb.PullImageRequest, context: grpc.ServicerContext
                  ) -> Iterator[pb.PullProgress]:
        ref = self._call(context, lambda: _image_ref(request.image))
        runtime = self._call(context, self._image_runtime)
        messages: queue.Queue[Any] = queue.Queue()
        result: list[Any] = []

        def pull() -> None:
            try:
                result.append(runtime.pull(ref, messages.put, messages.put))
            except RikletError as exc:
                result.append(exc)
            finally:
                messages.put(None)

        threading.Thread(target=pull, name="pull", daemon=True).start()
        while (msg := messages.get()) is not None:
            yield pull_progress(msg)
        outcome = result[0] if result else Unavailable("the pull ended without a result", "image")
        if isinstance(outcome, RikletError):
            context.abort(_GRPC_CODES[outcome.code], str(outcome))
        yield pb.PullProgress(message=f"pulled {outcome}", done=True, image=str(outcome))

    def ImportImage(self, request_iterator: Iterator[pb.ImageChunk], context: grpc.ServicerContext
                    ) -> pb.ImportImageResponse:
        runtime = self._call(context, self._image_runtime)
        fd, path = tempfile.mkstemp(prefix="riklet-import-", suffix=".tar")
        try:
            size = 0
            with os.fdopen(fd, "wb") as fh:
                for chunk in request_iterator:
                    size += len(chunk.data)
                    if size > MAX_IMPORT:
                        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                      f"data: archive larger than {MAX_IMPORT >> 30} GiB")
                    fh.write(chunk.data)
            if size == 0:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "data: the archive is empty")
            names = self._call(context, lambda: runtime.import_archive(path))
            return pb.ImportImageResponse(images=names)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)

    # -- streams -----------------------------------------------------------------------------

    def Logs(self, request: pb.LogsRequest, context: grpc.ServicerContext) -> Iterator[pb.LogChunk]:
        path = self._call(context, lambda: self._log_file(request.name, request.container))
        stop = threading.Event()
        context.add_callback(stop.set)
        for chunk in self._call(context, lambda: logs.stream(path, request, stop)):
            yield pb.LogChunk(data=chunk)

    def _log_file(self, name: str, container: str) -> str:
        record = self._record(name)
        names = [c["name"] for c in record["spec"].get("containers", [])]
        if not container:
            if len(names) != 1:
                raise InvalidArgument(f"the pod has containers {', '.join(names)}: name one", "container")
            container = names[0]
        if container not in names:
            raise NotFound(f"no container {container!r} in pod {name} ({', '.join(names)})", "container")
        path = self.log_path(record["name"], container)
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "ab").close()  # not started yet: follow waits for output
        return path

    def Watch(self, request: pb.WatchRequest, context: grpc.ServicerContext) -> Iterator[pb.PodEvent]:
        only = request.name
        if only:
            self._call(context, lambda: self._pod_name(only))
        q: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue(maxsize=10000)
        with self._watch_lock:
            self._watchers.append(q)
        context.add_callback(lambda: q.put(None))
        try:
            for record in sorted(self.mirror.pods().values(), key=lambda p: p["name"]):
                if not only or record["name"] == only:
                    yield pb.PodEvent(kind="snapshot", pod=pod_message(record))
            while True:
                item = q.get()
                if item is None:
                    return
                kind, record = item
                if not only or record["name"] == only:
                    yield pb.PodEvent(kind=kind, pod=pod_message(record), seq=int(self.mirror.seq))
        finally:
            with self._watch_lock:
                self._watchers.remove(q)

    def Exec(self, request_iterator: Iterator[pb.ExecInput], context: grpc.ServicerContext
             ) -> Iterator[pb.ExecOutput]:
        try:
            if self.execs is None:
                raise Unavailable("exec is not available on this node", "exec")
            yield from self.execs.stream(request_iterator, context)
        except RikletError as exc:
            context.abort(_GRPC_CODES[exc.code], bounded(str(exc), MAX_GRPC_MESSAGE_BYTES))

    def on_change(self, name: str, record: dict[str, Any] | None, previous: dict[str, Any] | None) -> None:
        """Called by the mirror for every pod change; fans out to Watch streams."""
        if record is None:
            kind, record = "removed", previous or {"name": name}
        elif previous is None or previous.get("spec") != record.get("spec"):
            kind = "applied"
        elif previous.get("desired") != record.get("desired"):
            kind = "desired"
        else:
            kind = "status"
        with self._watch_lock:
            for q in self._watchers:
                # A stuck client loses events rather than the manager its memory.
                with contextlib.suppress(queue.Full):
                    q.put_nowait((kind, record))

