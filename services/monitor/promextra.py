"""Metric families of what other services report to the monitor over IPC: the proxy's
``stats`` answer, and the manager's (its CHaS API counters and its own histograms: Node API
latency, pod start latency, probe results). Pure functions of those JSON answers; keys a
service does not send (an older one) or sends malformed are left out, never a failed scrape."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric


def number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _le(bound: float) -> str:
    return str(int(bound)) + ".0" if float(bound).is_integer() else repr(float(bound))


def add_histogram(fam: HistogramMetricFamily, hist: object, labels: list[str]) -> bool:
    """Add one histogram (common.histogram.snapshot's form) to ``fam``; False, adding nothing,
    when it is malformed."""
    if not isinstance(hist, Mapping) or not isinstance(hist.get("buckets"), list):
        return False
    total, count = number(hist.get("sum")), number(hist.get("count"))
    buckets = [(number(b[0]), number(b[1])) for b in hist["buckets"] if isinstance(b, list) and len(b) == 2]
    if total is None or count is None or any(le is None or n is None for le, n in buckets):
        return False
    fam.add_metric(labels, [(_le(le or 0.0), n or 0.0) for le, n in buckets] + [("+Inf", count)], total)
    return True


# The proxy's ``stats`` answer: key -> (family name, kind, help); counters named without _total
# (prometheus_client adds it).
PROXY_SERIES: tuple[tuple[str, str, str, str], ...] = (
    ("connections_total", "riklet_proxy_connections", "counter", "TCP clients accepted by the proxy."),
    ("connections_active", "riklet_proxy_connections_active", "gauge", "TCP clients connected now."),
    ("bytes_in", "riklet_proxy_bytes_in", "counter", "Bytes from clients to pods (TCP and UDP)."),
    ("bytes_out", "riklet_proxy_bytes_out", "counter", "Bytes from pods to clients (TCP and UDP)."),
    ("connect_errors", "riklet_proxy_connect_errors", "counter",
     "Upstream connects that failed or timed out."),
    ("connections_refused", "riklet_proxy_connections_refused", "counter",
     "Clients reset because no endpoint answered."),
    ("connections_over_limit", "riklet_proxy_connections_over_limit", "counter",
     "Clients reset because their port was at max_connections."),
    ("idle_closed", "riklet_proxy_idle_closed", "counter", "Connections closed when idle too long."),
    ("ejections", "riklet_proxy_ejections", "counter", "Endpoints ejected after a failed connect."),
    ("udp_flows_total", "riklet_proxy_udp_flows", "counter", "UDP flows opened."),
    ("udp_flows_active", "riklet_proxy_udp_flows_active", "gauge", "UDP flows open now."),
    ("udp_flows_evicted", "riklet_proxy_udp_flows_evicted", "counter",
     "UDP flows closed early because the flow table was full."),
    ("datagrams_in", "riklet_proxy_datagrams_in", "counter", "UDP datagrams from clients."),
    ("datagrams_out", "riklet_proxy_datagrams_out", "counter", "UDP datagrams to clients."),
    ("datagrams_dropped", "riklet_proxy_datagrams_dropped", "counter",
     "UDP datagrams dropped (buffer full or upstream refused)."),
    # Kernel mode only (nftables counters and conntrack).
    ("packets_in", "riklet_proxy_packets_in", "counter", "Packets from clients to pods (kernel mode)."),
    ("packets_out", "riklet_proxy_packets_out", "counter", "Packets from pods to clients (kernel mode)."),
    ("conntrack_entries", "riklet_proxy_conntrack_entries", "gauge",
     "Conntrack entries of flows the proxy's table NATed (kernel mode)."),
    ("conntrack_deleted", "riklet_proxy_conntrack_deleted", "counter",
     "Conntrack entries deleted because their endpoint left (kernel mode)."),
    ("syncs", "riklet_proxy_kernel_syncs", "counter", "nftables transactions applied (kernel mode)."),
    ("sync_errors", "riklet_proxy_kernel_sync_errors", "counter",
     "nftables transactions that failed (kernel mode)."),
    ("last_sync_seconds", "riklet_proxy_kernel_last_sync_duration_seconds", "gauge",
     "Duration of the last nftables transaction (kernel mode)."),
)
PROXY_MODES = ("kernel", "userspace")


def _one(kind: str, name: str, doc: str, value: float) -> Metric:
    if kind == "counter":
        return CounterMetricFamily(name, doc, value=value)
    return GaugeMetricFamily(name, doc, value=value)


def proxy_families(stats: Mapping[str, Any] | None) -> list[Metric]:
    """``riklet_proxy_up`` always; the proxy's series only when it answered (``stats``)."""
    out: list[Metric] = [
        GaugeMetricFamily(
            "riklet_proxy_up",
            "1 if the proxy answered this scrape's stats request.",
            value=0 if stats is None else 1,
        )
    ]
    if stats is None:
        return out
    for key, name, kind, doc in PROXY_SERIES:
        value = number(stats.get(key))
        if value is not None:
            out.append(_one(kind, name, doc, value))
    fam = HistogramMetricFamily(
        "riklet_proxy_connect_duration_seconds",
        "Time to connect to the upstream endpoint (successful connects).",
        labels=[],
    )
    if add_histogram(fam, stats.get("connect_latency"), []):
        out.append(fam)
    if isinstance(stats.get("mode"), str):
        mode = GaugeMetricFamily(
            "riklet_proxy_mode", "The proxy's data path: 1 for the mode in use.", labels=["mode"]
        )
        for name in PROXY_MODES:
            mode.add_metric([name], 1 if stats["mode"] == name else 0)
        out.append(mode)
    return out + _port_families(stats.get("ports"))


_PORT_KEYS = ("port", "packets_in", "packets_out", "bytes_in", "bytes_out", "conntrack", "ready", "endpoints")


def _port_families(ports: object) -> list[Metric]:
    """Per host port series of the kernel mode (``stats.ports``); malformed rows are skipped."""
    if not isinstance(ports, list):
        return []
    labels = ["protocol", "port"]
    packets = CounterMetricFamily(
        "riklet_proxy_port_packets",
        "Packets through a host port, by direction.",
        labels=[*labels, "direction"],
    )
    octets = CounterMetricFamily(
        "riklet_proxy_port_bytes", "Bytes through a host port, by direction.", labels=[*labels, "direction"]
    )
    tracked = GaugeMetricFamily(
        "riklet_proxy_port_conntrack_entries", "Conntrack entries of a host port.", labels=labels
    )
    ready = GaugeMetricFamily(
        "riklet_proxy_port_endpoints", "Endpoints of a host port, by state.", labels=[*labels, "state"]
    )
    flows = CounterMetricFamily(
        "riklet_proxy_port_flows",
        "New flows (TCP connections, UDP flows) NATed on a host port.",
        labels=labels,
    )
    for p in ports:
        if not isinstance(p, Mapping) or not all(number(p.get(k)) is not None for k in _PORT_KEYS):
            continue
        values = [str(p.get("protocol")), str(p.get("port"))]
        for direction in ("in", "out"):
            packets.add_metric([*values, direction], float(p[f"packets_{direction}"]))
            octets.add_metric([*values, direction], float(p[f"bytes_{direction}"]))
        tracked.add_metric(values, float(p["conntrack"]))
        if number(p.get("flows")) is not None:
            flows.add_metric(values, float(p["flows"]))
        ready.add_metric([*values, "ready"], float(p["ready"]))
        ready.add_metric([*values, "unready"], float(p["endpoints"]) - float(p["ready"]))
    return [packets, octets, tracked, ready, flows]


def _counts(fam: CounterMetricFamily, counts: object) -> CounterMetricFamily:
    for key, n in sorted(counts.items()) if isinstance(counts, Mapping) else []:
        if number(n) is not None:
            fam.add_metric([str(key)], float(n))
    return fam


def chas_families(stats: Mapping[str, Any] | None) -> list[Metric]:
    """The CHaS API's counters from the manager (services.manager.chas.stats): requests and
    their latency by method, route and status code, deployments, errors by type, health and
    registration."""
    if not isinstance(stats, Mapping):
        return []
    labels = ["method", "route", "code"]
    requests = CounterMetricFamily(
        "riklet_chas_requests", "CHaS API requests by method, route and status code.", labels=labels
    )
    latency = HistogramMetricFamily(
        "riklet_chas_request_duration_seconds",
        "CHaS API request latency by method, route and status code.",
        labels=labels,
    )
    for r in stats.get("requests") or []:
        if isinstance(r, Mapping) and number(r.get("count")) is not None:
            values = [str(r.get("method")), str(r.get("endpoint")), str(r.get("status"))]
            requests.add_metric(values, float(r["count"]))
            add_histogram(latency, r.get("latency"), values)
    out: list[Metric] = [
        requests,
        latency,
        _counts(
            CounterMetricFamily("riklet_chas_deployments", "Deploy requests by result.", labels=["result"]),
            stats.get("deployments"),
        ),
        _counts(
            CounterMetricFamily(
                "riklet_chas_errors", "CHaS API errors by type (error code).", labels=["error"]
            ),
            stats.get("errors"),
        ),
        GaugeMetricFamily(
            "riklet_chas_registered",
            "1 when the CHaS API server accepted this node.",
            value=1 if stats.get("registered") else 0,
        ),
        _counts(
            CounterMetricFamily(
                "riklet_chas_health_reports",
                "Health reports sent to the CHaS API server, by result.",
                labels=["result"],
            ),
            stats.get("reports"),
        ),
    ]
    if stats.get("healthy") is not None:
        out.append(
            GaugeMetricFamily(
                "riklet_chas_healthy",
                "1 when the node's last health check was healthy, 0 when unhealthy.",
                value=1 if stats.get("healthy") else 0,
            )
        )
    return out


# The manager's own histograms (services.manager.telemetry): key -> (name, help, label names).
MANAGER_HISTOGRAMS = (
    (
        "node_api",
        "riklet_node_api_request_duration_seconds",
        "Node API (gRPC) unary calls: time to answer, by method and status code.",
        ("method", "code"),
    ),
    (
        "pod_start",
        "riklet_pod_start_duration_seconds",
        "Time from a pod's apply being acknowledged to its first Running, by runtime.",
        ("runtime",),
    ),
    (
        "probe_duration",
        "riklet_probe_duration_seconds",
        "Time a probe attempt took, by probe kind.",
        ("kind",),
    ),
)


def manager_families(stats: Mapping[str, Any] | None) -> list[Metric]:
    """The manager's histograms and probe counter (``stats["manager"]``, see
    services.manager.telemetry.Telemetry.snapshot)."""
    mine = stats.get("manager") if isinstance(stats, Mapping) else None
    if not isinstance(mine, Mapping):
        return []
    out: list[Metric] = []
    for key, name, doc, labels in MANAGER_HISTOGRAMS:
        fam = HistogramMetricFamily(name, doc, labels=list(labels))
        for row in mine.get(key) or []:
            if (
                isinstance(row, Mapping)
                and isinstance(row.get("labels"), list)
                and len(row["labels"]) == len(labels)
            ):
                add_histogram(fam, row.get("histogram"), [str(v) for v in row["labels"]])
        out.append(fam)
    results = CounterMetricFamily(
        "riklet_probe_results", "Probe attempts by probe kind and result.", labels=["kind", "result"]
    )
    for row in mine.get("probe_results") or []:
        if isinstance(row, list) and len(row) == 3 and number(row[2]) is not None:
            results.add_metric([str(row[0]), str(row[1])], float(row[2]))
    out.append(results)
    return out
