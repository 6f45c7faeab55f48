"""Endpoint health for the kernel data path: the fall/rise state machine, and real probes of
real sockets on loopback, on uvloop (as in production) and on asyncio's own loop."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from common.errors import InvalidArgument
from services.proxy.kernel.health import HealthChecker, HealthState
from services.proxy.routes import Endpoint
from tests.support import free_port

FAST = {"interval": 0.03, "timeout": 0.2}


def run_on(loop_kind: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    (uvloop.run if loop_kind == "uvloop" else asyncio.run)(main())


async def until(predicate: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Poll ``predicate`` on the loop until it holds; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


class Listener:
    """A TCP server on loopback that counts the connections it accepts and the bytes they send."""

    def __init__(self) -> None:
        self.accepted = 0
        self.resets = 0
        self.received = b""
        self.port = 0
        self._server: asyncio.Server | None = None

    async def open(self, port: int = 0) -> Listener:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            self.received += await reader.read(100)
        except ConnectionError:
            self.resets += 1
        writer.close()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.port)


class Changes:
    """on_change as the forwarder sees it: how many calls, and the checker to ask."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


# --- the state machine, pure ------------------------------------------------------------------

def feed(state: HealthState, results: str) -> list[bool]:
    """Record results ('o' ok, 'x' failure, '?' no verdict); the health after each."""
    verdicts = {"o": True, "x": False, "?": None}
    out = []
    for r in results:
        state.record(verdicts[r])
        out.append(state.healthy)
    return out


def test_starts_healthy_and_falls_after_fall_failures_in_a_row() -> None:
    assert HealthState(fall=3, rise=1).healthy
    assert feed(HealthState(fall=3, rise=1), "xxx") == [True, True, False]


def test_a_success_between_failures_starts_the_count_again() -> None:
    assert feed(HealthState(fall=2, rise=1), "xoxoxx") == [True] * 5 + [False]


def test_rises_after_rise_successes_in_a_row() -> None:
    assert feed(HealthState(fall=1, rise=3), "xooxooo") == [False, False, False, False, False, False, True]


def test_no_verdict_changes_nothing_and_does_not_break_a_run() -> None:
    state = HealthState(fall=2, rise=1)
    assert feed(state, "x?x") == [True, True, False]
    assert feed(state, "??") == [False, False]


def test_record_says_when_health_changed() -> None:
    state = HealthState(fall=1, rise=2)
    assert [state.record(v) for v in (True, False, False, True, True, True)] == \
        [False, True, False, False, True, False]


@pytest.mark.parametrize(("field", "kwargs"), [
    ("interval", {"interval": 0}), ("timeout", {"timeout": -1}), ("fall", {"fall": 0}),
    ("rise", {"rise": 0}), ("max_inflight", {"max_inflight": 0}), ("interval", {"interval": "2"}),
])
def test_bad_settings_are_refused_naming_the_field(field: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument) as err:
        HealthChecker(lambda: None, **kwargs)
    assert err.value.field == field


def test_an_unknown_protocol_is_refused() -> None:
    with pytest.raises(InvalidArgument) as err:
        HealthChecker(lambda: None).watch([Endpoint("127.0.0.1", 80)], protocol="ICMP")
    assert err.value.field == "protocol"


def test_unwatched_endpoints_are_healthy() -> None:
    assert HealthChecker(lambda: None).healthy(Endpoint("127.0.0.1", 9))


# --- real probes on loopback ------------------------------------------------------------------

@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_a_closed_listener_falls_and_a_reopened_one_rises(loop_kind: str) -> None:
    async def main() -> None:
        listener = await Listener().open()
        ep = listener.endpoint
        changes = Changes()
        checker = HealthChecker(changes, fall=3, rise=2, **FAST)
        checker.watch([ep])
        checker.start()
        await until(lambda: listener.accepted >= 3, "three probes accepted by the listener")
        assert checker.healthy(ep) and changes.calls == 0
        assert listener.received == b"", "a probe sends no data"

        await listener.close()
        probes_at_close = checker.probes
        await until(lambda: not checker.healthy(ep), "the closed endpoint to turn unhealthy")
        assert checker.probes - probes_at_close >= 3, "unhealthy only after `fall` failed probes"
        await until(lambda: changes.calls == 1, "on_change after the fall")

        reopened = await Listener().open(ep.port)
        probes_at_reopen = checker.probes
        await until(lambda: checker.healthy(ep), "the reopened endpoint to turn healthy")
        assert checker.probes - probes_at_reopen >= 2, "healthy only after `rise` successful probes"
        await until(lambda: changes.calls == 2, "on_change after the rise")
        await checker.close()
        await reopened.close()

    run_on(loop_kind, main)


