"""Log throughput of a process pod and the size of its time index: a pod running
``seq LINES``, timed from ``spawn`` until every line is in its log file.

    python -m bench.log_times --lines 200000 --rounds 5 [--shim BINARY] [--writer lines]

``--writer seq`` (default) writes in 4 KiB blocks; ``--writer lines`` writes each line with a
system call of its own (an unbuffered program: a chunk, so possibly a record, per line).

``--shim`` runs another build of the shim (e.g. one compiled from an older shim.c, to compare).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import tempfile
import time
import uuid

from common.cgroups import Cgroup, detect, prune
from common.errors import RikletError
from services.manager.process import build, shim, shimctl


def _expected_size(lines: int) -> int:
    return sum(len(f"{i}\n") for i in range(1, lines + 1))


WRITERS = {
    "seq": lambda n: ["seq", str(n)],
    "lines": lambda n: ["python3", "-u", "-c", f"for i in range(1, {n + 1}): print(i)"],
}
WRITER = "seq"


def _one(root: str, i: int, parent: str, lines: int) -> tuple[float, int]:
    pod_dir = os.path.join(root, f"pod{i}")
    os.makedirs(pod_dir)
    logs = os.path.join(pod_dir, "logs")
    spec = {"pod": f"bench{i}", "uid": uuid.uuid4().hex, "grace_period": 1.0,
            "cgroup_parent": f"{parent}/bench{i}",
            "log": {"dir": logs, "max_size": 64 << 20, "max_files": 2},
            "containers": [{"name": "app", "command": WRITERS[WRITER](lines), "restart_policy": "Never"}]}
    with open(os.path.join(pod_dir, "spec.json"), "w") as f:
        json.dump(spec, f)
    log = os.path.join(logs, "app.log")
    want = _expected_size(lines)
    t0 = time.perf_counter()
    shim.spawn(pod_dir)
    deadline = t0 + 120
    while True:
        with contextlib.suppress(OSError):
            if os.path.getsize(log) >= want:
                break
        if time.perf_counter() > deadline:
            raise RuntimeError("the log did not fill in 120 s")
        time.sleep(0.001)
    elapsed = time.perf_counter() - t0
    index = 0
    with contextlib.suppress(OSError):
        index = os.path.getsize(log + ".times")
    shimctl.stop(pod_dir, 5)
    return elapsed, index


def run(lines: int, rounds: int) -> dict[str, float]:
    parent = f"riklet-bench/{uuid.uuid4().hex[:12]}"
    layout = detect()
    times, sizes = [], []
    with tempfile.TemporaryDirectory(prefix="riklet-bench-logtimes-") as root:
        try:
            _one(root, rounds, parent, 1000)   # builds and warms: not counted
            for i in range(rounds):
                elapsed, index = _one(root, i, parent, lines)
                times.append(elapsed)
                sizes.append(index)
        finally:
            group = Cgroup(parent, layout) if layout.available else None
            if group is not None and group.exists():
                with contextlib.suppress(RikletError):
                    group.kill_all(signal.SIGKILL)
                    group.remove()
                    prune("riklet-bench")
    log_bytes = _expected_size(lines)
    return {"lines": lines, "log_bytes": log_bytes, "rounds": rounds,
            "seconds_median": round(statistics.median(times), 4), "seconds_min": round(min(times), 4),
            "seconds_max": round(max(times), 4),
            "lines_per_s_median": round(lines / statistics.median(times)),
            "index_bytes_median": statistics.median(sizes)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=200000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--writer", choices=sorted(WRITERS), default="seq")
    parser.add_argument("--shim", help="the shim binary to run (default: the one built from shim.c)")
    args = parser.parse_args()
    global WRITER
    WRITER = args.writer
    if args.shim:
        binary = os.path.abspath(args.shim)
        build.ensure = lambda *_a, **_k: binary   # type: ignore[assignment,misc]
    print(json.dumps(run(args.lines, args.rounds), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
