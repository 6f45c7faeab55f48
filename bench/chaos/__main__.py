"""``python -m bench.chaos``: run the scenarios, print one row each, exit 1 when any failed."""

from __future__ import annotations

import argparse
import os
import sys
import uuid

import bench.chaos
from bench.chaos import DEFINITIONS, SCENARIOS, bombs, floods, kills, race
from bench.chaos.scenario import Row, Scenario, Settings, run
from bench.chaos.verify import Counts

ALL: list[Scenario] = [*kills.SCENARIOS, *race.SCENARIOS, *bombs.SCENARIOS, *floods.SCENARIOS]
BY_NAME = {s.name: s for s in ALL}
COLUMNS = ("scenario", "acked", "lost", "dup", "orphan", "rec.lost", "restarts", "result")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.chaos", description=(bench.chaos.__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=SCENARIOS + DEFINITIONS)
    p.add_argument("--scenarios", default="all", help="comma list of scenarios, or 'all' (default)")
    p.add_argument("--ops", type=int, default=Settings.ops,
                   help="API calls of the churn per scenario; for the race, apply/delete/apply "
                        "rounds (default %(default)s)")
    p.add_argument("--pods", type=int, default=Settings.pods,
                   help="distinct pod names per scenario (default %(default)s)")
    p.add_argument("--seed", type=int, default=Settings.seed, help="random seed (default %(default)s)")
    p.add_argument("--settle", type=float, default=Settings.settle,
                   help="seconds the agent gets to agree with the ledger (default %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="print each pod that was counted")
    args = p.parse_args(argv)
    chosen = list(BY_NAME) if args.scenarios == "all" else [s.strip() for s in args.scenarios.split(",")]
    unknown = [s for s in chosen if s not in BY_NAME]
    if unknown:
        p.error(f"--scenarios: unknown {', '.join(unknown)} (known: {', '.join(BY_NAME)})")
    if args.ops < 3 or args.pods < 1:
        p.error("--ops must be at least 3 and --pods at least 1")
    args.chosen = chosen
    return args


def format_row(row: Row) -> list[str]:
    c = row.counts
    restarts = "/".join(str(row.restarts.get(s, 0)) for s in kills.SERVICES)
    return [row.name, str(row.acked), str(c.lost), str(c.duplicated), str(c.orphaned),
            str(c.records_lost), restarts, "FAIL" if row.failed else "ok"]


def print_table(rows: list[Row], verbose: bool) -> None:
    cells = [list(COLUMNS)] + [format_row(r) for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    for line in cells:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    print("\n(restarts: memory/manager/monitor/proxy)")
    for row in rows:
        print(f"\n{row.name} ({row.seconds:.0f}s): " + "; ".join(row.notes))
        for failure in row.failures:
            print(f"  FAILED: {failure}")
        for detail in row.counts.detail[: None if verbose else 8]:
            print(f"  {detail}")


def run_one(scenario: Scenario, settings: Settings) -> Row:
    try:
        return run(scenario, settings)
    except Exception as exc:  # e.g. the agent did not start: a failed row, the others still run
        return Row(scenario.name, 0, Counts(unverified=True), {}, [], [f"could not run: {exc!r}"[:300]], 0.0)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    settings = Settings(ops=args.ops, pods=args.pods, seed=args.seed, settle=args.settle,
                        run=f"chaos-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    rows = []
    for name in args.chosen:
        print(f"-- {name}", file=sys.stderr, flush=True)
        rows.append(run_one(BY_NAME[name], settings))
    print_table(rows, args.verbose)
    failed = [r.name for r in rows if r.failed]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} scenarios passed" +
          (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