def test_probes_close_plainly_so_workloads_see_no_reset() -> None:
    async def main() -> None:
        listener = await Listener().open()
        checker = HealthChecker(Changes(), **FAST)
        checker.watch([listener.endpoint])
        checker.start()
        await until(lambda: listener.accepted >= 10, "ten probes accepted")
        await checker.close()
        await listener.close()
        assert listener.resets == 0 and listener.received == b""
        assert checker.healthy(listener.endpoint)

    run_on("uvloop", main)


def test_a_port_nobody_listens_on_is_unhealthy_after_fall_probes() -> None:
    async def main() -> None:
        dead = Endpoint("127.0.0.1", free_port())
        changes = Changes()
        checker = HealthChecker(changes, fall=2, **FAST)
        checker.watch([dead])
        assert checker.healthy(dead), "a new endpoint starts healthy"
        checker.start()
        await until(lambda: changes.calls == 1, "on_change")
        assert not checker.healthy(dead)
        assert checker.probes >= 2
        checker.watch([dead])
        assert not checker.healthy(dead), "watching an endpoint again keeps what is known of it"
        await checker.close()

    run_on("uvloop", main)


def test_ipv6_endpoints_are_probed_too() -> None:
    async def main() -> None:
        listener = socket.socket(socket.AF_INET6)
        listener.bind(("::1", 0))
        listener.listen()
        alive = Endpoint("::1", listener.getsockname()[1])
        with socket.socket(socket.AF_INET6) as gone:
            gone.bind(("::1", 0))
            dead = Endpoint("::1", gone.getsockname()[1])
        checker = HealthChecker(Changes(), fall=1, **FAST)
        checker.watch([alive, dead])
        checker.start()
        await until(lambda: not checker.healthy(dead), "the dead IPv6 endpoint to fall")
        await until(lambda: checker.probes >= 10, "ten probes")
        assert checker.healthy(alive)
        await checker.close()
        listener.close()

    run_on("uvloop", main)


def test_watch_dropping_an_endpoint_forgets_it_and_stops_probing_it() -> None:
    async def main() -> None:
        dead = Endpoint("127.0.0.1", free_port())
        kept, dropped = await Listener().open(), await Listener().open()
        checker = HealthChecker(Changes(), fall=1, **FAST)
        checker.watch([dead, kept.endpoint, dropped.endpoint])
        checker.start()
        await until(lambda: not checker.healthy(dead) and dropped.accepted >= 1, "first probes")

        checker.watch([kept.endpoint])
        assert checker.healthy(dead), "a forgotten endpoint is unknown again, so healthy"
        # a probe of the dropped endpoint already in flight may still land: count from the
        # kept endpoint's next probe on, when every probe started since watch() has
        kept_seen = kept.accepted
        await until(lambda: kept.accepted >= kept_seen + 1, "the kept endpoint probed again")
        dropped_seen, kept_seen = dropped.accepted, kept.accepted
        await until(lambda: kept.accepted >= kept_seen + 5, "five more probes of the kept endpoint")
        assert dropped.accepted == dropped_seen, "the dropped endpoint is probed no more"

        checker.watch([dead, kept.endpoint])
        assert checker.healthy(dead), "an endpoint new to the set starts healthy again"
        await checker.close()
        await kept.close()
        await dropped.close()

    run_on("uvloop", main)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


