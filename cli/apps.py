"""Apps (the seed's App file, :mod:`common.app`) as rikletctl shows them: ``get apps`` prints
``NAME STATUS AGE``; deleting or destroying one prints ``APP deleted on NODE``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from cli import output
from cli.pods import app_listing
from common.app import app_of
from common.pb import node_pb2 as npb


def is_app(pod: npb.Pod) -> bool:
    return app_of(json.loads(pod.spec_json or "{}")) is not None


def app_status(pod: npb.Pod) -> str:
    """One word from the pod's phase, as the seed's list shows (``Completed``): Running,
    Pending, Creating, Completed, Stopped, Terminating, or the reason of an error
    (``ErrImagePull``, ``OOMKilled``, else ``Error``)."""
    if pod.desired == "deleted" or pod.phase == "Terminating":
        return "Terminating"
    if pod.phase == "Terminated":
        return "Completed" if pod.reason == "Completed" else "Stopped"
    if pod.phase == "Error":
        return pod.reason or "Error"
    return pod.phase or "Pending"


def show(pods: Sequence[npb.Pod], fmt: str = "table") -> None:
    """``get apps``: the apps among ``pods``, in any of rikletctl's output formats."""
    listed = [p for p in pods if app_of(json.loads(p.spec_json or "{}")) is not None]
    output.emit(app_listing(app_status), listed, fmt)


def node_name(stub: Any) -> str:
    """The node's name as the agent reports it (its node id)."""
    info = stub.NodeInfo(npb.NodeInfoRequest(), timeout=10)
    return str(json.loads(info.resources_json or "{}").get("id") or "this node")


def deleted_line(stub: Any, pod: npb.Pod, name: str) -> str:
    return f"{name} deleted on {node_name(stub)}" if is_app(pod) else f"pod/{name} deleted"


def applied_lines(stub: Any, reply: npb.ApplyResponse) -> list[str]:
    """``apply -f``'s report: an app deployed, an app destroyed, or pods configured."""
    if reply.deleted:
        node = node_name(stub)
        return [f"{name} deleted on {node}" for name in reply.deleted]
    return [f"app/{pod.name} {'deployed' if changed else 'unchanged'}" if is_app(pod)
            else f"pod/{pod.name} {'configured' if changed else 'unchanged'}"
            for pod, changed in zip(reply.pods, reply.changed, strict=False)]
