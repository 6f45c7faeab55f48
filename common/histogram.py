"""Latency histograms as the services hand them to the monitor: per-bucket counts kept by the
service, turned into Prometheus' cumulative form in one place."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def snapshot(bounds: Sequence[float], counts: Sequence[int], total: float) -> dict[str, Any]:
    """``counts`` has one entry per bound plus the +Inf one. Returns ``{"buckets": [[le,
    cumulative count] per finite bound], "sum", "count"}`` (+Inf is ``count``)."""
    counts = list(counts)  # one copy, so the cumulative sums agree with count
    buckets: list[list[float | int]] = []
    running = 0
    for le, n in zip(bounds, counts, strict=False):
        running += n
        buckets.append([le, running])
    return {"buckets": buckets, "sum": total, "count": running + counts[-1]}
