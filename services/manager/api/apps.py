"""The seed's App file over the Node API's Apply: deploy is an apply of the app's one-pod
workload (:func:`common.app.app_workload`); destroy deletes the app's pod, and only an app's."""

from __future__ import annotations

from typing import Any

from common.app import App, app_of, app_workload
from common.errors import Conflict, NotFound
from common.pb import node_pb2 as pb
from services.manager.api.listing import pod_message


def apply_app(service: Any, app: App) -> pb.ApplyResponse:
    """``service`` is the NodeService (its memory, apply and desire)."""
    if app.action == "destroy":
        try:
            record = service.memory.get(app.pod)
        except NotFound:
            raise NotFound(f"no app {app.pod} on this node", "metadata.name") from None
        if app_of(record.get("spec") or {}) is None:
            raise Conflict(f"pod {app.pod} was not deployed from an App file: delete it with "
                           "rikletctl delete", "metadata.name")
        service.desire(app.pod, "deleted")
        return pb.ApplyResponse(deleted=[app.pod])
    applied = service.apply_workload(app_workload(app, service.grace_default))
    return pb.ApplyResponse(pods=[pod_message(r) for r, _ in applied], changed=[c for _, c in applied])
