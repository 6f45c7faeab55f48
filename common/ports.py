"""Host ports: a workload may only claim node ports that nothing else holds."""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterable, Mapping
from typing import Any

from common import holders
from common.errors import Conflict
from common.model import Workload, host_ports


def bindable(protocol: str, port: int) -> bool:
    """Whether the proxy could hold the port alone on every address now (EADDRINUSE/EACCES:
    no; any other failure is raised). UDP is probed with no reuse option: a holder with
    SO_REUSEADDR would let a probe with it bind too, and then share the port's datagrams."""
    kind = socket.SOCK_DGRAM if protocol == "UDP" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as s:
        if kind == socket.SOCK_STREAM:
            # TCP refuses a second listener whatever its options; this only ignores the
            # TIME_WAIT remains of connections that are over.
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def taken_message(protocol: str, port: int) -> str:
    """The error of a port another program holds, naming that program when it can be found."""
    return f"port {port}/{protocol} is in use on the node by {holders.describe(protocol, port)}"


def check_ports(workload: Workload, current: Iterable[Mapping[str, Any]]) -> None:
    """Raise Conflict naming the port when another workload, or another program on the node,
    holds a port this workload asks for. Ports the workload already holds stay its own."""
    ours: set[tuple[str, int]] = set()
    theirs: dict[tuple[str, int], str] = {}
    for record in current:
        if record.get("desired") == "deleted":
            continue
        owner = record["spec"].get("workload")
        for key in host_ports(record["spec"]):
            if owner == workload.name:
                ours.add(key)
            else:
                theirs.setdefault(key, record["name"])
    wanted = host_ports(workload.pods[0][1]) if workload.pods else set()
    for proto, port in sorted(wanted, key=lambda k: (k[1], k[0])):
        if (proto, port) in theirs:
            raise Conflict(f"port {port}/{proto} is already taken by pod {theirs[(proto, port)]}",
                           "spec.containers.ports.port")
        if (proto, port) not in ours and proto != "SCTP" and not bindable(proto, port):
            raise Conflict(taken_message(proto, port), "spec.containers.ports.port")
