"""The proxy benchmark's figures: CPU added over direct per unit, ratios, goals, kill -9 counts.

From the records bench.proxy collects (one per run: busy CPU-seconds, wall seconds, units of
work, the round's idle level), with bench.cpu's definitions. The kernel mode's runs (phase 2)
are charged against the same round's direct run of phase 1, before any NAT table existed.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from bench import cpu

# scenario -> (row label, unit shown, scale from seconds per unit, reference, goal ratio)
SCENARIOS: dict[str, tuple[str, str, float, str, float]] = {
    "keep-alive": ("keep-alive 1 KiB x64", "µs per request", 1e6, "haproxy", 0.25),
    "bulk": ("bulk 1 MiB x16", "ms per GiB", 1e3, "haproxy", 0.25),
    "connect": ("new connection per request x16", "µs per connection", 1e6, "haproxy", 0.4),
    "udp": ("UDP echo 64 B x32 flows", "µs per echo", 1e6, "nginx", 0.25),
}
COLUMNS = ["haproxy", "nginx", "riklet-kernel", "riklet-userspace"]
LABELS = {"haproxy": "HAProxy 2.6", "nginx": "nginx stream", "riklet-kernel": "riklet kernel",
          "riklet-userspace": "riklet userspace", "direct": "direct"}
RIKLET = ["riklet-kernel", "riklet-userspace"]
CT_DIRECT = "direct, riklet's NAT table loaded"
Added = dict[str, dict[str, list[float]]]     # scenario -> name -> seconds per unit, per round


def net(record: dict[str, Any]) -> float:
    """CPU-seconds per unit of work above the idle level."""
    win = cpu.Window(record["busy_s"], record["wall_s"])
    return cpu.net_per_unit(win, record["idle_cpus"], record["units"])


def added(records: list[dict[str, Any]]) -> tuple[Added, dict[str, list[float]]]:
    """CPU added over direct per unit and per round for every proxy (the second direct run of
    phase 2 as ``CT_DIRECT``), and the direct runs' own net cost per unit (the floor)."""
    floor: dict[tuple[str, int], float] = {}
    for r in records:
        if r["name"] == "direct" and r["phase"] == 1:
            floor[(r["scenario"], r["rep"])] = net(r)
    out: Added = defaultdict(lambda: defaultdict(list))
    floors: dict[str, list[float]] = defaultdict(list)
    for (scenario, _), value in sorted(floor.items()):
        floors[scenario].append(value)
    for r in records:
        base = floor.get((r["scenario"], r["rep"]))
        if base is None or (r["name"] == "direct" and r["phase"] == 1):
            continue
        name = CT_DIRECT if r["name"] == "direct" else r["name"]
        out[r["scenario"]][name].append(cpu.added_over_direct(net(r), base))
    return out, floors


def medians(values: Added) -> dict[str, dict[str, float]]:
    return {s: {n: statistics.median(v) for n, v in by.items() if v} for s, by in values.items()}


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference or reference <= 0:
        return None
    return value / reference


def _num(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _ratio_cell(r: float | None, ref: str, goal: float) -> str:
    if r is None:
        return "—"
    return f"{r:.2f}x {LABELS[ref]} {'✓' if r <= goal else '✗'}"


def nat_alone(got: dict[str, float]) -> float | None:
    """Kernel mode over the direct run made with riklet's table loaded (conntrack tracking every
    flow, as on any node with a NAT rule): what the DNAT itself adds."""
    kernel, ct = got.get("riklet-kernel"), got.get(CT_DIRECT)
    return None if kernel is None or ct is None else kernel - ct


def scenario_row(scenario: str, got: dict[str, float]) -> str:
    label, unit, scale, ref, goal = SCENARIOS[scenario]
    cells = [_num(got[c] * scale) if c in got else "—" for c in COLUMNS]
    ratios = [_ratio_cell(ratio(got.get(r), got.get(ref)), ref, goal) for r in RIKLET]
    alone = nat_alone(got)
    if alone is not None:
        cells[COLUMNS.index("riklet-kernel")] += f" ({_num(alone * scale)} NAT alone)"
        r = ratio(alone, got.get(ref))
        if r is not None:
            ratios[0] += f" ({r:.2f}x NAT alone {'✓' if r <= goal else '✗'})"
    return f"| {label}, {unit} | " + " | ".join(cells + ratios) + f" | ≤ {goal:g}x {LABELS[ref]} |"


def kill_row(kills: list[dict[str, Any]], rounds: int) -> str:
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for k in kills:
        by[k["name"]].append(k)
    cells = []
    for c in COLUMNS:
        got = by.get(c)
        if not got:
            cells.append("—")
            continue
        note = " (restarted at once)" if c in ("haproxy", "nginx") else ""
        if any(k["failed"] < 0 for k in got):
            cells.append(f"not back within 30 s{note}")
            continue
        failed = sum(k["failed"] for k in got)
        worst = max(k["outage_s"] for k in got) * 1000
        cells.append(f"{failed} ({worst:.0f} ms max){note}")
    return (f"| failed requests during kill -9 of every proxy process ({rounds} rounds, "
            "a request every 5 ms) | " + " | ".join(cells) + " | | | riklet kernel: 0 |")


def render(results: dict[str, Any]) -> str:
    values, floors = added(results["runs"])
    got = medians(values)
    rounds = results["kill_rounds"]
    reps = results["settings"]["reps"]
    head = ["HAProxy 2.6", "nginx stream", "riklet kernel", "riklet userspace",
            "riklet kernel ÷ reference", "riklet userspace ÷ reference", "goal"]
    lines = [f"| CPU added over direct (median of {reps}) | " + " | ".join(head) + " |",
             "|---" * (len(head) + 1) + "|"]
    lines += [scenario_row(s, got[s]) for s in SCENARIOS if s in got]
    lines.append(kill_row(results["kills"], rounds))
    missing = results.get("kernel_unavailable")
    if missing:
        lines.append(f"\nriklet-kernel: not available ({missing})")
    else:
        lines.append("\nriklet kernel: over the direct run made before any NAT table existed, so "
                     "conntrack tracking every flow is charged to it; in brackets, over the direct "
                     "run made with its table loaded: the DNAT alone.")
    lines.append("")
    lines += context(got, floors)
    lines += failed_requests(results["runs"])
    return "\n".join(lines)


def failed_requests(records: list[dict[str, Any]]) -> list[str]:
    """wrk's socket errors and non-2xx answers, where a run had any (none is the norm)."""
    bad: dict[tuple[str, str], float] = defaultdict(float)
    for r in records:
        if r.get("errors"):
            bad[(r["scenario"], r["name"])] += r["errors"]
    return [f"failed requests under load: {name}, {scenario}: {n:.0f} in all runs"
            for (scenario, name), n in sorted(bad.items())]


def context(got: dict[str, dict[str, float]], floors: dict[str, list[float]]) -> list[str]:
    """The direct run's own cost per unit and what loading riklet's NAT table costs it."""
    out = []
    for scenario, (label, unit, scale, _, _) in SCENARIOS.items():
        if scenario not in floors:
            continue
        line = f"direct, {label}: {_num(statistics.median(floors[scenario]) * scale)} {unit}"
        ct = got.get(scenario, {}).get(CT_DIRECT)
        if ct is not None:
            line += f"; with riklet's NAT table loaded (conntrack on every flow): {ct * scale:+.3g}"
        out.append(line)
    return out
