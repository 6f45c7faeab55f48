"""Endpoint health for the kernel data path, which cannot see a refused connect by itself.

In userspace mode a refused connect to an endpoint is seen and the next endpoint tried; once the
kernel DNATs the traffic, nobody sees it, so the proxy probes every endpoint it routes to and the
forwarder keeps only the healthy ones in the kernel's maps.

- TCP and SCTP: a non-blocking connect within ``timeout``. An accepted connection is a success
  and is ended at once with no data sent: first a FIN (``shutdown``), so the workload reads an
  ordinary EOF, then a reset (SO_LINGER 0), so the prober keeps no TIME_WAIT socket. A plain
  close would leave one per probe for 60 s (30,000 at 1,000 endpoints every 2 s), and the
  kernel's search for a free ephemeral port among them made each connect cost ten times more
  (19 % of a core instead of 2 % for that load). The FIN travels ahead of the reset, and a socket
  that has read a FIN reports EOF, not the reset. A refusal, a timeout or an
  unreachable host is a failure. A local shortage (no file descriptor, no ephemeral port) is no
  verdict at all: it says nothing about the endpoint.
- UDP: readiness needs the application's protocol, so UDP endpoints are healthy unless
  ``udp_probe`` is set. Then an empty datagram goes to the endpoint on a connected socket, and an
  ICMP port-unreachable (ECONNREFUSED) within ``timeout`` is a failure; silence or an answer is a
  success. Off by default: it sends datagrams to the workload, which may log or answer them, and
  it only finds "nothing bound to the port" (ICMP is rate limited off loopback, so it may miss
  even that).

``fall`` consecutive failures make an endpoint unhealthy, ``rise`` consecutive successes make it
healthy again (:class:`HealthState`, pure). Each endpoint gets a random phase, so the probes are
spread over the interval. The checker wakes once a tick (:data:`TICK`), not once a probe: it
collects the probes that finished (one ``poll`` over their sockets) or timed out, and starts the
ones now due, at most ``max_inflight`` sockets at a time. A verdict is thus up to a tick late, and
probing costs little more than the system calls of the connects themselves.
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import itertools
import logging
import random
import select
import socket
import struct
from collections.abc import Callable, Iterable

from common.errors import InvalidArgument
from services.proxy.routes import Endpoint, family_of

log = logging.getLogger(__name__)

Key = tuple[str, Endpoint]         # (protocol, endpoint): one address and port may serve TCP and UDP
Verdict = bool | None              # None: the probe could not tell (a local shortage)

TICK = 0.05                        # s between wake-ups while probing; shorter for short intervals

_RESET_ON_CLOSE = struct.pack("ii", 1, 0)   # SO_LINGER on, 0 s: close() sends RST, no TIME_WAIT
_STREAM_PROTOCOLS = {"TCP": socket.IPPROTO_TCP, "SCTP": socket.IPPROTO_SCTP}
# Errors that are the prober's own shortage, not the endpoint's fault.
_LOCAL_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                           errno.EADDRNOTAVAIL, errno.EAGAIN, errno.EPROTONOSUPPORT})


class HealthState:
    """One endpoint's health from its probe results, with no I/O: ``fall`` failures in a row
    make it unhealthy, ``rise`` successes in a row make it healthy again. Starts healthy."""

    __slots__ = ("_fall", "_rise", "_run", "healthy")

    def __init__(self, fall: int, rise: int) -> None:
        self._fall, self._rise = fall, rise
        self._run = 0               # results in a row that argue against the current state
        self.healthy = True

    def record(self, ok: Verdict) -> bool:
        """Count one probe result; True if it changed ``healthy``."""
        if ok is None:
            return False
        if ok == self.healthy:
            self._run = 0
            return False
        self._run += 1
        if self._run < (self._fall if self.healthy else self._rise):
            return False
        self.healthy, self._run = ok, 0
        return True


def _verdict(err: int) -> Verdict:
    return True if err == 0 else None if err in _LOCAL_ERRORS else False


class _Probe:
    """One probe's socket, started at once: a connect in progress (TCP, SCTP) or an empty
    datagram sent (UDP). ``early`` is the verdict if one was known at once (then no socket)."""

    __slots__ = ("deadline", "early", "sock", "target", "udp")

    def __init__(self, target: _Target, deadline: float) -> None:
        self.target, self.deadline = target, deadline
        self.udp = target.key[0] == "UDP"
        self.sock: socket.socket | None = None
        self.early: Verdict = None
        try:
            self.sock = self._open(target.key)
            err = self.sock.connect_ex(target.key[1])
            if self.udp and err == 0:
                self.sock.send(b"")          # an ICMP port-unreachable answers it if nobody listens
            elif err != errno.EINPROGRESS:
                self._end_early(_verdict(err))
        except OSError as exc:
            self._end_early(_verdict(exc.errno or errno.EIO))

    @staticmethod
    def _open(key: Key) -> socket.socket:
        proto, endpoint = key
        kind, number = ((socket.SOCK_DGRAM, socket.IPPROTO_UDP) if proto == "UDP"
                        else (socket.SOCK_STREAM, _STREAM_PROTOCOLS[proto]))
        # Non-blocking from the start: two fcntl calls fewer per probe than setblocking(False).
        return socket.socket(family_of(endpoint.address), kind | socket.SOCK_NONBLOCK, number)

    def _end_early(self, verdict: Verdict) -> None:
        self.close()
        self.early = verdict

    @property
    def events(self) -> int:
        return select.POLLIN if self.udp else select.POLLOUT

    def outcome(self) -> Verdict:
        """The verdict once ``poll`` reported the socket: connected or refused, answered or not."""
        assert self.sock is not None
        if not self.udp:
            return _verdict(self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
        try:
            self.sock.recv(1)
        except ConnectionRefusedError:
            return False
        except OSError:
            return None
        return True

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def hang_up(self) -> None:
        """End a connected stream probe: FIN (the workload reads EOF), then a reset instead of
        the TIME_WAIT a plain close would leave here."""
        assert self.sock is not None and not self.udp
        try:
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
        except OSError:
            pass                    # already reset by the workload: nothing is left to end
        self.close()


class _Target:
    """A watched endpoint: its health, when it is due, its probe in flight."""

    __slots__ = ("due", "key", "probe", "state", "watched")

    def __init__(self, key: Key, state: HealthState) -> None:
        self.key, self.state = key, state
        self.due = 0.0
        self.probe: _Probe | None = None
        self.watched = True


def _check(name: str, value: float, minimum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= minimum:
        raise InvalidArgument(f"must be a number >= {minimum}, not {value!r}", name)


class HealthChecker:
    """Probes the watched endpoints on the running loop and calls ``on_change()`` (on the loop,
    at most once a tick) whenever the set of healthy endpoints changes.

    Endpoints are per protocol: ``watch(eps)`` and ``healthy(ep)`` mean TCP; pass ``protocol``
    for SCTP and UDP routes. Each ``watch`` call replaces the set of that protocol only.
    """

    def __init__(self, on_change: Callable[[], None], interval: float = 2.0, timeout: float = 1.0,
                 fall: int = 2, rise: int = 1, *, max_inflight: int = 64,
                 udp_probe: bool = False) -> None:
        for name, value, minimum in (("interval", interval, 0.001), ("timeout", timeout, 0.001),
                                     ("fall", fall, 1), ("rise", rise, 1),
                                     ("max_inflight", max_inflight, 1)):
            _check(name, value, minimum)
        self._on_change = on_change
        self._interval, self._timeout = float(interval), float(timeout)
        self._tick_s = max(0.001, min(TICK, self._interval / 4, self._timeout / 4))
        self._fall, self._rise = int(fall), int(rise)
        self._max_inflight, self._udp_probe = int(max_inflight), udp_probe
        self._targets: dict[Key, _Target] = {}
        self._due: list[tuple[float, int, _Target]] = []     # heap; entries of dropped targets linger
        self._seq = itertools.count()                        # heap order among equal times
        self._inflight: dict[int, _Probe] = {}               # by fd, in start (= deadline) order
        self._poll = select.poll()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self.probes = 0                                      # probes completed, for metrics and tests

    @property
    def in_flight(self) -> int:
        """Probes started and not yet collected (at most ``max_inflight``)."""
        return len(self._inflight)

    # --- the API the forwarder uses ---------------------------------------------------------

    def watch(self, endpoints: Iterable[Endpoint], protocol: str = "TCP") -> None:
        """Probe exactly ``endpoints`` (of ``protocol``) from now on. Endpoints new to the set
        start healthy; dropped ones are forgotten (healthy() is True for them again). Never
        calls ``on_change``: the caller changed the set and re-programs anyway."""
        protocol = protocol.upper()
        if protocol not in (*_STREAM_PROTOCOLS, "UDP"):
            raise InvalidArgument(f"unknown protocol {protocol!r}", "protocol")
        wanted = {(protocol, ep) for ep in endpoints}
        for key in [k for k in self._targets if k[0] == protocol and k not in wanted]:
            self._forget(self._targets.pop(key))
        for key in wanted - self._targets.keys():
            self._targets[key] = target = _Target(key, HealthState(self._fall, self._rise))
            if self._loop is not None:
                self._first_due(target)
        self._wake()

    def healthy(self, endpoint: Endpoint, protocol: str = "TCP") -> bool:
        """Whether ``endpoint`` should receive traffic; True for endpoints not watched."""
        target = self._targets.get((protocol.upper(), endpoint))
        return target is None or target.state.healthy

    def start(self) -> None:
        """Start probing on the running loop, each endpoint at a random phase of the interval."""
        if self._loop is not None or self._closed:
            return
        self._loop = asyncio.get_running_loop()
        for target in self._targets.values():
            self._first_due(target)
        self._wake()

    async def close(self) -> None:
        """Stop the ticks and every probe in flight; their sockets are closed before this returns."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for probe in list(self._inflight.values()):
            self._drop_probe(probe)
        self._due.clear()

    # --- scheduling -------------------------------------------------------------------------

    def _first_due(self, target: _Target) -> None:
        assert self._loop is not None
        self._push(target, self._loop.time() + random.uniform(0, self._interval))

    def _push(self, target: _Target, when: float) -> None:
        if target.key[0] != "UDP" or self._udp_probe:
            target.due = when
            heapq.heappush(self._due, (when, next(self._seq), target))

    def _wake(self) -> None:
        """Tick again in a tick's time, while there is anything to probe or collect."""
        if self._loop is None or self._closed or self._timer is not None:
            return
        if self._due or self._inflight:
            self._timer = self._loop.call_at(self._loop.time() + self._tick_s, self._tick)

    def _tick(self) -> None:
        assert self._loop is not None
        self._timer = None
        now = self._loop.time()
        changed = self._collect(now)
        changed |= self._start_due(now)
        self._wake()
        if changed:
            try:
                self._on_change()
            except Exception:  # the forwarder's fault must not stop the probing
                log.exception("health on_change callback failed")

    def _start_due(self, now: float) -> bool:
        changed = False
        while self._due and self._due[0][0] <= now and len(self._inflight) < self._max_inflight:
            target = heapq.heappop(self._due)[2]
            if not target.watched:
                continue
            probe = _Probe(target, now + self._timeout)
            if probe.sock is None:
                changed |= self._record(target, probe.early, now)
            else:
                target.probe = probe
                self._inflight[probe.sock.fileno()] = probe
                self._poll.register(probe.sock, probe.events)
        return changed

    def _collect(self, now: float) -> bool:
        """Verdicts of the probes that finished or timed out; True if any health changed."""
        if not self._inflight:
            return False
        changed = False
        for fd, _ in self._poll.poll(0):
            probe = self._inflight[fd]
            verdict = probe.outcome()
            self._drop_probe(probe, connected=verdict is True and not probe.udp)
            changed |= self._record(probe.target, verdict, now)
        expired = list(itertools.takewhile(lambda p: p.deadline <= now, self._inflight.values()))
        for probe in expired:
            self._drop_probe(probe)
            changed |= self._record(probe.target, probe.udp, now)  # silence: UDP ok, TCP not
        return changed

    def _record(self, target: _Target, verdict: Verdict, now: float) -> bool:
        self.probes += 1
        changed = target.state.record(verdict)
        if changed:
            log.info("endpoint %s", "healthy" if target.state.healthy else "unhealthy",
                     extra={"protocol": target.key[0], "endpoint": str(target.key[1])})
        # A fixed cadence from the random phase keeps the probes spread over the interval.
        self._push(target, max(target.due + self._interval, now))
        return changed

    def _drop_probe(self, probe: _Probe, connected: bool = False) -> None:
        assert probe.sock is not None
        fd = probe.sock.fileno()
        self._poll.unregister(fd)
        del self._inflight[fd]
        if connected:
            probe.hang_up()
        else:
            probe.close()
        probe.target.probe = None

    def _forget(self, target: _Target) -> None:
        target.watched = False
        if target.probe is not None:
            self._drop_probe(target.probe)
