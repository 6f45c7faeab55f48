"""The manager's own metrics, kept here and read by the monitor with the CHaS counters over
the manager's stats socket (op ``stats``, key ``manager``; the monitor's
services/monitor/promextra.py turns them into families):

- Node API latency: a gRPC server interceptor times every unary call and records it by method
  and status code. Streams (watches, log follows, exec) are left out: their length is the
  client's choice, not a latency.
- Pod start latency: from the pod's apply being acknowledged (its record's ``created_at`` in
  memory) to the first status the reconciler writes with phase Running, by runtime; once per
  pod uid (a restart of its containers or an update of its spec does not count again).
- Probe results by kind and result, and probe durations by kind.

A few hundred numbers whatever the pod count; thread-safe; ``snapshot()`` is plain JSON.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc

from common import histogram

API_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
START_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
PROBE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PROBE_KINDS = {"livenessProbe": "liveness", "readinessProbe": "readiness", "startupProbe": "startup"}
MAX_SERIES = 256  # label sets per histogram: a bound on what odd method names could cost
STARTED_KEPT = 4096  # pod uids remembered as counted


class Histograms:
    """Histograms of one family by label values."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}

    def observe(self, labels: tuple[str, ...], seconds: float) -> None:
        series = self._series.get(labels)
        if series is None:
            if len(self._series) >= MAX_SERIES:
                return
            series = self._series[labels] = ([0] * (len(self.bounds) + 1), [0.0])
        series[0][bisect_left(self.bounds, seconds)] += 1
        series[1][0] += seconds

    def snapshot(self) -> list[dict[str, Any]]:
        return [
            {"labels": list(labels), "histogram": histogram.snapshot(self.bounds, counts, total[0])}
            for labels, (counts, total) in sorted(self._series.items())
        ]


class Telemetry:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self.api = Histograms(API_BUCKETS)
        self.pod_start = Histograms(START_BUCKETS)
        self.probe_duration = Histograms(PROBE_BUCKETS)
        self.probe_results = {
            (kind, result): 0 for kind in PROBE_KINDS.values() for result in ("success", "failure")
        }
        self._started: dict[str, None] = {}  # pod uids whose start was counted (insertion order)

    # -- Node API ------------------------------------------------------------------------------

    def api_call(self, method: str, code: str, seconds: float) -> None:
        with self._lock:
            self.api.observe((method, code), seconds)

    def interceptor(self) -> grpc.ServerInterceptor:
        """Times every unary call of every service this server has (outermost interceptor, so
        calls refused by the token check count too)."""
        telemetry = self

        class _Interceptor(grpc.ServerInterceptor):
            def intercept_service(self, continuation: Any, details: Any) -> Any:
                handler = continuation(details)
                if handler is None or handler.unary_unary is None:
                    return handler
                return handler._replace(
                    unary_unary=telemetry._timed(details.method.lstrip("/"), handler.unary_unary)
                )

        return _Interceptor()

    def _timed(self, method: str, behavior: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            code = "UNKNOWN"  # an exception that is not an abort: grpc answers UNKNOWN
            try:
                result = behavior(request, context)
                code = _code_name(context, grpc.StatusCode.OK)
                return result
            except Exception:
                code = _code_name(context, grpc.StatusCode.UNKNOWN)
                raise
            finally:
                self.api_call(method, code, time.perf_counter() - start)

        return run

    # -- pods ----------------------------------------------------------------------------------

    def pod_status(
        self, record: Mapping[str, Any], old: Mapping[str, Any] | None, new: Mapping[str, Any]
    ) -> None:
        """Called with every status the reconciler writes (next to its pod events)."""
        if new.get("phase") != "Running" or (old or {}).get("phase") == "Running":
            return
        uid, created = str(record.get("uid") or ""), record.get("created_at")
        if not isinstance(created, int | float) or isinstance(created, bool):
            return
        with self._lock:
            if uid in self._started:
                return
            self._started[uid] = None
            if len(self._started) > STARTED_KEPT:
                del self._started[next(iter(self._started))]
            self.pod_start.observe((runtime_kind(record),), max(0.0, self._clock() - float(created)))

    # -- probes --------------------------------------------------------------------------------

    def probe(self, kind: str, ok: bool, seconds: float) -> None:
        short = PROBE_KINDS.get(kind, kind)
        with self._lock:
            key = (short, "success" if ok else "failure")
            self.probe_results[key] = self.probe_results.get(key, 0) + 1
            self.probe_duration.observe((short,), seconds)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "node_api": self.api.snapshot(),
                "pod_start": self.pod_start.snapshot(),
                "probe_duration": self.probe_duration.snapshot(),
                "probe_results": [[k, r, n] for (k, r), n in sorted(self.probe_results.items())],
            }


def runtime_kind(record: Mapping[str, Any]) -> str:
    """The runtime a pod runs under, as the reconciler picks it."""
    containers = (record.get("spec") or {}).get("containers") or []
    kinds = {c.get("runtime", "process") for c in containers if isinstance(c, Mapping)}
    return "containerd" if "containerd" in kinds else "process"


def _code_name(context: grpc.ServicerContext, default: grpc.StatusCode) -> str:
    """The status the handler set (``abort``, ``set_code``), else ``default``."""
    code = context.code()  # type: ignore[attr-defined]  # grpc-stubs predate ServicerContext.code()
    return code.name if isinstance(code, grpc.StatusCode) else default.name
