"""Endpoint health for the kernel data path, which cannot see a refused connect by itself.

In userspace mode a refused connect to an endpoint is seen and the next endpoint tried; once the
kernel DNATs the traffic, nobody sees it, so the proxy probes every endpoint it routes to and the
forwarder keeps only the healthy ones in the kernel's maps.

- TCP and SCTP: a non-blocking connect within ``timeout``. An accepted connection is a success
  and is reset at once (SO_LINGER 0) with no data sent: a plain close would leave the prober, the
  side that closes first, one TIME_WAIT socket per probe for 60 s (1000 endpoints every 2 s keep
  30,000 of them, and as many conntrack entries), while a reset leaves none. A refusal, a timeout
  or an unreachable host is a failure. A local shortage (no file descriptor, no ephemeral port)
  is no verdict at all: it says nothing about the endpoint.
- UDP: readiness needs the application's protocol, so UDP endpoints are healthy unless
  ``udp_probe`` is set. Then an empty datagram goes to the endpoint on a connected socket, and an
  ICMP port-unreachable (ECONNREFUSED) within ``timeout`` is a failure; silence or an answer is a
  success. Off by default: it sends datagrams to the workload, which may log or answer them, and
  it only finds "nothing bound to the port" (ICMP is rate limited, so it may miss even that).

``fall`` consecutive failures make an endpoint unhealthy, ``rise`` consecutive successes make it
healthy again (:class:`HealthState`, pure). Probes are spread over the interval (each endpoint
gets a random phase), at most ``max_inflight`` at a time, and driven by loop callbacks, not tasks:
probing is a few system calls and two callbacks per endpoint and interval.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import socket
import struct
from collections import deque
from collections.abc import Callable, Iterable

from common.errors import InvalidArgument
from services.proxy.routes import Endpoint, family_of

log = logging.getLogger(__name__)

Key = tuple[str, Endpoint]                  # (protocol, endpoint): one endpoint may serve TCP and UDP
Verdict = bool | None                       # None: the probe could not tell (a local shortage)

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


def _check(name: str, value: float, minimum: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= minimum:
        raise InvalidArgument(f"must be a number >= {minimum}, not {value!r}", name)


class _Probe:
    """One probe of one endpoint on ``loop``, driven by callbacks; calls ``done(verdict)`` once,
    never from inside the constructor, unless cancelled first."""

    __slots__ = ("_done", "_loop", "_sock", "_timer", "_udp")

    def __init__(self, loop: asyncio.AbstractEventLoop, key: Key, timeout: float,
                 done: Callable[[Verdict], None]) -> None:
        self._loop, self._done, self._udp = loop, done, key[0] == "UDP"
        self._sock: socket.socket | None = None
        self._timer: asyncio.TimerHandle | None = None
        try:
            self._sock = sock = self._open(key)
            fd = sock.fileno()
            err = sock.connect_ex(key[1])
            if self._udp and err == 0:
                sock.send(b"")                 # an ICMP port-unreachable answers it if nobody listens
                loop.add_reader(fd, self._answered)
            elif err == errno.EINPROGRESS:
                loop.add_writer(fd, self._connected)
            else:
                self._finish_soon(self._verdict(err))
                return
        except OSError as exc:
            self._finish_soon(self._verdict(exc.errno or errno.EIO))
            return
        self._timer = loop.call_later(timeout, self._finish, self._udp)   # silence: UDP ok, TCP not

    @staticmethod
    def _open(key: Key) -> socket.socket:
        proto, endpoint = key
        kind, number = ((socket.SOCK_DGRAM, socket.IPPROTO_UDP) if proto == "UDP"
                        else (socket.SOCK_STREAM, _STREAM_PROTOCOLS[proto]))
        sock = socket.socket(family_of(endpoint.address), kind, number)
        sock.setblocking(False)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
        return sock

    @staticmethod
    def _verdict(err: int) -> Verdict:
        return True if err == 0 else None if err in _LOCAL_ERRORS else False

    def _connected(self) -> None:
        assert self._sock is not None
        self._finish(self._verdict(self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)))

    def _answered(self) -> None:
        assert self._sock is not None
        try:
            self._sock.recv(1)
        except ConnectionRefusedError:
            self._finish(False)
        except OSError:
            self._finish(None)
        else:
            self._finish(True)

    def _finish_soon(self, verdict: Verdict) -> None:
        """Report an outcome known at once, from the loop (``done`` may not run re-entrantly)."""
        self.cancel()
        self._timer = self._loop.call_soon(self._done, verdict)   # type: ignore[assignment]

    def _finish(self, verdict: Verdict) -> None:
        self.cancel()
        self._done(verdict)

    def cancel(self) -> None:
        """Stop the probe and free its socket; ``done`` is not called afterwards."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sock is not None:
            fd = self._sock.fileno()
            if self._udp:
                self._loop.remove_reader(fd)
            else:
                self._loop.remove_writer(fd)
            self._sock.close()
            self._sock = None


