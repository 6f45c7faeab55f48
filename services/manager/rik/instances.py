"""RIK instances as riklet pods: pure functions, no I/O.

A CREATE's ``definition`` (RIK's workload JSON) becomes one pod named after the instance id.
``replicas`` is the scheduler's business (it spreads instances over nodes), so one instance is
always one replica here. A pod record, a refused CREATE or a removed pod becomes the
``(ResourceStatus, metrics JSON)`` pair the scheduler is told.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.errors import InvalidArgument
from common.model import MAX_MANIFEST_BYTES, Workload, load_json, parse_workload
from common.pb import rik_common_pb2 as cpb
from common.pod import Desired, Phase, desired_of, phase_of
from common.rik import pod_name_for, status_of

MAX_DEFINITION_BYTES = MAX_MANIFEST_BYTES
MAX_INSTANCE_ID = 253

FUNCTION_UNSUPPORTED = ("kind Function runs as a micro-VM from a rootfs image, and this node has no "
                        "micro-VM runtime configured")


@dataclass(frozen=True)
class Report:
    """What the scheduler is told about one instance."""
    instance_id: str
    status: int            # common.ResourceStatus
    metrics: str           # JSON text


def load_definition(text: str) -> dict[str, Any]:
    """Decode a definition: size first (before any parsing work), then JSON, then shape."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_DEFINITION_BYTES:
        raise InvalidArgument(f"definition is {size} bytes, more than the {MAX_DEFINITION_BYTES} accepted",
                              "definition")
    data = _drop_nulls(load_json(text, "definition", MAX_DEFINITION_BYTES))
    if not isinstance(data, dict):
        raise InvalidArgument("the workload must be a JSON object", "definition")
    return data


def _drop_nulls(value: Any) -> Any:
    # RIK serializes an absent optional field (Rust's Option::None) as null: null means absent.
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def is_function(data: Mapping[str, Any]) -> bool:
    return data.get("kind") == "Function"


def instance_workload(data: Mapping[str, Any], instance_id: str, grace: float) -> Workload:
    """The one pod an instance runs: the definition's spec for one replica, tagged with the
    instance id (how the pod is known as the scheduler's) and the definition's name."""
    if not instance_id or len(instance_id) > MAX_INSTANCE_ID:
        raise InvalidArgument(f"expected 1 to {MAX_INSTANCE_ID} characters", "instance_id")
    replicas = data.get("replicas", 1)
    # Checked for its type only: how many there are across the cluster is not this node's concern.
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        raise InvalidArgument("expected a non-negative integer", "replicas")
    workload = parse_workload({**data, "replicas": 1}, grace)
    _, spec = workload.pods[0]
    return Workload(name=workload.name, kind=workload.kind,
                    pods=((pod_name_for(instance_id), {**spec, "instance_id": instance_id}),))


def _metrics(**fields: Any) -> str:
    return json.dumps(fields, sort_keys=True)


def pod_report(instance_id: str, record: Mapping[str, Any]) -> Report:
    status = record.get("status") or {}
    return Report(instance_id, status_of(record), _metrics(
        pod=record.get("name"), workload=(record.get("spec") or {}).get("workload"),
        phase=phase_of(record).value, desired=desired_of(record).value,
        reason=status.get("reason"), message=status.get("message"), exitCode=status.get("exitCode"),
        restartCount=int(status.get("restartCount") or 0)))


def removed_report(instance_id: str, record: Mapping[str, Any] | None) -> Report:
    """The pod is gone from the node: the final word on the instance."""
    status = (record or {}).get("status") or {}
    return Report(instance_id, int(cpb.TERMINATED), _metrics(
        pod=(record or {}).get("name"), phase=Phase.TERMINATED.value, desired=Desired.DELETED.value,
        reason="Deleted",
        message=None, exitCode=status.get("exitCode"), restartCount=int(status.get("restartCount") or 0)))


def unknown_report(instance_id: str) -> Report:
    """DESTROY of an instance this node does not run: it is as terminated as it gets."""
    return Report(instance_id, int(cpb.TERMINATED), _metrics(
        pod=None, phase=Phase.TERMINATED.value, reason="NotFound", message="no such instance on this node",
        exitCode=None, restartCount=0))


def rejected_report(instance_id: str, reason: str, message: str, field: str | None) -> Report:
    """A CREATE that could not become a pod; ``field`` names what is at fault."""
    return Report(instance_id, int(cpb.FAILED), _metrics(
        pod=None, phase="Error", reason=reason, message=message, field=field,
        exitCode=None, restartCount=0))
