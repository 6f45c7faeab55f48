"""Input bombs, sent while the churn runs: each must be refused quickly and in bounded memory,
and the agent must serve afterwards.

- a YAML alias bomb ("billion laughs", about 300 bytes) in ``kind``: eight levels of nine aliases
  (9**8 strings once expanded; a ninth level made today's manager peak at 21 GB, too much for
  a shared machine; eight already costs it about 2.4 GB);
- 100,000 nested ``[``;
- a 20,000-character pod name;
- an IPC frame with ``"v": true`` sent straight to memory's ROUTER socket.

Refused correctly: the Node API answers INVALID_ARGUMENT within REFUSE_DEADLINE with a message
of at most MAX_MESSAGE characters (naming ``name`` for the long name); memory answers the frame
with ``ok: false`` and code ``bad_frame``. The manager's RSS is sampled every 20 ms meanwhile;
a peak more than RSS_BUDGET above its level before the bombs fails the row."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import psutil
import zmq

from bench.chaos.scenario import Context, Scenario
from common import ipc
from tests.stack import npb

REFUSE_DEADLINE = 5.0
MAX_MESSAGE = 1024
RSS_BUDGET = 256 * 2**20
CALL_TIMEOUT = 20.0


def alias_bomb() -> str:
    """Eight levels of nine aliases each inside ``kind``: 9**8 'lol's once expanded."""
    levels = ["&a [lol,lol,lol,lol,lol,lol,lol,lol,lol]"]
    for prev, cur in zip("abcdefg", "bcdefgh", strict=True):
        levels.append(f"&{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "apiVersion: v1\nname: bomb\nkind: [" + ",".join(levels) + "]\n"


def _api_refusal(ctx: Context, manifest: str, fmt: str, field: str | None) -> str | None:
    """None when refused correctly, else what happened instead."""
    started = time.monotonic()
    try:
        ctx.agent.stub.Apply(npb.ApplyRequest(manifest=manifest, format=fmt), timeout=CALL_TIMEOUT)
        return "accepted"
    except grpc.RpcError as exc:
        took, code, details = time.monotonic() - started, exc.code(), exc.details() or ""
    if code != grpc.StatusCode.INVALID_ARGUMENT:
        return f"{code.name} ({details[:80]!r})"
    if took > REFUSE_DEADLINE:
        return f"refused after {took:.1f}s"
    if len(details) > MAX_MESSAGE:
        return f"message of {len(details)} chars"
    if field is not None and field not in details:
        return f"message does not name {field!r}: {details[:80]!r}"
    return None


def _ipc_refusal(ctx: Context) -> str | None:
    sock: Any = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"ipc://{ctx.agent.run_dir}/memory.sock")
        body = {"v": True, "id": "chaos-bool-v", "op": "pod.list", "args": {}}
        sock.send_multipart([ipc.MAGIC, json.dumps(body).encode()])
        if not sock.poll(int(REFUSE_DEADLINE * 1000)):
            return "no answer"
        reply = json.loads(sock.recv_multipart()[-1])
    finally:
        sock.close()
    if reply.get("ok") is not False:
        return "accepted (ok: true)"
    code = (reply.get("error") or {}).get("code")
    return None if code == "bad_frame" else f"refused with {code!r}"


def _long_name() -> str:
    return json.dumps({"apiVersion": "v1", "kind": "Pod", "name": "n" * 20_000,
                       "spec": {"containers": [{"name": "c", "command": ["sleep", "1"]}]}})


BOMBS: list[tuple[str, Callable[[Context], str | None]]] = [
    ("alias bomb", lambda ctx: _api_refusal(ctx, alias_bomb(), "yaml", None)),
    ("deep nesting", lambda ctx: _api_refusal(ctx, "[" * 100_000, "", None)),
    ("long name", lambda ctx: _api_refusal(ctx, _long_name(), "json", "name")),
    ("IPC v=true", _ipc_refusal),
]


class PeakRss:
    """The highest RSS of one process, sampled every 20 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return  # the manager died: its restart shows in the restarts column


def bombs(ctx: Context) -> None:
    if ctx.churn is not None:
        ctx.churn.wait_attempted(ctx.settings.ops // 3)
    refused, failures = 0, []
    with PeakRss(ctx.agent.service_pid("manager")) as rss:
        for label, send in BOMBS:
            wrong = send(ctx)
            refused += wrong is None
            if wrong is not None:
                failures.append(f"{label}: {wrong}")
    ctx.check(not failures, f"refused correctly {refused}/{len(BOMBS)}"
              + (f" ({'; '.join(failures)})" if failures else ""))
    grown = rss.peak - rss.base
    ctx.check(grown <= RSS_BUDGET, f"manager RSS peak {rss.peak / 2**20:.0f} MiB "
                                   f"(+{grown / 2**20:.0f} MiB)")
    _still_serves(ctx)


def _still_serves(ctx: Context) -> None:
    try:
        ctx.agent.stub.List(npb.ListRequest(), timeout=REFUSE_DEADLINE)
        ok = all(s == "RUNNING" for s in ctx.agent.statuses().values())
    except grpc.RpcError:
        ok = False
    ctx.check(ok, "serves afterwards" if ok else "does not serve afterwards")


SCENARIOS = [Scenario("bombs", bombs)]
