"""UDP forwarding: one listening socket per route, one flow per client address.

A flow is a connected UDP socket to the endpoint chosen (round robin) when the client's first
datagram arrived, plus (up to :data:`MAX_CONNECTED` per route) a client socket: bound to the
port and to the local address the client wrote to, and connected to the client. The kernel
then delivers that client's datagrams to the client socket, and replies leave through it, so
the client sees them come from the address it sent to and no address is converted either way.
Flows without a client socket go through the listening socket; on a wildcard address it reads
each datagram's destination (IP_PKTINFO) and replies name it as their source. Flows are bounded
(the least recently used is evicted when the table is full) and expire after an idle period.
Datagrams that find a full socket buffer are dropped and counted: UDP promises nothing more,
and queueing would only add latency.

The sockets are read with ``loop.add_reader`` rather than a DatagramTransport: every datagram
lands in one preallocated buffer (``recv_into``) and leaves from a view of it, with no bytes
object or protocol call per datagram. Flow times use a clock updated by the sweep timer, so
the per-datagram work is one dict lookup; idle expiry is accurate to that timer's interval.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from services.proxy.routes import Endpoint, RoundRobin, family_of
from services.proxy.stats import Stats

log = logging.getLogger(__name__)

MAX_FLOWS = 4096
IDLE_TIMEOUT = 60.0
MAX_DATAGRAM = 65535
BURST = 64   # datagrams read per wake-up, so one busy socket cannot starve the loop
# Flows per route given a client socket of their own. Kernels before 6.14 find a datagram's
# socket by scanning every socket bound to the port, so the number is kept modest; flows
# beyond it are served through the listening socket.
MAX_CONNECTED = 256
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)     # Linux's value; Python 3.11 does not name it
_ANC_SIZE = socket.CMSG_SPACE(32)


def _local_address(ancillary: list[tuple[int, int, bytes]]) -> str:
    """The destination address of a datagram, from its IP_PKTINFO / IPV6_PKTINFO."""
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            return socket.inet_ntop(socket.AF_INET, data[8:12])
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 16:
            return socket.inet_ntop(socket.AF_INET6, data[:16])
    raise OSError("datagram without its destination address")


def _source(family: socket.AddressFamily, local: str) -> list[tuple[int, int, bytes]]:
    """Ancillary data that makes a reply leave from ``local``."""
    if family == socket.AF_INET6:
        return [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO,
                 socket.inet_pton(socket.AF_INET6, local) + struct.pack("I", 0))]
    return [(socket.IPPROTO_IP, IP_PKTINFO,
             struct.pack("i", 0) + socket.inet_pton(socket.AF_INET, local) + b"\0\0\0\0")]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class FlowTable(Generic[K, V]):
    """A bounded map kept in least-recently-used order, with the time each key was last used."""

    def __init__(self, max_flows: int = MAX_FLOWS) -> None:
        if max_flows < 1:
            raise ValueError("max_flows must be at least 1")
        self.max_flows = max_flows
        # Public for the UDP hot loop, which inlines get-and-touch; otherwise use the methods.
        self.items_map: OrderedDict[K, V] = OrderedDict()
        self.seen: dict[K, float] = {}

    def __len__(self) -> int:
        return len(self.items_map)

    def __contains__(self, key: object) -> bool:
        return key in self.items_map

    def get(self, key: K) -> V | None:
        return self.items_map.get(key)

    def touch(self, key: K, now: float) -> V | None:
        """The value for ``key``, marked as just used; None if there is none."""
        value = self.items_map.get(key)
        # Already marked at this ``now``: with a coarse clock that is most datagrams.
        if value is not None and self.seen[key] != now:
            self.items_map.move_to_end(key)
            self.seen[key] = now
        return value

    def add(self, key: K, value: V, now: float) -> list[tuple[K, V]]:
        """Insert ``key``; returns the entries evicted to stay within the bound."""
        self.items_map[key] = value
        self.items_map.move_to_end(key)
        self.seen[key] = now
        evicted = []
        while len(self.items_map) > self.max_flows:
            old, val = self.items_map.popitem(last=False)
            del self.seen[old]
            evicted.append((old, val))
        return evicted

    def pop(self, key: K) -> V | None:
        self.seen.pop(key, None)
        return self.items_map.pop(key, None)

    def expire(self, now: float, idle: float) -> list[tuple[K, V]]:
        """Remove and return the entries unused for ``idle`` seconds (oldest first)."""
        stale = []
        for key in self.items_map:   # LRU order: stop at the first one still in use
            if now - self.seen[key] < idle:
                break
            stale.append(key)
        for key in stale:
            del self.seen[key]
        return [(key, self.items_map.pop(key)) for key in stale]

    def items(self) -> list[tuple[K, V]]:
        return list(self.items_map.items())


class _Flow:
    """One client's flow: ``sock`` is connected to the endpoint; ``csock``, when the route has
    one to spare, is bound to the local address the client wrote to and connected to the
    client, so the kernel hands it that client's datagrams directly and replies leave from the
    right address, with no address to convert either way."""

    __slots__ = ("client", "cmsg", "csock", "endpoint", "recv_into", "reply", "send", "sock",
                 "touched")

    def __init__(self, client: Any, endpoint: Endpoint, sock: socket.socket) -> None:
        self.client = client
        self.endpoint = endpoint
        self.sock = sock
        self.send = sock.send             # bound once: called for every datagram
        self.recv_into = sock.recv_into
        self.touched = 0.0                # the flow clock's value when last marked as used
        self.csock: socket.socket | None = None
        self.reply: Callable[[Any], int] | None = None   # csock.send
        self.cmsg: list[tuple[int, int, bytes]] = []     # source address for replies without csock


def _wildcard(address: str) -> bool:
    return ipaddress.ip_address(address).is_unspecified


class UdpListener:
    """The listening socket of one UDP route and the flows of its clients."""

    def __init__(self, port: int, endpoints: tuple[Endpoint, ...], *, host: str, stats: Stats,
                 max_flows: int = MAX_FLOWS, idle_timeout: float = IDLE_TIMEOUT,
                 max_connected: int = MAX_CONNECTED) -> None:
        self.port = port
        self.host = host
        self.picker = RoundRobin(endpoints)
        self.flows: FlowTable[Any, _Flow] = FlowTable(max_flows)
        self.idle_timeout = idle_timeout
        self.max_connected = max_connected
        self.connected = 0                # flows with a client socket of their own
        self._stats = stats
        self._sock: socket.socket | None = None
        self._family = family_of(host)
        self._pktinfo = _wildcard(host)   # learn which local address each client wrote to
        self._timer: asyncio.TimerHandle | None = None
        self._now = time.monotonic()
        self._buf = bytearray(MAX_DATAGRAM)
        self._view = memoryview(self._buf)

    async def open(self, sock: socket.socket | None = None) -> None:
        """Bind the listening socket, or use ``sock`` (handed over by a predecessor); raises
        OSError (e.g. EADDRINUSE) if the port is taken."""
        if sock is None:
            # Bound with no reuse option, so a port another program holds is refused, with or
            # without SO_REUSEADDR on its side.
            sock = socket.socket(self._family, socket.SOCK_DGRAM)
            try:
                sock.bind((self.host, self.port))
            except OSError:
                sock.close()
                raise
        # The flows' client sockets bind the same port. SO_REUSEPORT lets them, and only
        # sockets of the same user with SO_REUSEPORT too: SO_REUSEADDR here would let any
        # program that sets it bind the port later and take its unicast datagrams.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if self._pktinfo:
            if self._family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        sock.setblocking(False)
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._on_datagrams)
        self._schedule_sweep()

    def fileno(self) -> int | None:
        """The listening socket's descriptor (to hand over to a successor), None when closed."""
        return self._sock.fileno() if self._sock is not None else None

    def set_endpoints(self, endpoints: tuple[Endpoint, ...]) -> None:
        """New flows use the new list; flows to endpoints that left are closed, so their clients'
        next datagram opens a flow to a live endpoint instead of vanishing until idle."""
        self.picker.set(endpoints)
        keep = set(endpoints)
        for client, flow in self.flows.items():
            if flow.endpoint not in keep:
                self._close_flow(client)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for client, _ in self.flows.items():
            self._close_flow(client)
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    # --- listening socket ------------------------------------------------------------------

    def _on_datagrams(self) -> None:
        # Datagrams of new clients, of flows without a client socket, and those that were
        # queued before a flow's client socket existed. The flow table's lookup and LRU touch
        # are inlined, and the counters are added once per wake-up rather than per datagram.
        sock = self._sock
        if sock is None:
            return
        buf, view, now = self._buf, self._view, self._now
        items, seen = self.flows.items_map, self.flows.seen
        pktinfo = self._pktinfo
        count = size = dropped = 0
        try:
            for _ in range(BURST):
                if pktinfo:
                    n, anc, _, addr = sock.recvmsg_into([buf], _ANC_SIZE)
                else:
                    n, addr = sock.recvfrom_into(buf)
                flow = items.get(addr)
                if flow is None:
                    flow = self._open_flow(addr, _local_address(anc) if pktinfo else self.host)
                    if flow is None:
                        dropped += 1
                        continue
                elif seen[addr] != now:
                    items.move_to_end(addr)
                    seen[addr] = now
                if self._forward(flow, view[:n]):
                    count += 1
                    size += n
                else:
                    dropped += 1
        except BlockingIOError:
            pass
        except OSError as exc:
            log.debug("udp listener error", extra={"port": self.port, "error": repr(exc)})
        stats = self._stats
        stats.datagrams_in += count
        stats.bytes_in += size
        stats.datagrams_dropped += dropped

    def _forward(self, flow: _Flow, data: memoryview) -> bool:
        try:
            flow.send(data)
        except BlockingIOError:
            return False
        except OSError as exc:
            # Typically ECONNREFUSED from an earlier ICMP: re-pick on the next datagram.
            log.debug("udp send failed", extra={"endpoint": str(flow.endpoint), "error": repr(exc)})
            self._close_flow(flow.client)
            return False
        return True

    # --- flows -----------------------------------------------------------------------------

    def _open_flow(self, client: Any, local: str) -> _Flow | None:
        loop = asyncio.get_running_loop()
        for ep in self.picker.order():
            sock = socket.socket(family_of(ep.address), socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.connect((ep.address, ep.port))
            except OSError as exc:
                sock.close()
                log.debug("udp flow connect failed", extra={"endpoint": str(ep), "error": repr(exc)})
                continue
            flow = _Flow(client, ep, sock)
            loop.add_reader(sock.fileno(), self._on_reply, flow)
            self._stats.udp_flows_total += 1
            self._stats.udp_flows_active += 1
            for _, old in self.flows.add(client, flow, self._now):
                self._stats.udp_flows_evicted += 1
                self._release(old)
            if self.connected < self.max_connected:
                self._connect_client(flow, local)
            if flow.reply is None and self._pktinfo:
                flow.cmsg = _source(self._family, local)
            return flow
        return None

    def _connect_client(self, flow: _Flow, local: str) -> None:
        csock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            csock.setblocking(False)
            csock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            csock.bind((local, self.port))
            csock.connect(flow.client)
        except OSError as exc:
            # Served through the listening socket instead: slower, not wrong.
            csock.close()
            log.debug("udp client socket failed", extra={"client": str(flow.client), "error": repr(exc)})
            return
        flow.csock, flow.reply = csock, csock.send
        self.connected += 1
        asyncio.get_running_loop().add_reader(csock.fileno(), self._on_client, flow)

    # A flow's sockets are read one datagram per wake-up: the loop's poll reports them again
    # while more are queued, and reading on to EAGAIN cost an exception per datagram or two.

    def _on_client(self, flow: _Flow) -> None:
        csock = flow.csock
        if csock is None:
            return
        try:
            n = csock.recv_into(self._buf)
        except BlockingIOError:
            return
        except OSError as exc:
            log.debug("udp flow error", extra={"endpoint": str(flow.endpoint), "error": repr(exc)})
            self._close_flow(flow.client)
            return
        stats = self._stats
        try:
            flow.send(self._view[:n])
        except OSError:   # a full socket buffer, or a refusal the next datagram will see again
            stats.datagrams_dropped += 1
            return
        stats.datagrams_in += 1
        stats.bytes_in += n
        if flow.touched != self._now:
            flow.touched = self._now
            self.flows.touch(flow.client, self._now)

    def _on_reply(self, flow: _Flow) -> None:
        listen = self._sock
        if listen is None:
            return
        try:
            n = flow.recv_into(self._buf)
        except BlockingIOError:
            return
        except OSError as exc:
            log.debug("udp upstream error", extra={"endpoint": str(flow.endpoint), "error": repr(exc)})
            if self.flows.get(flow.client) is flow:
                self._close_flow(flow.client)
            return
        stats = self._stats
        data = self._view[:n]
        try:
            if flow.reply is not None:
                flow.reply(data)
            elif flow.cmsg:
                listen.sendmsg([data], flow.cmsg, 0, flow.client)
            else:
                listen.sendto(data, flow.client)
        except OSError:   # a full socket buffer: drop, as the network would
            stats.datagrams_dropped += 1
            return
        stats.datagrams_out += 1
        stats.bytes_out += n
        if flow.touched != self._now:
            flow.touched = self._now
            self.flows.touch(flow.client, self._now)

    def _close_flow(self, client: Any) -> None:
        flow = self.flows.pop(client)
        if flow is not None:
            self._release(flow)

    def _release(self, flow: _Flow) -> None:
        self._stats.udp_flows_active -= 1
        loop = asyncio.get_running_loop()
        try:
            loop.remove_reader(flow.sock.fileno())
            if flow.csock is not None:
                loop.remove_reader(flow.csock.fileno())
        finally:
            flow.sock.close()
            if flow.csock is not None:
                flow.csock.close()
                flow.csock = flow.reply = None
                self.connected -= 1

    def _schedule_sweep(self) -> None:
        # Also the tick of the coarse clock: at most 1 s, so flows expire within 1 s of due.
        interval = max(0.05, min(self.idle_timeout / 4, 1.0))
        self._timer = asyncio.get_running_loop().call_later(interval, self._sweep)

    def _sweep(self) -> None:
        self._now = time.monotonic()
        for _, flow in self.flows.expire(self._now, self.idle_timeout):
            self._release(flow)
        self._schedule_sweep()
