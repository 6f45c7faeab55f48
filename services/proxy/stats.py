"""Counters of the proxy's data path, kept as plain integers for the monitor's /metrics export.

They are only touched on the event loop thread, so no locking: a reader on another thread may
see a value one update old, which is fine for monotonic counters and gauges (and a histogram
whose ``count`` is one observation ahead of its buckets for an instant).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field, fields
from typing import Any

from common import histogram

# Upper bounds (seconds) of the upstream connect latency histogram; +Inf is implicit.
CONNECT_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                      0.25, 0.5, 1.0, 3.0)


@dataclass
class Stats:
    connections_total: int = 0      # TCP clients accepted
    connections_active: int = 0
    bytes_in: int = 0               # client -> upstream (TCP payload and UDP datagrams)
    bytes_out: int = 0              # upstream -> client
    connect_errors: int = 0         # upstream connects that failed or timed out
    connections_refused: int = 0    # clients reset because no endpoint answered
    connections_over_limit: int = 0  # clients reset because the port had max_connections
    idle_closed: int = 0            # pairs closed after idle_timeout without a byte
    ejections: int = 0              # endpoints ejected after a failed connect (passive health)
    udp_flows_total: int = 0
    udp_flows_active: int = 0
    udp_flows_evicted: int = 0      # closed early because the flow table was full
    datagrams_in: int = 0
    datagrams_out: int = 0
    datagrams_dropped: int = 0      # a socket buffer was full or the upstream refused
    # Successful upstream connects: per-bucket (not cumulative) counts, the last one is +Inf.
    connect_buckets: list[int] = field(default_factory=lambda: [0] * (len(CONNECT_BUCKETS) + 1))
    connect_seconds_sum: float = 0.0

    def observe_connect(self, seconds: float) -> None:
        """Hot path: one bisect over a small tuple and two adds."""
        self.connect_buckets[bisect_left(CONNECT_BUCKETS, seconds)] += 1
        self.connect_seconds_sum += seconds

    def as_dict(self) -> dict[str, Any]:
        """A snapshot in plain JSON types: the counters, and ``connect_latency`` as a
        Prometheus-style histogram (cumulative ``buckets`` of ``[le, count]``, ``sum``, ``count``)."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)
                               if f.name not in ("connect_buckets", "connect_seconds_sum")}
        out["connect_latency"] = histogram.snapshot(CONNECT_BUCKETS, self.connect_buckets,
                                                    self.connect_seconds_sum)
        return out
