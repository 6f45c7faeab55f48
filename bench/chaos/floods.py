"""Stream and connection floods, while the churn runs.

- watch-flood: WATCHES Watch streams opened and held; then a List must answer within
  ANSWER_DEADLINE. A stream the agent refuses with RESOURCE_EXHAUSTED (a per-client cap) is
  fine; one it neither serves nor refuses just waits (counted as "pending").
- slowloris: SLOW connections to the CHaS port, each sending part of a request's headers and
  then nothing; then ``GET /health`` must answer 200 within ANSWER_DEADLINE."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import grpc

from bench.chaos.scenario import Context, Scenario
from tests.stack import npb

WATCHES = 40
SLOW = 130
ANSWER_DEADLINE = 5.0
OPEN_DEADLINE = 5.0  # how long streams get to be served or refused before the List


class Streams:
    """Watch streams held open; each thread notes whether its stream was served (first event)
    or refused, then drains until cancelled."""

    def __init__(self, ctx: Context, count: int) -> None:
        self.calls = [ctx.agent.stub.Watch(npb.WatchRequest()) for _ in range(count)]
        self.served = 0
        self.refused: dict[str, int] = {}
        self._lock = threading.Lock()
        for call in self.calls:
            threading.Thread(target=self._drain, args=(call,), daemon=True).start()

    def _drain(self, call: Iterator[npb.PodEvent]) -> None:
        first = True
        try:
            for _ in call:
                if first:
                    with self._lock:
                        self.served += 1
                    first = False
        except grpc.RpcError as exc:
            if first and exc.code() != grpc.StatusCode.CANCELLED:
                with self._lock:
                    self.refused[exc.code().name] = self.refused.get(exc.code().name, 0) + 1

    def settled(self) -> int:
        return self.served + sum(self.refused.values())

    def close(self) -> None:
        for call in self.calls:
            call.cancel()


def watch_flood(ctx: Context) -> None:
    if ctx.churn is not None:
        ctx.churn.wait_attempted(ctx.settings.ops // 3)
    streams = Streams(ctx, WATCHES)
    try:
        deadline = time.monotonic() + OPEN_DEADLINE
        while streams.settled() < WATCHES and time.monotonic() < deadline:
            time.sleep(0.05)
        ctx.notes.append(f"{WATCHES} watches: {streams.served} served, refused {streams.refused or 0}, "
                         f"{WATCHES - streams.settled()} pending")
        started = time.monotonic()
        try:
            ctx.agent.stub.List(npb.ListRequest(), timeout=ANSWER_DEADLINE)
            ctx.check(True, f"List answered in {time.monotonic() - started:.2f}s")
        except grpc.RpcError as exc:
            ctx.check(False, f"List: {exc.code().name} after {time.monotonic() - started:.1f}s")
    finally:
        streams.close()


def slowloris(ctx: Context) -> None:
    if ctx.churn is not None:
        ctx.churn.wait_attempted(ctx.settings.ops // 3)
    host, port = ctx.agent.chas.rsplit(":", 1)
    held: list[socket.socket] = []
    try:
        for _ in range(SLOW):
            s = socket.create_connection((host, int(port)), timeout=5)
            held.append(s)
            with contextlib.suppress(OSError):  # the agent may shed it at once: that is allowed
                s.sendall(b"GET /health HTTP/1.1\r\nHost: chaos\r\n")
        started = time.monotonic()
        try:
            status = ctx.agent.chas_request("GET", "/health", timeout=ANSWER_DEADLINE)[0]
            answer = f"GET /health {status} in {time.monotonic() - started:.2f}s"
        except OSError as exc:
            status, answer = 0, f"GET /health: {type(exc).__name__} after {time.monotonic() - started:.1f}s"
        ctx.check(status == 200, f"{SLOW} slow connections; {answer}")
    finally:
        for s in held:
            s.close()


SCENARIOS = [Scenario("watch-flood", watch_flood), Scenario("slowloris", slowloris)]
