"""rikletctl's ``events``, ``describe pod`` and ``top``: what happened to pods, one pod in full,
and CPU and memory in use now (printed as kubectl prints them)."""

from __future__ import annotations

import argparse
import datetime
import json
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc

from cli.output import DOCS
from common import pb

pb.ensure()
from common.pb import node_pb2 as npb  # noqa: E402  (generated just above when missing)

Add = Callable[..., argparse.ArgumentParser]
EXITS = ("Failed", "OOMKilled", "Completed")


def age(at: float, now: float | None = None) -> str:
    """kubectl's short age: 42s, 5m, 3h, 2d."""
    secs = max(0, int((time.time() if now is None else now) - at))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit}"
    return f"{secs}s"


def stamp(at: float | None) -> str:
    if not at:
        return "-"
    when = datetime.datetime.fromtimestamp(at, datetime.UTC)
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


def cpu_text(cores: float) -> str:
    return f"{round(cores * 1000)}m"


def memory_text(size: int) -> str:
    return f"{size // 2**20}Mi"


def table(rows: Sequence[Sequence[str]], indent: str = "") -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        line = "   ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True))
        print(indent + line.rstrip(), flush=True)


def event_json(e: npb.Event) -> dict[str, Any]:
    return {"seq": e.seq, "pod": e.pod, "uid": e.uid, "time": e.time, "type": e.type, "reason": e.reason,
            "message": e.message, "container": e.container or None, "count": e.count}


def event_row(e: npb.Event) -> tuple[str, str, str, str, str]:
    return age(e.time), e.type, e.reason, f"pod/{e.pod}", e.message


HEADER = ("LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE")


def events(ctl: Any, args: argparse.Namespace) -> None:
    req = npb.EventsRequest(pod=args.pod or "", follow=args.watch)
    stream = ctl.stub.Events(req, timeout=None if args.watch else 30)
    if ctl.json:
        if args.watch:   # one object a line, as they come
            for e in stream:
                print(json.dumps(event_json(e)), flush=True)
        else:
            ctl.print_doc([event_json(e) for e in stream])
        return
    if not args.watch:
        rows = [event_row(e) for e in stream]
        if rows:
            table([HEADER, *rows])
        else:
            print("No events found." if not args.pod else f"No events found for pod {args.pod}.")
        return
    print("   ".join(HEADER), flush=True)
    for e in stream:
        print("   ".join(event_row(e)), flush=True)


def _resources(c: dict[str, Any]) -> str:
    res = c.get("resources") or {}
    parts = []
    if res.get("cpu_millis"):
        parts.append(f"cpu: {res['cpu_millis']}m")
    if res.get("memory_bytes"):
        parts.append(f"memory: {memory_text(int(res['memory_bytes']))}")
    return ", ".join(parts) or "none"


def _ports(c: dict[str, Any], spec: dict[str, Any]) -> str:
    ports = c.get("ports") or [p for p in spec.get("ports") or [] if p.get("container") == c.get("name")]
    return ", ".join(f"{p['port']}->{p.get('target_port')}/{p.get('protocol', 'TCP')}" if p.get("port")
                     else f"{p.get('target_port')}/{p.get('protocol', 'TCP')}" for p in ports) or "none"


def _state(c: dict[str, Any]) -> list[str]:
    state = str(c.get("state") or "waiting").capitalize()
    lines = [f"State:          {state}"]
    if c.get("state") == "running":
        lines.append(f"  Started:      {stamp(c.get('startedAt'))}")
    else:
        for label, key in (("Reason", "reason"), ("Exit Code", "exitCode"), ("Signal", "signal")):
            if c.get(key) is not None:
                lines.append(f"  {label + ':':<13} {c[key]}")
        if c.get("finishedAt"):
            lines.append(f"  Finished:     {stamp(c['finishedAt'])}")
        if c.get("nextRestartAt"):
            lines.append(f"  Restart At:   {stamp(c['nextRestartAt'])}")
    return lines


def _last_state(name: str, c: dict[str, Any], evs: Iterable[npb.Event]) -> str:
    """The container's previous end, from its events (a status says only how it is now)."""
    if c.get("state") != "running":
        return ""
    started = c.get("startedAt") or 0
    ends = [e for e in evs if e.container == name and e.reason in EXITS and e.time <= started]
    return f"Terminated at {stamp(ends[-1].time)}: {ends[-1].message}" if ends else ""


