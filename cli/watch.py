"""``rikletctl get pods -w``: the table, then a row for each change the ``Watch`` rpc reports,
as ``kubectl get -w`` prints them; ``--watch-only`` leaves out the table. Ctrl-C ends it (exit
130, as a shell reports a command ended by SIGINT); so does the agent closing the stream."""

from __future__ import annotations

import argparse
import json
from typing import Any

import grpc

from cli import output
from cli.pods import pod_listing
from common.pb import node_pb2 as npb


def node_name(ctl: Any) -> str:
    try:
        info = ctl.stub.NodeInfo(npb.NodeInfoRequest(), timeout=10)
    except grpc.RpcError:   # the monitor is down: the pods are shown without their node's name
        return "-"
    return str(json.loads(info.resources_json or "{}").get("id") or "-")


def listing(ctl: Any) -> output.Listing[npb.Pod]:
    """The pod listing of ``ctl``'s output format (``wide`` asks the agent for its node name)."""
    return pod_listing(node_name(ctl) if ctl.fmt == "wide" else "-")


def _shown(pod: npb.Pod, stream: output.Stream[npb.Pod]) -> str:
    """What a row shows of a pod, but its age: a change that does not alter it prints nothing."""
    if stream.fmt in ("table", "wide"):
        cells = stream.listing.cells(pod, stream.fmt == "wide")
        del cells[len(stream.listing.columns) - 1]   # AGE, the table's last column
        return repr(cells)
    return pod.SerializeToString(deterministic=True).hex()


def watch(ctl: Any, args: argparse.Namespace) -> int:
    stream = output.Stream(listing(ctl), ctl.fmt)
    last: dict[str, str] = {}
    if not args.watch_only:
        pods = ([ctl.stub.Get(npb.GetRequest(name=args.name), timeout=10)] if args.name
                else ctl.list_all())
        for line in stream.table(pods):
            print(line, flush=True)
        last = {p.name: _shown(p, stream) for p in pods}
    # The stream's snapshot is the node as the watch began: a pod that changed (or came, or
    # went) since the listing above is printed; the rest was printed already.
    for ev in ctl.stub.Watch(npb.WatchRequest(name=args.name or "")):
        if ev.kind == "snapshot" and args.watch_only:
            last[ev.pod.name] = _shown(ev.pod, stream)
            continue
        shown = _shown(ev.pod, stream) + ("/removed" if ev.kind == "removed" else "")
        if last.get(ev.pod.name) == shown:
            continue
        last[ev.pod.name] = shown
        print(stream.one(ev.pod), flush=True)
    return 0