class _Target:
    """A watched endpoint: its health, when it is probed next, and its probe in flight."""

    __slots__ = ("due", "key", "probe", "state", "timer", "watched")

    def __init__(self, key: Key, state: HealthState) -> None:
        self.key, self.state = key, state
        self.due = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.probe: _Probe | None = None
        self.watched = True

    def stop(self) -> None:
        self.watched = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.probe is not None:
            self.probe.cancel()
            self.probe = None


class HealthChecker:
    """Probes the watched endpoints on the running loop and calls ``on_change()`` (on the loop,
    coalesced within one loop iteration) whenever the set of healthy endpoints changes.

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
        self._fall, self._rise = int(fall), int(rise)
        self._max_inflight, self._udp_probe = int(max_inflight), udp_probe
        self._targets: dict[Key, _Target] = {}
        self._waiting: deque[_Target] = deque()    # due, but max_inflight probes are in flight
        self._inflight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._notify: asyncio.Handle | None = None
        self._closed = False
        self.probes = 0                            # probes completed, for metrics and tests

    @property
    def in_flight(self) -> int:
        """Probes started and not finished (at most ``max_inflight``)."""
        return self._inflight

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
                self._schedule(target, self._loop.time() + random.uniform(0, self._interval))

    def healthy(self, endpoint: Endpoint, protocol: str = "TCP") -> bool:
        """Whether ``endpoint`` should receive traffic; True for endpoints not watched."""
        target = self._targets.get((protocol.upper(), endpoint))
        return target is None or target.state.healthy

    def start(self) -> None:
        """Start probing on the running loop, each endpoint at a random phase of the interval."""
        if self._loop is not None or self._closed:
            return
        self._loop = loop = asyncio.get_running_loop()
        for target in self._targets.values():
            self._schedule(target, loop.time() + random.uniform(0, self._interval))

    async def close(self) -> None:
        """Stop every timer and probe in flight; their sockets are closed before this returns."""
        self._closed = True
        for target in self._targets.values():
            target.stop()
        self._waiting.clear()
        self._inflight = 0
        if self._notify is not None:
            self._notify.cancel()
            self._notify = None

    # --- scheduling ---------------------------------------------------------------------------

    def _probed(self, key: Key) -> bool:
        return key[0] != "UDP" or self._udp_probe

    def _schedule(self, target: _Target, when: float) -> None:
        assert self._loop is not None
        if self._closed or not self._probed(target.key):
            return
        target.due = when
        target.timer = self._loop.call_at(when, self._launch, target)

    def _forget(self, target: _Target) -> None:
        if target.probe is not None:
            self._inflight -= 1
        target.stop()
        self._drain()

    def _drain(self) -> None:
        """Launch waiting probes while there is room for them."""
        while self._waiting and self._inflight < self._max_inflight:
            waiting = self._waiting.popleft()
            if waiting.watched:
                self._launch(waiting)

    def _launch(self, target: _Target) -> None:
        target.timer = None
        if not target.watched:
            return
        if self._inflight >= self._max_inflight:
            self._waiting.append(target)
            return
        assert self._loop is not None
        self._inflight += 1
        target.probe = _Probe(self._loop, target.key, self._timeout,
                              lambda verdict: self._result(target, verdict))

    def _result(self, target: _Target, verdict: Verdict) -> None:
        target.probe = None
        self._inflight -= 1
        self.probes += 1
        if target.state.record(verdict):
            log.info("endpoint %s", "healthy" if target.state.healthy else "unhealthy",
                     extra={"protocol": target.key[0], "endpoint": str(target.key[1])})
            self._changed()
        assert self._loop is not None
        # A fixed cadence from the random phase keeps the probes spread over the interval.
        self._schedule(target, max(target.due + self._interval, self._loop.time()))
        self._drain()

    def _changed(self) -> None:
        if self._notify is None and self._loop is not None:
            self._notify = self._loop.call_soon(self._call_on_change)

    def _call_on_change(self) -> None:
        self._notify = None
        try:
            self._on_change()
        except Exception:  # the forwarder's fault must not stop the probing
            log.exception("health on_change callback failed")
