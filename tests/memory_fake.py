"""A stand-in for the memory service, written from its contract: ``pod.list`` and ``snapshot``
on a ROUTER socket, numbered ``pod.<name>.<kind>`` events and an ``hb`` heartbeat (every
``HEARTBEAT`` seconds, so a subscriber that lost an event notices) on a PUB socket. Tests and the
monitor benchmark change its pods with :meth:`FakeMemory.put` and :meth:`FakeMemory.remove`,
which publish the event a real memory would."""

from __future__ import annotations

import copy
import threading
import time
from typing import Any

import zmq

from common import ipc
from common.errors import InvalidArgument
from common.zmqutil import route_one

EPOCH = "fake-memory"
HEARTBEAT = 0.5


class FakeMemory:
    def __init__(self, endpoint: str, events_endpoint: str, records: list[dict[str, Any]]) -> None:
        self._lock = threading.Lock()
        self._pods = {r["name"]: r for r in records}
        self._seq = 0
        self.requests: dict[str, int] = {}   # op -> how many times it was asked
        ctx = zmq.Context.instance()
        self.sock: zmq.Socket[Any] = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.pub: zmq.Socket[Any] = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(events_endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(list(self._pods.values()))

    def put(self, record: dict[str, Any]) -> None:
        """Add or replace a pod, publishing ``pod.<name>.applied``."""
        with self._lock:
            self._pods[record["name"]] = record
            self._publish(f"pod.{record['name']}.applied", {"kind": "applied", "pod": record})

    def remove(self, name: str) -> None:
        with self._lock:
            record = self._pods.pop(name)
            self._publish(f"pod.{name}.removed", {"kind": "removed", "name": name, "uid": record.get("uid")})

    def _publish(self, topic: str, data: dict[str, Any]) -> None:
        self._seq += 1
        # Called under self._lock: a ZeroMQ socket is not thread-safe.
        self.pub.send_multipart(ipc.encode_event(ipc.Event(topic=topic, seq=self._seq, data=data)))

    def _handle(self, req: ipc.Request) -> Any:
        self.requests[req.op] = self.requests.get(req.op, 0) + 1
        with self._lock:
            pods = copy.deepcopy(list(self._pods.values()))
            if req.op == "pod.list":
                return {"pods": pods}
            if req.op == "snapshot":
                return {"seq": self._seq, "epoch": EPOCH, "pods": pods}
        raise InvalidArgument(f"unknown op {req.op!r}", "op")

    def _serve(self) -> None:
        beat = time.monotonic()
        while not self._stop.is_set():
            if self.sock.poll(50):
                route_one(self.sock, self._handle)
            if time.monotonic() - beat >= HEARTBEAT:
                beat = time.monotonic()
                with self._lock:
                    hb = ipc.Event(topic="hb", seq=self._seq, data={"seq": self._seq, "epoch": EPOCH})
                    self.pub.send_multipart(ipc.encode_event(hb))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close(linger=0)
        self.pub.close(linger=0)
