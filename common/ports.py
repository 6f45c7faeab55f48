"""Host ports: a workload may only claim node ports that nothing else holds."""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from common import holders
from common.errors import Conflict
from common.model import Workload, host_ports

if TYPE_CHECKING:  # the proxy imports this module too, and needs no memory client
    from common.memclient import MemoryClient


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


def wanted_ports(workload: Workload) -> set[tuple[str, int]]:
    """The host ports a workload asks for (every replica has the same spec)."""
    return host_ports(workload.pods[0][1]) if workload.pods else set()


class ApplyView:
    """What an apply of ``workload`` must see, read by memory's indexes instead of every pod:
    the pods it names, the pods of its workload (replica shrink, port ownership) and the pods
    claiming a port it asks for (whatever their desired state), in name order. Iterating it
    gives those records; :meth:`claimed` asks memory for the ports claimed in a range."""

    def __init__(self, memory: MemoryClient, workload: Workload) -> None:
        self._memory = memory
        self.records = memory.query([n for n, _ in workload.pods], workload.name,
                                    sorted(wanted_ports(workload)))
        self._by_name = {r["name"]: r for r in self.records}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    def get(self, name: str) -> dict[str, Any] | None:
        return self._by_name.get(name)

    def claimed(self, low: int, high: int) -> set[tuple[str, int]]:
        """Every (protocol, port) some pod claims between ``low`` and ``high`` inclusive."""
        return self._memory.claimed(low, high)


def check_ports(workload: Workload, current: Iterable[Mapping[str, Any]]) -> None:
    """Raise Conflict naming the port when another workload, or another program on the node,
    holds a port this workload asks for. Ports the workload already holds stay its own.
    ``current`` must hold at least the pods of the workload and those claiming its ports
    (an :class:`ApplyView`); the first by name of another workload's holders is named."""
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
    wanted = wanted_ports(workload)
    for proto, port in sorted(wanted, key=lambda k: (k[1], k[0])):
        if (proto, port) in theirs:
            raise Conflict(f"port {port}/{proto} is already taken by pod {theirs[(proto, port)]}",
                           "spec.containers.ports.port")
        if (proto, port) not in ours and proto != "SCTP" and not bindable(proto, port):
            raise Conflict(taken_message(proto, port), "spec.containers.ports.port")
