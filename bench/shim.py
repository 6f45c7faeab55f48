"""The per-pod shim alone: how long ``spawn`` takes for a ``sleep`` pod (to "containers
started": the first status.json written), and what each running shim costs in PSS.

    python -m bench.shim --spawns 50

Pods are started one after the other and all kept running until the end, so the PSS figures
are those of N shims side by side (shared pages divided among them, as on a busy node).
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
from services.manager.process import shim, shimctl


def _pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))


def _write_pod(root: str, i: int, parent: str) -> str:
    pod_dir = os.path.join(root, f"pod{i}")
    os.makedirs(pod_dir)
    spec = {"pod": f"bench{i}", "uid": uuid.uuid4().hex, "grace_period": 1.0,
            "cgroup_parent": f"{parent}/bench{i}", "log": {"dir": os.path.join(pod_dir, "logs")},
            "containers": [{"name": "app", "command": ["sleep", "600"], "restart_policy": "Never"}]}
    with open(os.path.join(pod_dir, "spec.json"), "w") as f:
        json.dump(spec, f)
    return pod_dir


def run(spawns: int) -> dict[str, float]:
    parent = f"riklet-bench/{uuid.uuid4().hex[:12]}"
    layout = detect()
    times, pids, dirs = [], [], []
    with tempfile.TemporaryDirectory(prefix="riklet-bench-shim-") as root:
        try:
            dirs.append(_write_pod(root, spawns, parent))
            shim.spawn(dirs[-1])  # builds the binary if needed, warms the caches: not counted
            for i in range(spawns):
                dirs.append(_write_pod(root, i, parent))
                t0 = time.perf_counter()
                pids.append(shim.spawn(dirs[-1]))
                times.append((time.perf_counter() - t0) * 1000)
                state = (shimctl.read_status(dirs[-1]) or {})["containers"][0]["state"]
                assert state == "running", f"pod {i}: {state}"
            pss = [_pss_kib(pid) for pid in pids]  # all running: shared pages split among them
        finally:
            for d in dirs:
                shimctl.stop(d, 5)
            group = Cgroup(parent, layout) if layout.available else None
            if group is not None and group.exists():
                with contextlib.suppress(RikletError):
                    group.kill_all(signal.SIGKILL)  # only when a stop above failed
                    group.remove()
                    prune("riklet-bench")  # the shared parent, when no other run uses it
    return {"spawns": spawns, "spawn_ms_median": statistics.median(times),
            "spawn_ms_p90": sorted(times)[int(len(times) * 0.9) - 1], "spawn_ms_max": max(times),
            "pss_kib_median": statistics.median(pss), "pss_kib_max": max(pss)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spawns", type=int, default=50)
    args = parser.parse_args()
    print(json.dumps(run(args.spawns), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
