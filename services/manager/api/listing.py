"""Pods as the Node API shows them: the message of a record, and List replies built from each
pod's encoding, cached per (uid, version) and joined without copying a message."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import Any

import grpc

from common.pb import node_pb2 as pb
from common.pb import node_pb2_grpc as pb_grpc


def pod_message(record: Mapping[str, Any]) -> pb.Pod:
    """A record as the API shows it; memory's ``encoded`` form (List) keeps the documents as the
    JSON text memory stored, so the spec is never decoded nor encoded again."""
    if "status_json" in record:
        status_json, spec_json, workload = record["status_json"], record["spec_json"], record["workload"]
        status = json.loads(status_json)
    else:
        status, spec = record.get("status") or {}, record.get("spec") or {}
        status_json, spec_json, workload = json.dumps(status), json.dumps(spec), spec.get("workload", "")
    containers = []
    for c in status.get("containers") or []:
        code = c.get("exitCode")
        containers.append(pb.ContainerStatus(
            name=c.get("name") or "", state=c.get("state") or "", pid=int(c.get("pid") or 0),
            restart_count=int(c.get("restartCount") or 0), has_exit_code=code is not None,
            exit_code=int(code or 0), reason=c.get("reason") or "",
            started_at=float(c.get("startedAt") or 0), finished_at=float(c.get("finishedAt") or 0),
            ready=bool(c.get("ready", c.get("state") == "running")), started=bool(c.get("started")),
            last_termination_reason=c.get("lastTerminationReason") or ""))
    endpoints = [pb.Endpoint(host_port=int(e.get("host_port") or 0), protocol=e.get("protocol", ""),
                             address=e.get("address", ""), port=int(e.get("port") or 0))
                 for e in status.get("endpoints") or []]
    return pb.Pod(
        name=record["name"], uid=record.get("uid", ""), workload=workload,
        phase=status.get("phase", ""), reason=status.get("reason") or "",
        message=status.get("message") or "", desired=record.get("desired", ""),
        version=int(record.get("version", 0)), generation=int(record.get("generation", 0)),
        created_at=float(record.get("created_at", 0)),
        restart_count=int(status.get("restartCount") or 0), containers=containers,
        endpoints=endpoints, spec_json=spec_json, status_json=status_json,
        ready=status.get("phase") == "Running" and status.get("ready") is not False)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2): tag, length, bytes."""
    return _varint(number << 3 | 2) + _varint(len(data)) + data


_LIST_PODS = pb.ListResponse.DESCRIPTOR.fields_by_name["pods"].number
_LIST_TOKEN = pb.ListResponse.DESCRIPTOR.fields_by_name["continue_token"].number


class ListReply:
    """A ListResponse already serialized: the pods' encodings, cached, joined as they are.
    Served through :func:`add_to_server`, whose List serializer passes it on untouched."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    @classmethod
    def of(cls, pods: list[bytes], continue_token: str = "") -> ListReply:
        token = _field(_LIST_TOKEN, continue_token.encode()) if continue_token else b""
        return cls(b"".join(pods) + token)


def _serialize_list(reply: pb.ListResponse | ListReply) -> bytes:
    return reply.data if isinstance(reply, ListReply) else reply.SerializeToString()


class _ListServed:
    """What the generated registration sees as the server: it hands over the method handlers,
    and List's is given a serializer that passes a ListReply on as it is."""

    def __init__(self, server: grpc.Server, service: Any) -> None:
        self._server, self._service = server, service

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass   # the same handlers come to add_registered_method_handlers, and go on from there

    def add_registered_method_handlers(self, name: str, handlers: dict[str, Any]) -> None:
        handlers = {**handlers, "List": grpc.unary_unary_rpc_method_handler(
            self._service.List, request_deserializer=pb.ListRequest.FromString,
            response_serializer=_serialize_list)}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
        getattr(self._server, "add_registered_method_handlers")(name, handlers)  # noqa: B009 (untyped)


def add_to_server(service: Any, server: grpc.Server) -> None:
    """Register the Node API; List answers with bytes built from each pod's cached encoding."""
    pb_grpc.add_NodeServicer_to_server(service, _ListServed(server, service))


class PodMessages:
    """Each pod at its (uid, version) as the API shows it, already encoded as a field of a List
    reply, so that a List converts and fetches only the pods that changed since the one before
    and copies no message (converting and encoding are most of a List's cost). Bounded: the
    oldest entries go beyond ``limit`` (pods long removed, or past a node's worth)."""

    def __init__(self, limit: int = 10000) -> None:
        self._limit = limit
        self._messages: dict[str, tuple[tuple[str, int], bytes]] = {}
        self._lock = threading.Lock()

    def cached(self, name: str, uid: str, version: int) -> bytes | None:
        with self._lock:
            hit = self._messages.get(name)
        return hit[1] if hit is not None and hit[0] == (uid, version) else None

    def put(self, record: Mapping[str, Any]) -> bytes:
        encoded = _field(_LIST_PODS, pod_message(record).SerializeToString())
        with self._lock:
            self._messages.pop(record["name"], None)  # re-inserted last: the newest
            self._messages[record["name"]] = ((record["uid"], record["version"]), encoded)
            while len(self._messages) > self._limit:
                del self._messages[next(iter(self._messages))]
        return encoded
