"""rikletctl's ``logs`` flags for times, as kubectl's: ``--since 10m`` (a duration back from
now), ``--since-time RFC3339``, ``--timestamps``."""

from __future__ import annotations

import argparse
import time

from common.errors import InvalidArgument
from common.since import parse_duration, parse_time


def add_arguments(sp: argparse.ArgumentParser) -> None:
    when = sp.add_mutually_exclusive_group()
    when.add_argument("--since", metavar="DURATION",
                      help="only lines written in the last DURATION, e.g. 10s, 5m, 1h30m")
    when.add_argument("--since-time", metavar="TIME",
                      help="only lines written at or after TIME (RFC 3339, e.g. 2026-12-04T05:00:00Z)")
    sp.add_argument("--timestamps", action="store_true",
                    help="prefix each line with the time it was written (RFC 3339, nanoseconds)")


def since_unix_nano(args: argparse.Namespace) -> int:
    """The request's since_unix_nano (0: all lines); a bad value names its flag."""
    if args.since is not None:
        ns = time.time_ns() - parse_duration(args.since, "--since")
    elif args.since_time is not None:
        ns = parse_time(args.since_time, "--since-time")
    else:
        return 0
    if ns <= 0:
        flag = "--since" if args.since is not None else "--since-time"
        raise InvalidArgument("goes back before 1970", flag)
    return ns
