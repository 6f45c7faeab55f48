"""Counters of the proxy's data path, kept as plain integers for a later /metrics export.

They are only touched on the event loop thread, so no locking: a reader on another thread may
see a value one update old, which is fine for monotonic counters and gauges.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


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

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
