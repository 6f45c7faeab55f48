"""``rikletctl volume create NAME [--size S] | ls | inspect NAME | rm NAME...``: named volumes."""

from __future__ import annotations

import argparse
from typing import Any

from cli import output
from cli.pods import volume_doc, volume_listing
from common.pb import node_pb2 as npb


def run(stub: Any, args: argparse.Namespace, fmt: str) -> None:
    action, out_json = args.action, fmt in ("json", "yaml")
    if action == "create":
        v = stub.CreateVolume(npb.CreateVolumeRequest(name=args.names[0], size=args.size or ""), timeout=30)
        print(output.dump(volume_doc(v), fmt).rstrip("\n") if out_json else f"volume {v.name} created")
    elif action in ("ls", "list"):
        vols = stub.ListVolumes(npb.ListVolumesRequest(), timeout=30).volumes
        output.emit(volume_listing(), vols, fmt)
    elif action == "inspect":
        v = stub.InspectVolume(npb.InspectVolumeRequest(name=args.names[0]), timeout=60)
        print(output.dump(volume_doc(v, detail=True), "yaml" if fmt == "yaml" else "json").rstrip("\n"))
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