class Stuck:
    """A listener that never accepts, its one-place queue already taken: connects to it hang
    (their SYNs are dropped) until the prober's timeout, so probes stay in flight."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.filler = socket.create_connection(self.listener.getsockname(), timeout=5)
        self.endpoint = Endpoint("127.0.0.1", self.listener.getsockname()[1])

    def close(self) -> None:
        self.filler.close()
        self.listener.close()


def test_close_stops_every_probe_and_timer_and_frees_their_sockets() -> None:
    async def main() -> None:
        stuck = Stuck()
        before = open_fds()
        changes = Changes()
        checker = HealthChecker(changes, interval=0.05, timeout=30.0, fall=1)
        checker.watch([stuck.endpoint])
        checker.start()
        await until(lambda: checker.in_flight == 1, "a probe in flight")
        assert len(open_fds() - before) == 1, "the probe's socket"
        await checker.close()
        assert open_fds() - before == set(), "the probe's socket is closed"
        assert asyncio.all_tasks() == {asyncio.current_task()}, "no task left behind"
        assert checker.in_flight == 0 and checker.probes == 0 and changes.calls == 0
        stuck.close()

    run_on("uvloop", main)


def test_in_flight_probes_are_bounded() -> None:
    async def main() -> None:
        stuck = [Stuck() for _ in range(8)]
        checker = HealthChecker(Changes(), interval=0.01, timeout=0.1, max_inflight=3)
        checker.watch(s.endpoint for s in stuck)
        checker.start()
        peak = 0

        def sample() -> bool:
            nonlocal peak
            peak = max(peak, checker.in_flight)
            return checker.probes >= 20

        await until(sample, "twenty probes")
        assert peak == 3
        assert not any(checker.healthy(s.endpoint) for s in stuck), "a hanging connect is a failure"
        await checker.close()
        for s in stuck:
            s.close()

    run_on("uvloop", main)


# --- UDP ----------------------------------------------------------------------------------------

def udp_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s


def test_udp_endpoints_are_healthy_and_not_sent_anything_by_default() -> None:
    async def main() -> None:
        bound, tcp = udp_socket(), await Listener().open()
        dead = Endpoint("127.0.0.1", free_port(socket.SOCK_DGRAM))
        checker = HealthChecker(Changes(), fall=1, **FAST)
        checker.watch([dead, Endpoint("127.0.0.1", bound.getsockname()[1])], protocol="UDP")
        checker.watch([tcp.endpoint])
        checker.start()
        await until(lambda: tcp.accepted >= 5, "five TCP probes")
        assert checker.healthy(dead, "UDP")
        with pytest.raises(BlockingIOError):
            bound.recv(1)
        await checker.close()
        await tcp.close()
        bound.close()

    run_on("uvloop", main)


def test_udp_probe_finds_a_port_nobody_listens_on() -> None:
    async def main() -> None:
        bound = udp_socket()
        alive = Endpoint("127.0.0.1", bound.getsockname()[1])
        dead = Endpoint("127.0.0.1", free_port(socket.SOCK_DGRAM))
        changes = Changes()
        # Silence is a UDP port's pass: the timeout leaves a loaded machine room to deliver the
        # dead port's ICMP error, which would otherwise pass as silence now and then (a flap).
        checker = HealthChecker(changes, fall=2, udp_probe=True, interval=0.03, timeout=0.5)
        checker.watch([alive, dead], protocol="UDP")
        checker.start()
        await until(lambda: not checker.healthy(dead, "UDP"), "the dead UDP port to fall")
        await until(lambda: checker.probes >= 10, "ten probes")
        assert checker.healthy(alive, "UDP") and changes.calls == 1
        assert bound.recv(1) == b"", "the probe is an empty datagram"
        assert checker.healthy(dead), "the same address and port over TCP is another endpoint"
        await checker.close()
        bound.close()

    run_on("uvloop", main)


def test_on_change_failing_does_not_stop_the_probing() -> None:
    async def main() -> None:
        calls: list[int] = []

        def broken() -> None:
            calls.append(1)
            raise RuntimeError("forwarder bug")

        listener = await Listener().open()
        dead = Endpoint("127.0.0.1", free_port())
        checker = HealthChecker(broken, fall=1, **FAST)
        checker.watch([dead])
        checker.start()
        await until(lambda: calls, "on_change")
        checker.watch([dead, listener.endpoint])
        await until(lambda: listener.accepted >= 3, "probes after the failed callback")
        await checker.close()
        await listener.close()

    run_on("uvloop", main)



# --- probing many endpoints ----------------------------------------------------------------------

def test_a_thousand_endpoints_are_each_probed_every_interval_without_false_alarms() -> None:
    # In a process of its own (bench/health_cost.py, the figure `make bench-health` prints): what
    # it measures is that process alone. Its CPU is a bench figure, not asserted here.
    out = subprocess.run([sys.executable, "-m", "bench.health_cost", "--endpoints", "1000",
                          "--interval", "2", "--seconds", "4", "--json"],
                         capture_output=True, text=True, timeout=60, check=True)
    cost = json.loads(out.stdout)
    assert cost["unhealthy"] == 0 and cost["on_change"] == 0, cost
    # 1000 endpoints every 2 s: 500 probes a second, none skipped nor doubled.
    assert 400 <= cost["probes_per_s"] <= 600, cost
