"""The scale benchmark's figures against issue 14's goals, as text tables and as markdown.

Pure: :class:`Row` values in, strings out. A goal is a bound and a direction; a figure that
could not be measured (``None``: no pods to divide by, a step stopped) shows "-" and no mark.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

OK, FAIL = "✓", "✗"


@dataclass(frozen=True)
class Goal:
    bound: float
    at_most: bool = True   # False: the figure must be at least ``bound``

    def met(self, value: float) -> bool:
        return value <= self.bound if self.at_most else value >= self.bound

    def text(self, unit: str) -> str:
        if self.at_most and self.bound == 0:
            return "0"
        return f"{'≤' if self.at_most else '≥'} {_number(self.bound)}{_unit(unit)}"


@dataclass(frozen=True)
class Row:
    label: str
    value: float | None
    unit: str = ""
    goal: Goal | None = None
    note: str = ""          # shown instead of the value when there is none

    def cells(self) -> tuple[str, str, str, str]:
        shown = (self.note or "-") if self.value is None else f"{_number(self.value)}{_unit(self.unit)}"
        goal = self.goal.text(self.unit) if self.goal else ""
        mark = "" if self.goal is None or self.value is None else OK if self.goal.met(self.value) else FAIL
        return self.label, shown, goal, mark


@dataclass(frozen=True)
class Table:
    title: str
    rows: Sequence[Row]


def idle_cpu_goal(pods: int) -> Goal:
    """Issue 14: ≤ 2 % of a core at 1000 pods (so also with fewer), ≤ 5 % at 5000."""
    return Goal(2.0 if pods <= 1000 else 5.0)


def delete_goal(pods: int) -> Goal:
    """≤ 3 s at 1000 pods; the issue names no bound for more, so 3 s per 1000 beyond that."""
    return Goal(3.0 if pods <= 1000 else 3.0 * pods / 1000)


GOALS = {
    "bulk": Goal(200, at_most=False),
    "apply_call": Goal(5),
    "pss_per_pod": Goal(1.5),
    "pss_services": Goal(150),
    "apply_running": Goal(20),
    "list": Goal(20),
    "metrics": Goal(50),
    "leftover": Goal(0),
}


def render_text(tables: Sequence[Table]) -> str:
    out = []
    for table in tables:
        cells = [("figure", "value", "goal", ""), *(row.cells() for row in table.rows)]
        widths = [max(len(c[i]) for c in cells) for i in range(3)]
        out.append(table.title)
        for c in cells:
            out.append("  " + "  ".join(c[i].ljust(widths[i]) for i in range(3)) + "  " + c[3])
        out.append("")
    return "\n".join(line.rstrip() for line in out)


def render_markdown(tables: Sequence[Table], preamble: str = "") -> str:
    out = [preamble, ""] if preamble else []
    for table in tables:
        out += [f"**{table.title}**", "", "| figure | value | goal | |", "|---|---:|---|---|"]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row.cells()) + " |" for row in table.rows]
        out.append("")
    return "\n".join(out)


def summary_markdown(tables: Sequence[Table]) -> str:
    """The tables of several N side by side: a row per figure (by label, in first-seen order),
    a column per N; the goal column is the first N's, and a cell whose goal differs names its
    own."""
    labels = list(dict.fromkeys(row.label for t in tables for row in t.rows))
    by_n = [{row.label: row for row in t.rows} for t in tables]
    out = ["| figure | goal | " + " | ".join(t.title for t in tables) + " |",
           "|---|---|" + "---:|" * len(tables)]
    for label in labels:
        goals = [cols[label].cells()[2] for cols in by_n if label in cols]
        cells = []
        for cols in by_n:
            row = cols.get(label)
            if row is None:
                cells.append("")
                continue
            _, value, goal, mark = row.cells()
            cells.append(f"{value} {mark}".strip() + (f" ({goal})" if goal != goals[0] else ""))
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in [label, goals[0], *cells]) + " |")
    return "\n".join(out) + "\n"


def failed(tables: Sequence[Table]) -> list[str]:
    """Labels of the figures that miss their goal."""
    return [f"{t.title}: {r.label}" for t in tables for r in t.rows if r.cells()[3] == FAIL]


def _number(value: float) -> str:
    if value == int(value) and abs(value) >= 10:
        return str(int(value))
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}" if abs(value) < 1000 else f"{value:.0f}"


def _unit(unit: str) -> str:
    return "" if not unit else unit if unit == "%" else f" {unit}"
