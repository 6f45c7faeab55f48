"""A RIK scheduler for tests, written from the worker contract (not from riklet's code).

It behaves as the RIK scheduler does toward its workers: ``Register`` refuses an empty hostname
(FAILED_PRECONDITION) and a hostname already registered and live (ALREADY_EXISTS), answers with
a stream of ``InstanceScheduling``; a worker is Ready once a ``WorkerMetric`` with status RUNNING
arrives; a worker is dropped, and its instances forgotten, when its Register stream closes.
Everything received is kept, with its arrival time, for assertions.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import empty_pb2

from common import pb

pb.ensure()
from common.pb import rik_common_pb2 as cpb  # noqa: E402
from common.pb import rik_worker_pb2 as wpb  # noqa: E402
from common.pb import rik_worker_pb2_grpc as wpb_grpc  # noqa: E402

STATUS = {v.number: v.name for v in cpb.ResourceStatus.DESCRIPTOR.values}


@dataclass
class Received:
    at: float                 # time.monotonic() on arrival
    identifier: str
    kind: str                 # "worker" or "instance"
    status: str               # ResourceStatus name
    metrics: Any              # the decoded JSON (or the raw text if it is not JSON)
    instance_id: str = ""


@dataclass
class Worker:
    hostname: str
    outbox: queue.Queue[wpb.InstanceScheduling | None] = field(default_factory=queue.Queue)
    ready: bool = False
    registered_at: float = field(default_factory=time.monotonic)


class TestScheduler(wpb_grpc.WorkerServicer):
    __test__ = False  # not a pytest class

    def __init__(self, port: int) -> None:
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.workers: dict[str, Worker] = {}
        self.received: list[Received] = []
        self.registrations: list[tuple[float, str]] = []
        self._lock = threading.Condition()
        self._server: grpc.Server | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> TestScheduler:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
        wpb_grpc.add_WorkerServicer_to_server(self, self._server)
        if self._server.add_insecure_port(self.address) == 0:
            raise RuntimeError(f"cannot listen on {self.address}")
        self._server.start()
        return self

    def stop(self) -> None:
        with self._lock:
            for w in self.workers.values():
                w.outbox.put(None)
        if self._server is not None:
            self._server.stop(grace=0).wait()

    # -- the contract ------------------------------------------------------------------------

    def Register(self, request: cpb.WorkerRegistration, context: grpc.ServicerContext
                 ) -> Iterator[wpb.InstanceScheduling]:
        hostname = request.hostname
        if not hostname:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "hostname is required")
        with self._lock:
            if hostname in self.workers:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"worker {hostname} is already registered")
            worker = Worker(hostname)
            self.workers[hostname] = worker
            self.registrations.append((time.monotonic(), hostname))
            self._lock.notify_all()

        def drop() -> None:
            with self._lock:
                if self.workers.get(hostname) is worker:
                    del self.workers[hostname]
                worker.outbox.put(None)
                self._lock.notify_all()

        context.add_callback(drop)
        while context.is_active():
            try:
                item = worker.outbox.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None:
                return
            yield item

    def SendStatusUpdates(self, request_iterator: Iterator[cpb.WorkerStatus],
                          context: grpc.ServicerContext) -> empty_pb2.Empty:
        for update in request_iterator:
            kind = update.WhichOneof("status")
            if kind is None:
                continue
            body = update.instance if kind == "instance" else update.worker
            try:
                metrics = json.loads(body.metrics) if body.metrics else None
            except ValueError:
                metrics = body.metrics
            rec = Received(time.monotonic(), update.identifier, kind, STATUS.get(body.status, "?"),
                           metrics, update.instance.instance_id if kind == "instance" else "")
            with self._lock:
                self.received.append(rec)
                worker = self.workers.get(update.identifier)
                if kind == "worker" and rec.status == "RUNNING" and worker is not None:
                    worker.ready = True
                self._lock.notify_all()
        return empty_pb2.Empty()

    # -- driving and asserting ---------------------------------------------------------------

    def schedule(self, hostname: str, instance_id: str, definition: str | dict[str, Any],
                 action: str = "CREATE") -> None:
        text = definition if isinstance(definition, str) else json.dumps(definition)
        with self._lock:
            worker = self.workers[hostname]
        worker.outbox.put(wpb.InstanceScheduling(
            instance_id=instance_id, definition=text, action=cpb.WorkloadRequestKind.Value(action)))

    def wait(self, predicate: Any, timeout: float = 20.0, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"scheduler: timed out waiting for {what}")
                self._lock.wait(min(left, 0.2))

    def wait_ready(self, hostname: str, timeout: float = 20.0) -> None:
        self.wait(lambda: (w := self.workers.get(hostname)) is not None and w.ready, timeout,
                  f"worker {hostname} Ready")

    def instance_statuses(self, instance_id: str) -> list[str]:
        with self._lock:
            return [r.status for r in self.received if r.kind == "instance" and r.instance_id == instance_id]

    def wait_instance(self, instance_id: str, status: str, timeout: float = 20.0) -> Received:
        def last() -> Received | None:
            found = [r for r in self.received if r.kind == "instance" and r.instance_id == instance_id]
            return found[-1] if found and found[-1].status == status else None
        result: Received = self.wait(last, timeout, f"instance {instance_id} {status}")
        return result

    def worker_metrics(self, hostname: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.kind == "worker" and r.identifier == hostname]
