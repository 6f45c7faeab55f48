"""The Node API's named-volume rpcs (CreateVolume, ListVolumes, InspectVolume, RemoveVolume)
and the check an apply makes of the volumes its pods claim.

A mixin of :class:`services.manager.api.node.NodeService`: it uses the service's ``_call``,
``memory``, ``apply_locks`` and ``volumes`` (a :class:`VolumeStore`, or None on a node without
one). Create and remove hold the volume's apply-lock key, as an apply claiming it does (see
:mod:`services.manager.volumes.store`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from common.errors import Unavailable
from common.memclient import MemoryClient
from common.model import dns_label
from common.pb import node_pb2 as pb
from common.units import parse_memory
from services.manager.applylocks import ApplyLocks
from services.manager.volumes.store import VolumeInfo, VolumeStore, check_claims, claimed_by, usage

__all__ = ["VolumeRpcs", "check_claims"]

_PAGE = 500   # pods read from memory at a time when looking for a volume's users


def _message(info: VolumeInfo, pods: list[str] | None = None, used: int = 0) -> pb.Volume:
    return pb.Volume(name=info.name, size_bytes=info.size_bytes or 0, created_at=info.created_at,
                     path=info.path, used_bytes=used, pods=pods or [])


class VolumeRpcs:
    memory: MemoryClient
    apply_locks: ApplyLocks
    volumes: VolumeStore | None
    _call: Callable[..., Any]

    def _store(self) -> VolumeStore:
        if self.volumes is None:
            raise Unavailable("this node keeps no named volumes", "name")
        return self.volumes

    def users(self, name: str) -> list[str]:
        """The pods memory holds (in any state, Terminating included) that claim ``name``."""
        pods: list[str] = []
        after = None
        while True:
            page = self.memory.list(after=after, limit=_PAGE)
            pods.extend(claimed_by(page, name))
            if len(page) < _PAGE:
                return pods
            after = page[-1]["name"]

    def CreateVolume(self, request: pb.CreateVolumeRequest, context: grpc.ServicerContext) -> pb.Volume:
        def run() -> pb.Volume:
            name = dns_label(request.name, "name")
            size = parse_memory(request.size, "size") if request.size else None
            with self.apply_locks.keys([("volume", name)]):
                return _message(self._store().create(name, size))
        result: pb.Volume = self._call(context, run)
        return result

    def ListVolumes(self, request: pb.ListVolumesRequest, context: grpc.ServicerContext
                    ) -> pb.ListVolumesResponse:
        def run() -> pb.ListVolumesResponse:
            return pb.ListVolumesResponse(volumes=[_message(v) for v in self._store().all()])
        result: pb.ListVolumesResponse = self._call(context, run)
        return result

    def InspectVolume(self, request: pb.InspectVolumeRequest, context: grpc.ServicerContext) -> pb.Volume:
        def run() -> pb.Volume:
            info = self._store().get(request.name)
            return _message(info, self.users(info.name), usage(info.path))
        result: pb.Volume = self._call(context, run)
        return result

    def RemoveVolume(self, request: pb.RemoveVolumeRequest, context: grpc.ServicerContext) -> pb.Volume:
        def run() -> pb.Volume:
            name = dns_label(request.name, "name")
            with self.apply_locks.keys([("volume", name)]):
                return _message(self._store().remove(name, self.users))
        result: pb.Volume = self._call(context, run)
        return result
