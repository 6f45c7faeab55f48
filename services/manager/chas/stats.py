"""Counters of the CHaS side of the manager (its HTTP API and its reports to the CHaS API
server), kept in the manager and read by the monitor for its Prometheus ``/metrics`` over the
manager's IPC socket (op ``stats``). Thread-safe; ``snapshot()`` is plain JSON."""

from __future__ import annotations

import threading
from bisect import bisect_left
from typing import Any

from common import histogram

# Upper bounds (seconds) of the request latency histogram's buckets.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ChasStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}        # (method, endpoint, status)
        self.latency: dict[str, list[int]] = {}                    # endpoint -> bucket counts
        self.latency_sum: dict[str, float] = {}
        # (method, endpoint, status) -> (bucket counts, [sum]): the latency by method and code
        self.by_request: dict[tuple[str, str, int], tuple[list[int], list[float]]] = {}
        self.deployments: dict[str, int] = {"success": 0, "failure": 0}
        self.errors: dict[str, int] = {}                           # error code -> count
        self.healthy: bool | None = None                           # last /health verdict
        self.registered: bool = False                              # accepted by the CHaS server
        self.reports: dict[str, int] = {"success": 0, "failure": 0}  # health reports sent

    def request(self, method: str, endpoint: str, status: int, seconds: float) -> None:
        """One HTTP request; ``endpoint`` is the route template (``/containers/{id}``)."""
        with self._lock:
            key = (method, endpoint, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            counts = self.latency.setdefault(endpoint, [0] * (len(BUCKETS) + 1))
            counts[bisect_left(BUCKETS, seconds)] += 1
            self.latency_sum[endpoint] = self.latency_sum.get(endpoint, 0.0) + seconds
            hist = self.by_request.setdefault(key, ([0] * (len(BUCKETS) + 1), [0.0]))
            hist[0][bisect_left(BUCKETS, seconds)] += 1
            hist[1][0] += seconds

    def deployment(self, ok: bool) -> None:
        with self._lock:
            self.deployments["success" if ok else "failure"] += 1

    def error(self, code: str) -> None:
        with self._lock:
            self.errors[code] = self.errors.get(code, 0) + 1

    def health(self, healthy: bool) -> None:
        with self._lock:
            self.healthy = healthy

    def set_registered(self, registered: bool) -> None:
        with self._lock:
            self.registered = registered

    def report(self, ok: bool) -> None:
        with self._lock:
            self.reports["success" if ok else "failure"] += 1

    def _hist(self, key: tuple[str, str, int]) -> tuple[list[int], float]:
        counts, total = self.by_request[key]
        return counts, total[0]

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            latency = {endpoint: histogram.snapshot(BUCKETS, counts, self.latency_sum[endpoint])
                       for endpoint, counts in self.latency.items()}
            return {
                "requests": [{"method": m, "endpoint": e, "status": s, "count": n,
                              "latency": histogram.snapshot(BUCKETS, *self._hist((m, e, s)))}
                             for (m, e, s), n in sorted(self.requests.items())],
                "latency": latency,
                "deployments": dict(self.deployments),
                "errors": dict(self.errors),
                "healthy": self.healthy,
                "registered": self.registered,
                "reports": dict(self.reports),
            }
