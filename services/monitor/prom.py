"""The monitor's ``/metrics``: the node's, pods', proxy's and manager's figures as Prometheus
metric families (prometheus_client), and the HTTP server that serves them (plus ``/healthz``).

The family builders are pure: they take the same dicts the IPC ops return (so both views of a
pod always agree) and return ``prometheus_client`` metric families; :func:`exposition` writes
them with ``generate_latest`` (text format 0.0.4) or, when the scraper's ``Accept`` asks for
it, OpenMetrics. Names follow Prometheus' conventions: base units (``_bytes``, ``_seconds``,
``_ratio`` for 0-1), ``_total`` counters, one metric per quantity (no ``kind=`` label mixing a
total with its parts), lower-case label values. The full list is in the README.

A pod's sample lines are written once for the values it shows (:class:`PodSeries`) and kept by
the monitor while they stay the same, which they do for every idle pod. They are the lines
prometheus_client writes for the same samples (a test holds them equal), written by
:func:`sample_line` because at a thousand pods prometheus_client's writer spends about 5 us on
each of their 5000 samples at every scrape: the per-pod families are :class:`Written`, whose
header prometheus_client still writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from services.monitor.metrics import RealtimeNode, RealtimePod
from services.monitor.promextra import chas_families, manager_families, number, proxy_families

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Phases of the pod lifecycle, always exported so a dashboard sees 0, not a gap.
KNOWN_PHASES = ("pending", "creating", "running", "error", "terminating", "terminated")

POD_CPU = "riklet_pod_cpu_usage_ratio"
POD_MEMORY = "riklet_pod_memory_usage_bytes"
POD_RESTARTS = "riklet_pod_restarts_total"
CONTAINER_CPU = "riklet_container_cpu_seconds_total"
CONTAINER_MEMORY = "riklet_container_memory_working_set_bytes"
CONTAINER_LIMIT = "riklet_container_memory_limit_bytes"


class PodSeries(NamedTuple):
    """A pod's sample lines in each of the per-pod families, and its phase: what a scrape needs
    of a pod, written once for the values it shows."""

    phase: str
    cpu: str
    memory: str
    restarts: str
    containers: tuple[tuple[str, str, str | None], ...]  # (cpu, memory, limit or None)


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def sample_line(name: str, value: float, **labels: str) -> str:
    """One sample's line as prometheus_client writes it in both formats (labels sorted, values
    escaped, the value by ``floatToGoString``), for a name of the legacy character set."""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}} {floatToGoString(value)}\n"


def pod_series(pod: RealtimePod, rows: Sequence[Any] = ()) -> PodSeries:
    """``pod``'s lines, and those of its containers (``services.monitor.pods.ContainerUsage``)."""
    name = pod["appId"]
    return PodSeries(
        pod["state"].lower(),
        sample_line(POD_CPU, pod["cpu"]["currentUsage"] / 100.0, pod=name),
        sample_line(POD_MEMORY, pod["memory"]["totalMemory"] - pod["memory"]["freeMemory"], pod=name),
        sample_line(POD_RESTARTS, pod["restartCount"], pod=name),
        container_lines(rows),
    )


def container_lines(rows: Sequence[Any]) -> tuple[tuple[str, str, str | None], ...]:
    """Each container's (cpu, memory, limit or None) lines."""
    return tuple(
        (
            sample_line(CONTAINER_CPU, r.cpu_seconds, pod=r.pod, container=r.container),
            sample_line(CONTAINER_MEMORY, r.memory_bytes, pod=r.pod, container=r.container),
            None
            if r.memory_limit is None
            else sample_line(CONTAINER_LIMIT, r.memory_limit, pod=r.pod, container=r.container),
        )
        for r in rows
    )


class Written(NamedTuple):
    """A family whose sample lines are already written: ``family`` (without samples) gives its
    name, type and help to prometheus_client's writer, ``lines`` follow its header."""

    family: Metric
    lines: list[str]


Family = Metric | Written


def node_families(node: RealtimeNode) -> list[Metric]:
    cpu = GaugeMetricFamily(
        "riklet_node_cpu_usage_ratio",
        "CPU used by the whole node, as a share of all its cores (0-1).",
        value=node["cpu"]["currentUsage"] / 100.0,
    )
    total, free = node["memory"]["totalMemory"], node["memory"]["freeMemory"]
    mem_total = GaugeMetricFamily("riklet_node_memory_total_bytes", "Node memory.", value=total)
    mem_avail = GaugeMetricFamily(
        "riklet_node_memory_available_bytes",
        "Node memory that can still be allocated (MemAvailable).",
        value=free,
    )
    disks = [
        GaugeMetricFamily(f"riklet_node_disk_{what}_bytes", doc, labels=["disk"])
        for what, doc in (
            ("total", "Size of a mounted block device."),
            ("used", "Bytes used on a mounted block device."),
            ("available", "Bytes an unprivileged user can still write on a mounted block device."),
        )
    ]
    for d in node["disks"]:
        for fam, value in zip(disks, (d["total"], d["used"], d["available"]), strict=True):
            fam.add_metric([d["diskName"]], value)
    return [cpu, mem_total, mem_avail, *disks]