def describe(ctl: Any, args: argparse.Namespace) -> None:
    pod = ctl.stub.Get(npb.GetRequest(name=args.name), timeout=10)
    evs = list(ctl.stub.Events(npb.EventsRequest(pod=args.name), timeout=30))
    status, spec = json.loads(pod.status_json or "{}"), json.loads(pod.spec_json or "{}")
    try:
        info = ctl.stub.NodeInfo(npb.NodeInfoRequest(), timeout=10)
        node = json.loads(info.resources_json or "{}").get("id") or "<unknown>"
    except grpc.RpcError:   # the monitor is down: the pod is shown without its node's name
        node = "<unknown>"
    phase = f"{pod.phase} ({pod.reason})" if pod.reason else pod.phase
    for label, value in (("Name", pod.name), ("Workload", pod.workload or pod.name), ("Node", node),
                         ("UID", pod.uid), ("Start Time", stamp(status.get("startedAt"))),
                         ("Phase", phase), ("Message", pod.message or ""), ("Desired", pod.desired),
                         ("IP", status.get("internalIp") or "-"), ("Restarts", str(pod.restart_count))):
        if value:
            print(f"{label + ':':<14}{value}")
    print("Containers:")
    states = {c.get("name"): c for c in status.get("containers") or []}
    for c in spec.get("containers") or []:
        name, st = c.get("name", ""), states.get(c.get("name"), {})
        print(f"  {name}:")
        if c.get("image"):
            print(f"    Image:          {c['image']}")
        if c.get("command") or c.get("args"):
            print(f"    Command:        {' '.join([*(c.get('command') or []), *(c.get('args') or [])])}")
        for line in _state(st):
            print(f"    {line}")
        last = _last_state(name, st, evs)
        if last:
            print(f"    Last State:     {last}")
        ready = st.get("ready", st.get("state") == "running")
        print(f"    Ready:          {str(bool(ready)).lower()}")
        print(f"    Restart Count:  {int(st.get('restartCount') or 0)}")
        print(f"    Resources:      {_resources(c)}")
        print(f"    Ports:          {_ports(c, spec)}")
    print("Events:")
    if not evs:
        print("  <none>")
        return
    table([("TYPE", "REASON", "AGE", "TIME", "MESSAGE"),
           *((e.type, e.reason, age(e.time), stamp(e.time), e.message) for e in evs)], indent="  ")


def top(ctl: Any, args: argparse.Namespace) -> None:
    reply = ctl.stub.Top(npb.TopRequest(), timeout=10)
    if args.what in ("node", "nodes"):
        cpu_pct = round(100 * reply.cpu_cores / reply.cpu_capacity) if reply.cpu_capacity else 0
        mem_pct = round(100 * reply.memory_bytes / reply.memory_capacity) if reply.memory_capacity else 0
        if ctl.json:
            ctl.print_doc({"name": reply.node, "cpuCores": reply.cpu_cores, "cpuPercent": cpu_pct,
                              "cpuCapacity": reply.cpu_capacity, "memoryBytes": reply.memory_bytes,
                              "memoryPercent": mem_pct, "memoryCapacity": reply.memory_capacity})
            return
        table([("NAME", "CPU(cores)", "CPU%", "MEMORY(bytes)", "MEMORY%"),
               (reply.node or "-", cpu_text(reply.cpu_cores), f"{cpu_pct}%", memory_text(reply.memory_bytes),
                f"{mem_pct}%")])
        return
    pods = [p for p in reply.pods if not args.name or p.name == args.name]
    if ctl.json:
        ctl.print_doc([{"name": p.name, "cpuCores": p.cpu_cores, "memoryBytes": p.memory_bytes,
                           "cpuLimitCores": p.cpu_limit_cores, "memoryLimitBytes": p.memory_limit_bytes}
                          for p in pods])
        return
    if not pods:
        print("No running pods.")
        return
    table([("NAME", "CPU(cores)", "MEMORY(bytes)"),
           *((p.name, cpu_text(p.cpu_cores), memory_text(p.memory_bytes)) for p in pods)])


def register(add: Add) -> None:
    """The commands, added to rikletctl's parser by its ``add`` helper."""
    sp = add("events", events, "what happened to pods (or one pod), oldest first", output=DOCS)
    sp.add_argument("pod", nargs="?", help="only this pod's events")
    sp.add_argument("-w", "--watch", action="store_true", help="then print new events as they happen")
    sp = add("describe", describe, "one pod in full: containers, state, resources, events")
    sp.add_argument("what", choices=["pod", "pods", "po"])
    sp.add_argument("name")
    sp = add("top", top, "CPU and memory in use now: top node, top pods [NAME]", output=DOCS)
    sp.add_argument("what", choices=["node", "nodes", "pod", "pods", "po"])
    sp.add_argument("name", nargs="?")
