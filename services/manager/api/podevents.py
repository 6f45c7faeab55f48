"""The Node API's Events and Top calls, part of :class:`services.manager.api.node.NodeService`.

Events replays what memory keeps, then (with ``follow``) streams what the recorder stores from
then on: the follower is taken before memory is read, and live events numbered at or below the
last number memory had given are skipped, so nothing falls between and nothing comes twice.

Top formats the monitor's last sample (its ``node.realtime`` and ``pods.realtime``): no second
sampler.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import grpc

from common.errors import InvalidArgument
from common.model import dns_label
from common.pb import node_pb2 as pb
from common.podevent import PodEvent
from services.manager.podevents import Recorder

T = TypeVar("T")
MAX_LIMIT = 1000


def event_message(e: Mapping[str, Any] | PodEvent) -> pb.Event:
    d = e.to_dict() if isinstance(e, PodEvent) else e
    return pb.Event(seq=int(d.get("seq") or 0), pod=str(d["pod"]), uid=str(d.get("uid") or ""),
                    time=float(d["time"]), type=str(d["type"]), reason=str(d["reason"]),
                    message=str(d.get("message") or ""), container=str(d.get("container") or ""),
                    count=int(d.get("count") or 1))


def _figure(value: object) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def pod_usage(p: Mapping[str, Any]) -> pb.PodUsage:
    """A pod's usage from the monitor's RealtimePod: CPU as a share of its capacity, memory as
    capacity minus free."""
    cpu, mem = p.get("cpu") or {}, p.get("memory") or {}
    capacity = _figure(cpu.get("totalCpu"))
    total = int(_figure(mem.get("totalMemory")))
    return pb.PodUsage(name=str(p.get("appId") or ""),
                       cpu_cores=round(capacity * _figure(cpu.get("currentUsage")) / 100.0, 4),
                       memory_bytes=max(0, total - int(_figure(mem.get("freeMemory")))),
                       cpu_limit_cores=capacity, memory_limit_bytes=total)


class EventsApi:
    """Mixed into NodeService: needs its ``memory``, ``monitor``, ``recorder`` and ``_call``."""

    memory: Any
    monitor: Any
    recorder: Recorder | None
    _call: Callable[..., Any]

    def Events(self, request: pb.EventsRequest, context: grpc.ServicerContext) -> Iterator[pb.Event]:
        pod = self._call(context, lambda: dns_label(request.pod, "pod")) if request.pod else None
        if request.limit > MAX_LIMIT:
            self._call(context, lambda: _refuse(f"at most {MAX_LIMIT}", "limit"))
        follower = None
        if request.follow:
            if self.recorder is None:
                self._call(context, lambda: _refuse("this node records no events", "follow"))
            else:
                follower = self.recorder.follow(pod)
                context.add_callback(follower.close)
        try:
            stored = self._call(context, lambda: self.memory.list_events(
                pod, request.after_seq or None, request.limit or MAX_LIMIT))
            for e in stored["events"]:
                yield event_message(e)
            if follower is None:
                return
            last = max(int(stored["last"]), request.after_seq)
            while True:
                try:
                    event = follower.get(timeout=5.0)
                except queue.Empty:
                    if not context.is_active():
                        return
                    continue
                if event is None:
                    if follower.overflowed:
                        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                      f"this stream fell behind; follow again with after_seq={last}")
                    return
                if event.seq > last:
                    last = event.seq
                    yield event_message(event)
        finally:
            if follower is not None:
                follower.close()

    def Top(self, request: pb.TopRequest, context: grpc.ServicerContext) -> pb.TopResponse:
        def run() -> pb.TopResponse:
            node = self.monitor.call("node.realtime")
            pods = self.monitor.call("pods.realtime").get("pods") or []
            cpu, mem = node.get("cpu") or {}, node.get("memory") or {}
            cores = _figure(cpu.get("totalCpu"))
            total = int(_figure(mem.get("totalMemory")))
            running = sorted((pod_usage(p) for p in pods if p.get("state") == "RUNNING"),
                             key=lambda u: u.name)
            return pb.TopResponse(
                cpu_cores=round(cores * _figure(cpu.get("currentUsage")) / 100.0, 4),
                cpu_capacity=int(cores), memory_bytes=max(0, total - int(_figure(mem.get("freeMemory")))),
                memory_capacity=total, pods=running, node=str(node.get("id") or ""))
        result: pb.TopResponse = self._call(context, run)
        return result


def _refuse(message: str, field: str) -> None:
    raise InvalidArgument(message, field)
