"""``rikletctl volume create NAME [--size S] | ls | inspect NAME | rm NAME...``: named volumes."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from common.pb import node_pb2 as npb


def _json(v: npb.Volume, detail: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"name": v.name, "sizeBytes": v.size_bytes or None, "createdAt": v.created_at,
                           "path": v.path}
    if detail:
        out.update(usedBytes=v.used_bytes, pods=list(v.pods))
    return out


def _size(n: int) -> str:
    value, unit = float(n), ""
    for unit in ("", "Ki", "Mi", "Gi", "Ti"):
        if value < 1024 or unit == "Ti":
            break
        value /= 1024
    return f"{value:.4g}{unit}"


def _age(created: float) -> str:
    secs = max(0, int(time.time() - created))
    for span, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if secs >= span:
            return f"{secs // span}{unit}"
    return f"{secs}s"


def run(stub: Any, args: argparse.Namespace, out_json: bool) -> None:
    action = args.action
    if action == "create":
        v = stub.CreateVolume(npb.CreateVolumeRequest(name=args.names[0], size=args.size or ""), timeout=30)
        print(json.dumps(_json(v), indent=2) if out_json else f"volume {v.name} created")
    elif action in ("ls", "list"):
        vols = stub.ListVolumes(npb.ListVolumesRequest(), timeout=30).volumes
        if out_json:
            print(json.dumps([_json(v) for v in vols], indent=2))
            return
        rows = [("NAME", "SIZE", "AGE")] + [(v.name, _size(v.size_bytes) if v.size_bytes else "-",
                                             _age(v.created_at)) for v in vols]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    elif action == "inspect":
        v = stub.InspectVolume(npb.InspectVolumeRequest(name=args.names[0]), timeout=60)
        print(json.dumps(_json(v, detail=True), indent=2))
    else:
        for name in args.names:
            v = stub.RemoveVolume(npb.RemoveVolumeRequest(name=name), timeout=60)
            print(f"volume {v.name} removed")


def add_parser(sub: Any, add: Any, fn: Any) -> None:
    """Register ``volume`` with rikletctl's ``add`` helper; ``fn`` is the Ctl method to call."""
    sp = add("volume", fn, "named volumes: create NAME [--size S], ls, inspect NAME, rm NAME...",
             aliases=["volumes"], output=True)
    sp.add_argument("action", choices=["create", "ls", "list", "inspect", "rm"])
    sp.add_argument("names", nargs="*", metavar="NAME")
    sp.add_argument("--size", help="the volume's size, e.g. 1Gi (recorded, not enforced)")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.action in ("create", "inspect", "rm") and not args.names:
        parser.error(f"volume {args.action}: give a volume name")
    if args.action in ("create", "inspect") and len(args.names) > 1:
        parser.error(f"volume {args.action}: give one volume name")