def _written(cls: type[Metric], name: str, doc: str, labels: list[str], lines: Iterable[str]) -> Written:
    return Written(cls(name, doc, labels=labels), list(lines))  # type: ignore[call-arg]


def pod_families(series: Sequence[PodSeries], containers: Sequence[Any] = ()) -> list[Family]:
    """The per-pod and per-container families; ``containers`` are rows of pods not in ``series``."""
    by_phase = dict.fromkeys(KNOWN_PHASES, 0)
    for one in series:
        by_phase[one.phase] = by_phase.get(one.phase, 0) + 1
    phases = GaugeMetricFamily("riklet_pods", "Pods on this node by phase.", labels=["phase"])
    for phase, count in by_phase.items():
        phases.add_metric([phase], count)
    conts = [*(c for one in series for c in one.containers), *container_lines(containers)]
    pod, both = ["pod"], ["container", "pod"]
    return [
        _written(GaugeMetricFamily, POD_CPU,
                 "CPU used by a pod, as a share of its limit (or of the node without one), 0-1.", pod,
                 (s.cpu for s in series)),
        _written(GaugeMetricFamily, POD_MEMORY, "Memory used by a pod.", pod, (s.memory for s in series)),
        _written(CounterMetricFamily, POD_RESTARTS, "Container restarts in a pod.", pod,
                 (s.restarts for s in series)),
        phases,
        _written(CounterMetricFamily, CONTAINER_CPU, "CPU time used by a container (its cgroup).", both,
                 (c[0] for c in conts)),
        _written(GaugeMetricFamily, CONTAINER_MEMORY,
                 "Memory a container uses, page cache that can be dropped excluded.", both,
                 (c[1] for c in conts)),
        _written(GaugeMetricFamily, CONTAINER_LIMIT, "A container's memory limit.", both,
                 (c[2] for c in conts if c[2] is not None)),
    ]


class Families(Collector):
    """Families already built, as the ``Collector`` ``generate_latest`` takes."""

    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def exposition(families: Sequence[Family], accept: str = "") -> tuple[bytes, str]:
    """The body and its content type: OpenMetrics when ``accept`` asks for it, else text 0.0.4.
    prometheus_client writes every family, in order, but the sample lines of :class:`Written` ones."""
    if "application/openmetrics-text" in accept:
        encoder, content_type = choose_encoder(accept)
    else:
        encoder, content_type = generate_latest, CONTENT_TYPE
    tail = encoder(Families(()))   # what ends a body: OpenMetrics' "# EOF", which must stay last
    out: list[bytes] = []
    run: list[Metric] = []

    def write(fams: Sequence[Metric]) -> None:
        body = encoder(Families(fams))
        out.append(body[: len(body) - len(tail)])

    for f in families:
        if isinstance(f, Written):
            if run:
                write(run)
                run = []
            write([f.family])
            out.append("".join(f.lines).encode())
        else:
            run.append(f)
    if run:
        write(run)
    out.append(tail)
    return b"".join(out), content_type


def scrape_error_family(errors: int) -> Metric:
    return CounterMetricFamily(
        "riklet_monitor_scrape_errors_total",
        "Scrapes (or parts of one) that failed, e.g. memory unreachable.",
        value=errors,
    )


def all_families(
    node: RealtimeNode,
    pods: Sequence[RealtimePod],
    scrape_errors: int,
    proxy: Mapping[str, Any] | None = None,
    with_proxy: bool = False,
    containers: Sequence[Any] = (),
    manager: Mapping[str, Any] | None = None,
    series: Sequence[PodSeries] = (),
) -> list[Family]:
    """With ``with_proxy``, the proxy's families too (``proxy`` None: it did not answer). Pods
    come as figures (``pods``, ``containers``) or already built (``series``)."""
    fams = pod_families([*(pod_series(p) for p in pods), *series], containers)
    out: list[Family] = [*node_families(node), *fams, scrape_error_family(scrape_errors)]
    out += chas_families(manager) + manager_families(manager)
    if with_proxy:
        out += proxy_families(proxy)
    return out


def render(*args: Any, **kwargs: Any) -> str:
    """The text exposition of :func:`all_families`, called with the same arguments (tests, tools)."""
    return exposition(all_families(*args, **kwargs))[0].decode()


__all__ = ["CONTENT_TYPE", "PodSeries", "all_families", "exposition", "number", "pod_series", "render"]
