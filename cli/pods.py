"""Pods, apps, images and volumes as rikletctl lists them: one :class:`cli.output.Listing` each
(table columns, the extra columns of ``-o wide``, the json/yaml document, the ``-o name`` kind)."""

from __future__ import annotations

import json
import time
from typing import Any

from cli.output import Listing
from common.app import app_of
from common.pb import node_pb2 as npb


def age(created: float) -> str:
    secs = max(0, int(time.time() - created))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit}"
    return f"{secs}s"


def pod_json(pod: npb.Pod) -> dict[str, Any]:
    status = json.loads(pod.status_json or "{}")
    spec = json.loads(pod.spec_json or "{}")
    limits = {c.get("name"): c.get("resources") for c in status.get("containers") or []
              if isinstance(c, dict) and c.get("resources")}
    return {
        "name": pod.name, "uid": pod.uid, "workload": pod.workload, "phase": pod.phase,
        "reason": pod.reason or None, "message": pod.message or None, "desired": pod.desired,
        "version": pod.version, "generation": pod.generation, "createdAt": pod.created_at,
        "restartCount": pod.restart_count, "ready": pod.ready,
        "exitCode": status.get("exitCode"), "conditions": status.get("conditions") or [],
        "containers": [{
            "name": c.name, "state": c.state, "pid": c.pid or None, "restartCount": c.restart_count,
            "exitCode": c.exit_code if c.has_exit_code else None, "reason": c.reason or None,
            "startedAt": c.started_at or None, "finishedAt": c.finished_at or None,
            "ready": c.ready, "started": c.started,
            "lastTerminationReason": c.last_termination_reason or None,
            "resources": limits.get(c.name),
        } for c in pod.containers],
        "ports": spec.get("ports", []),
        "endpoints": [{"host_port": e.host_port or None, "protocol": e.protocol,
                       "address": e.address, "port": e.port} for e in pod.endpoints],
        "spec": spec,
    }


def _pod_row(p: npb.Pod) -> tuple[str, ...]:
    ready = f"{sum(1 for c in p.containers if c.ready)}/{len(p.containers)}"
    pids = ",".join(str(c.pid) for c in p.containers if c.pid and c.state == "running") or "-"
    ports = ",".join(f"{e.host_port}->{e.port}/{e.protocol.lower()}" if e.host_port
                     else f"{e.port}/{e.protocol.lower()}" for e in p.endpoints) or "-"
    phase = f"{p.phase} ({p.reason})" if p.reason else p.phase
    return p.name, ready, phase, str(p.restart_count), pids, ports, age(p.created_at)


def _pod_wide(p: npb.Pod, node: str) -> tuple[str, ...]:
    status = json.loads(p.status_json or "{}")
    spec = json.loads(p.spec_json or "{}")
    images = ",".join(str(c.get("image")) for c in spec.get("containers") or []
                      if isinstance(c, dict) and c.get("image")) or "-"
    return status.get("internalIp") or "-", node, images, p.workload or p.name


def pod_listing(node: str = "-") -> Listing[npb.Pod]:
    """Pods; ``node`` is the NODE column of ``-o wide`` (the node's id)."""
    return Listing("pod", ("NAME", "READY", "PHASE", "RESTARTS", "PID", "PORTS", "AGE"), _pod_row,
                   pod_json, lambda p: p.name, ("IP", "NODE", "IMAGES", "WORKLOAD"),
                   lambda p: _pod_wide(p, node))


def image_listing() -> Listing[npb.Image]:
    return Listing("image", ("NAME", "DIGEST", "AGE"), lambda i: (i.name, i.digest[:19], age(i.created_at)),
                   lambda i: {"name": i.name, "digest": i.digest, "size": i.size, "createdAt": i.created_at},
                   lambda i: i.name, ("SIZE", "FULL DIGEST"), lambda i: (size_text(i.size), i.digest))


def size_text(n: int) -> str:
    value, unit = float(n), ""
    for unit in ("", "Ki", "Mi", "Gi", "Ti"):
        if value < 1024 or unit == "Ti":
            break
        value /= 1024
    return f"{value:.4g}{unit}"


def volume_doc(v: npb.Volume, detail: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"name": v.name, "sizeBytes": v.size_bytes or None, "createdAt": v.created_at,
                           "path": v.path}
    if detail:
        out.update(usedBytes=v.used_bytes, pods=list(v.pods))
    return out


def volume_listing() -> Listing[npb.Volume]:
    return Listing("volume", ("NAME", "SIZE", "AGE"),
                   lambda v: (v.name, size_text(v.size_bytes) if v.size_bytes else "-", age(v.created_at)),
                   volume_doc, lambda v: v.name, ("PATH",), lambda v: (v.path,))


def app_listing(status: Any) -> Listing[npb.Pod]:
    """Apps (pods made from the seed's App file); ``status`` is :func:`cli.apps.app_status`."""
    def doc(p: npb.Pod) -> dict[str, Any]:
        return {"name": p.name, "status": status(p), "createdAt": p.created_at, "phase": p.phase,
                "reason": p.reason or None, "app": dict(app_of(json.loads(p.spec_json or "{}")) or {})}
    return Listing("app", ("NAME", "STATUS", "AGE"), lambda p: (p.name, status(p), age(p.created_at)),
                   doc, lambda p: p.name, ("PHASE", "RESTARTS"), lambda p: (p.phase, str(p.restart_count)))
