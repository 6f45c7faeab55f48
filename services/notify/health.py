"""What the notifier tells systemd, computed from what it observed (no I/O here).

The agent is up when the four services answer on their IPC endpoints; the one-line STATUS=
reads e.g. ``4/4 services up, 12 pods (11 ready), proxy userspace``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from common.pod import serving

SERVICES = ("memory", "manager", "monitor", "proxy")
_STUB_KEYS = ("name", "uid", "version", "generation", "desired")


@dataclass(frozen=True)
class PodCounts:
    total: int
    ready: int  # wanted running, running and ready: the pods that take traffic


@dataclass(frozen=True)
class Health:
    answering: frozenset[str]
    pods: PodCounts | None = None  # None: memory's pods not known yet
    proxy_mode: str | None = None  # None: the proxy did not say

    @property
    def up(self) -> bool:
        return self.answering >= frozenset(SERVICES)

    @property
    def silent(self) -> list[str]:
        return [s for s in SERVICES if s not in self.answering]


def kept(record: dict[str, Any]) -> dict[str, Any]:
    """What the notifier's pod mirror holds of a record: enough to count it."""
    out = {k: record[k] for k in _STUB_KEYS if k in record}
    status = record.get("status")
    if isinstance(status, Mapping):
        out["status"] = {k: status[k] for k in ("phase", "ready") if k in status}
    return out


def count_pods(records: Iterable[Mapping[str, Any]]) -> PodCounts:
    total = ready = 0
    for record in records:
        total += 1
        ready += serving(record)
    return PodCounts(total, ready)


def status_line(health: Health, ready_sent: bool, watchdog: bool = False) -> str:
    """systemd's STATUS=: how many services answer (and which do not), pods, proxy mode."""
    n = len(health.answering & frozenset(SERVICES))
    head = f"{n}/{len(SERVICES)} services up"
    if not health.up:
        head += f" ({', '.join(health.silent)} not answering)"
        head = head if ready_sent else f"starting: {head}"
    parts = [head]
    if health.pods is not None:
        parts.append(f"{health.pods.total} pods ({health.pods.ready} ready)")
    if health.proxy_mode:
        parts.append(f"proxy {health.proxy_mode}")
    line = ", ".join(parts)
    if watchdog and ready_sent and not health.up:
        line += "; watchdog withheld"
    return line
