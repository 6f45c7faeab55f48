"""The manager's link to a RIK scheduler (RIK mode: ``scheduler.address`` is set).

- The ``Register`` stream, on its own thread: registers the node id, turns each
  ``InstanceScheduling`` into a pod write (CREATE) or a delete (DESTROY), and when the stream
  ends or fails registers again after a jittered back-off.
- Instance state, through one :class:`StatusSender`: each change of a scheduler-made pod that
  the manager's PodMirror sees, and, after every (re)connection of either stream, the current
  state of every instance, so that a restarted scheduler converges.

Workloads never depend on the link: a lost scheduler leaves them running.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import grpc

from common.errors import Conflict, ErrorCode, InvalidArgument, NotFound, RikletError
from common.memclient import MemoryClient, PodMirror
from common.model import Workload
from common.pb import rik_common_pb2 as cpb
from common.pb import rik_worker_pb2 as wpb
from common.pb import rik_worker_pb2_grpc as wpb_grpc
from common.pod import instance_id_of
from common.policy import Policy
from common.ports import ApplyView, check_ports
from common.rik import CHANNEL_OPTIONS, Backoff, StatusSender, describe, pod_name_for
from services.manager.applylocks import ApplyLocks
from services.manager.podevents import NullRecorder, Records
from services.manager.rik import instances
from services.manager.rik.instances import Report
from services.manager.volumes.store import VolumeStore, check_claims

log = logging.getLogger(__name__)

# A Register call still open after this long was accepted: a refusal (ALREADY_EXISTS...) comes at
# once, while an accepted stream may stay silent until the first instance is scheduled.
SETTLE = 1.0
# Above the definition limit, so that a huge definition is refused as FAILED for its instance
# instead of breaking the stream (and with it the registration) on the size check of gRPC.
MAX_MESSAGE = 16 * 1024 * 1024
REJECTED_KEPT = 1024
_REASONS = {ErrorCode.CONFLICT: "Conflict", ErrorCode.UNAVAILABLE: "Unavailable",
            ErrorCode.TIMEOUT: "Unavailable"}


class SchedulerLink:
    def __init__(self, address: str, node_id: str, memory: MemoryClient, mirror: PodMirror,
                 poke: Callable[[str], None], write_locks: ApplyLocks, grace: float,
                 policy: Policy | None = None,
                 offer: Callable[[dict[str, Any]], None] | None = None,
                 volumes: VolumeStore | None = None) -> None:
        self.address = address
        self.volumes = volumes   # named volumes a pod may claim
        self.policy = policy or Policy()
        self.node_id = node_id
        self.memory = memory
        self.mirror = mirror
        self.poke = poke
        self.offer = offer or (lambda record: poke(record["name"]))   # see NodeService.offer
        self.recorder: Records = NullRecorder()   # pod events: Scheduled, Killing
        self.write_locks = write_locks  # shared with the Node API: applies that could meet take turns
        self.grace = grace
        self.sender = StatusSender(address, node_id, on_connect=self.resend_all)
        self.registered = threading.Event()
        self._backoff = Backoff()
        self._report_lock = threading.RLock()
        self._told: dict[str, tuple[str, int, tuple[int, str]]] = {}  # instance -> uid, version, report
        self._rejected: OrderedDict[str, Report] = OrderedDict()       # refused CREATEs, no pod
        self._state = ""
        self._call: Any = None
        self._call_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rik-register", daemon=True)

    def start(self) -> None:
        self.sender.start()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._call_lock:
            call = self._call
        if call is not None:
            call.cancel()  # tells the scheduler at once that this registration is over
        self._thread.join(timeout=5)
        self.sender.stop()

    # -- reporting ---------------------------------------------------------------------------

    def on_change(self, name: str, record: dict[str, Any] | None, before: dict[str, Any] | None) -> None:
        """Every pod change the manager's mirror sees, in order; reports scheduler-made pods."""
        if record is not None:
            instance_id = instance_id_of(record)
            if instance_id:
                self._tell(instances.pod_report(instance_id, record), record)
        elif before is not None and (instance_id := instance_id_of(before)):
            self._tell(instances.removed_report(instance_id, before))
            with self._report_lock:
                self._told.pop(instance_id, None)

    def resend_all(self) -> None:
        """The current state of every instance, after a (re)connection: the scheduler may have
        forgotten them (a restart) or missed transitions (a broken stream)."""
        with self._report_lock:  # the mirror is read under the lock: no older state can follow
            reported = set()
            for record in self.mirror.pods().values():
                instance_id = instance_id_of(record)
                if instance_id:
                    self._tell(instances.pod_report(instance_id, record), record, force=True)
                    reported.add(instance_id)
            for instance_id, report in self._rejected.items():
                if instance_id not in reported:
                    self._send(report)

    def _tell(self, report: Report, record: Mapping[str, Any] | None = None, force: bool = False) -> None:
        with self._report_lock:
            told = self._told.get(report.instance_id)
            key = (report.status, report.metrics)
            if record is not None:
                uid, version = str(record.get("uid", "")), int(record.get("version", 0))
                if told is not None and told[0] == uid and version < told[1]:
                    return  # older than what was already told (a write's reply racing the mirror)
                if told is not None and told[2] == key and not force:
                    return  # a change the scheduler does not see (a pid, an endpoint)
                self._told[report.instance_id] = (uid, version, key)
            self._send(report)

    def _send(self, report: Report) -> None:
        self.sender.send_instance(report.instance_id, report.status, report.metrics)

    def _reject(self, instance_id: str, reason: str, message: str, field: str | None) -> None:
        log.warning("instance refused", extra={"instance": instance_id, "reason": reason,
                                               "field": field, "error": message})
        report = instances.rejected_report(instance_id, reason, message, field)
        with self._report_lock:
            self._rejected.pop(instance_id, None)
            self._rejected[instance_id] = report
            while len(self._rejected) > REJECTED_KEPT:
                self._rejected.popitem(last=False)
            self._send(report)

    # -- scheduling --------------------------------------------------------------------------

    def _handle(self, item: wpb.InstanceScheduling) -> None:
        instance_id = item.instance_id
        try:
            if item.action == cpb.CREATE:
                self._create(instance_id, item.definition)
            elif item.action == cpb.DESTROY:
                self._destroy(instance_id)
            else:
                self._reject(instance_id, "InvalidRequest", f"unknown action {item.action}", "action")
        except Exception:  # the stream, and every other instance, outlive a bug in this one
            log.exception("handling an instance failed", extra={"instance": instance_id})
            self._reject(instance_id, "InternalError", "riklet failed on this instance; see its log", None)

    def _create(self, instance_id: str, definition: str) -> None:
        try:
            data = instances.load_definition(definition)
            if instances.is_function(data):
                self._reject(instance_id, "RuntimeUnavailable", instances.FUNCTION_UNSUPPORTED, "kind")
                return
            workload = instances.instance_workload(data, instance_id, self.grace)
        except InvalidArgument as exc:
            self._reject(instance_id, "InvalidDefinition", exc.message, exc.field)
            return
        try:
            result = self._write(workload, instance_id)
        except RikletError as exc:
            self._reject(instance_id, _REASONS.get(exc.code, "Error"), exc.message, exc.field)
            return
        record = result["pod"]
        log.info("instance created", extra={"instance": instance_id, "pod": record["name"],
                                            "changed": result.get("changed", True)})
        with self._report_lock:
            self._rejected.pop(instance_id, None)
        if result.get("changed", True):
            self.recorder.record(record["name"], "Scheduled", f"instance {instance_id} of the RIK scheduler",
                                 uid=record["uid"])
        self.offer(record)
        # The same CREATE again (a restarted scheduler) changes nothing, so no change event
        # will report it: say where the instance stands now.
        self._tell(instances.pod_report(instance_id, record), record, force=not result.get("changed", True))

    def _write(self, workload: Workload, instance_id: str) -> dict[str, Any]:
        name, spec = workload.pods[0]
        with self.write_locks.hold(workload):
            current = ApplyView(self.memory, workload)  # by memory's indexes, not every pod
            existing = current.get(name)
            if existing is not None and instance_id_of(existing) != instance_id:
                raise Conflict(f"pod {name} exists on this node and is not this instance's", "instance_id")
            self.policy.check(spec)
            check_claims(spec, self.volumes)
            check_ports(workload, current)
            return self.memory.apply(name, spec)

    def _destroy(self, instance_id: str) -> None:
        name = pod_name_for(instance_id)
        with self._report_lock:
            was_rejected = self._rejected.pop(instance_id, None) is not None
        try:
            try:
                existing: dict[str, Any] | None = self.memory.get(name)
            except NotFound:
                existing = None
            result = None
            if existing is not None and instance_id_of(existing) == instance_id:
                # Fenced to the record just checked: never a pod put under this name since.
                result = self.memory.set_desired(name, "deleted", uid=existing["uid"],
                                                 generation=existing["generation"])
        except RikletError as exc:  # memory away for longer than the client's patience
            self._reject(instance_id, _REASONS.get(exc.code, "Error"), f"not destroyed: {exc.message}",
                         exc.field)
            return
        if result is None:
            log.info("DESTROY of an instance not on this node", extra={"instance": instance_id,
                                                                       "refused_before": was_rejected})
            self._send(instances.unknown_report(instance_id))
            return
        record = result.get("pod", result)
        self.recorder.record(name, "Killing", f"stopping the pod: the RIK scheduler destroyed instance "
                             f"{instance_id}", uid=record.get("uid"))
        log.info("instance destroying", extra={"instance": instance_id, "pod": name})
        self.poke(name)
        self._tell(instances.pod_report(instance_id, record), record, force=True)

    # -- the Register stream -----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._session()
            self._stop.wait(self._backoff.next())

    def _session(self) -> None:
        channel = grpc.insecure_channel(
            self.address, options=[*CHANNEL_OPTIONS, ("grpc.max_receive_message_length", MAX_MESSAGE)])
        try:
            call = wpb_grpc.WorkerStub(channel).Register(cpb.WorkerRegistration(hostname=self.node_id))
            with self._call_lock:
                self._call = call
            if self._stop.is_set():
                call.cancel()
            timer = threading.Timer(SETTLE, self._accepted, (call,))
            timer.daemon = True
            timer.start()
            try:
                for item in call:
                    self._accepted(call)
                    self._handle(item)
            finally:
                timer.cancel()
            self._set_state("ended", "the scheduler closed the registration stream; registering again")
        except grpc.RpcError as exc:
            self._failed(exc)
        finally:
            with self._call_lock:
                self._call = None
                self.registered.clear()
            channel.close()

    def _accepted(self, call: Any) -> None:
        with self._call_lock:
            if self.registered.is_set() or call is not self._call or not call.is_active():
                return
            self.registered.set()
        self._backoff.reset()
        self._set_state("registered", "registered with the scheduler")
        self.resend_all()

    def _failed(self, exc: grpc.RpcError) -> None:
        if self._stop.is_set():
            return
        code = exc.code() if isinstance(exc, grpc.Call) else None
        details = describe(exc)
        if code == grpc.StatusCode.ALREADY_EXISTS:
            # Our previous stream not yet closed on its side (a manager restart), or another
            # node with the same id: retried with back-off either way.
            self._set_state("refused", "the scheduler already has a live registration for this node "
                            "id; retrying", details)
        elif code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            self._set_state("unreachable", "scheduler unreachable; retrying with back-off", details)
        else:
            self._set_state(f"error:{code}", "registration stream failed; retrying with back-off", details)

    def _set_state(self, state: str, message: str, details: str = "") -> None:
        """Logs once per change of state, not once per attempt."""
        with self._call_lock:
            if state == self._state:
                return
            self._state = state
        level = logging.INFO if state in ("registered", "ended") else logging.WARNING
        extra = {"scheduler": self.address, "node": self.node_id}
        log.log(level, message, extra={**extra, "error": details} if details else extra)
