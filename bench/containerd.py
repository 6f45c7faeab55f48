"""containerd benchmark: create-to-Running of riklet's containerd pods beside ``ctr run -d``.

Starts a private containerd and a private agent wired to it, imports a busybox image built
offline, then alternates, N times each:
  - riklet, pod network: Apply of a one-container pod (``sleep``), timed to the first Watch
    event showing it Running (netns + CNI bridge, container, task, log driver);
  - riklet, hostNetwork: the same without a network namespace;
  - ``ctr run -d`` of the same image and command (no CNI: ctr only makes an empty netns),
    timed as the command's wall time (it returns once the task is started).
Prints median and p99 of each and the ratios to ctr, then removes everything.

    make bench-containerd            # N=50
    .venv/bin/python -m bench.containerd --containers 20
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import tempfile
import threading
import time

import grpc

from bench.spine import percentile
from tests.ctrenv import DEFAULT_REF, PrivateContainerd, build_busybox_oci
from tests.stack import Agent, npb


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--containers", type=int, default=50)
    args = parser.parse_args()
    n = args.containers
    workdir = tempfile.mkdtemp(prefix="rkbench-")
    archive = os.path.join(workdir, "busybox.tar")
    build_busybox_oci(archive, DEFAULT_REF)
    with PrivateContainerd() as ctd:
        ns = "riklet-bench"
        agent = Agent(f"containerd:\n  address: {ctd.socket}\n  namespace: {ns}\n"
                      "network:\n  bridge: rkbench0\n  subnet: 10.231.0.0/16\n").start()
        try:
            agent.ctl("image", "import", archive)
            ctd.ctr("images", "import", archive, namespace="ctr-bench", check=True)
            running: queue.Queue[tuple[str, float]] = queue.Queue()

            def watch() -> None:
                seen: set[str] = set()
                try:
                    for ev in agent.stub.Watch(npb.WatchRequest()):
                        if ev.pod.phase == "Running" and ev.pod.name not in seen:
                            seen.add(ev.pod.name)
                            running.put((ev.pod.name, time.perf_counter()))
                except grpc.RpcError:
                    pass

            threading.Thread(target=watch, daemon=True).start()
            time.sleep(0.5)  # let the Watch stream open before the first Apply

            def riklet(name: str, host_network: bool) -> float:
                spec = {"containers": [{"name": "c", "image": DEFAULT_REF, "command": ["sleep", "3600"]}],
                        "hostNetwork": host_network, "terminationGracePeriodSeconds": 0}
                t0 = time.perf_counter()
                agent.stub.Apply(npb.ApplyRequest(manifest=json.dumps({"name": name, "spec": spec})),
                                 timeout=30)
                got, at = running.get(timeout=60)
                assert got == name, (got, name)
                return at - t0

            def ctr(name: str) -> float:
                t0 = time.perf_counter()
                ctd.ctr("run", "-d", "--runc-root", ctd.runc_root, "--fifo-dir", ctd.fifo_dir,
                        DEFAULT_REF, name, "sleep", "3600", namespace="ctr-bench", check=True)
                return time.perf_counter() - t0

            results: dict[str, list[float]] = {"riklet (pod network)": [], "riklet (hostNetwork)": [],
                                               "ctr run -d": []}
            for i in range(n):
                results["riklet (pod network)"].append(riklet(f"net-{i}", False))
                results["riklet (hostNetwork)"].append(riklet(f"host-{i}", True))
                results["ctr run -d"].append(ctr(f"ctr-{i}"))
            base = sorted(results["ctr run -d"])[n // 2]
            print(f"\ncreate -> Running, {n} containers each, busybox image already local "
                  f"({os.cpu_count()} cores)")
            print(f"{'':24} {'median ms':>10} {'p99 ms':>8} {'median / ctr':>13}")
            for label, values in results.items():
                med = sorted(values)[len(values) // 2]
                print(f"{label:24} {med * 1000:10.1f} {percentile(values, 0.99) * 1000:8.1f} "
                      f"{med / base:13.2f}")
            for i in range(n):
                agent.stub.Delete(npb.DeleteRequest(name=f"net-{i}"), timeout=10)
                agent.stub.Delete(npb.DeleteRequest(name=f"host-{i}"), timeout=10)
                ctd.ctr("tasks", "kill", "-s", "SIGKILL", f"ctr-{i}", namespace="ctr-bench")
            deadline = time.monotonic() + 120
            while agent.stub.List(npb.ListRequest(), timeout=10).pods and time.monotonic() < deadline:
                time.sleep(0.2)
            for i in range(n):
                ctd.ctr("tasks", "rm", "-f", f"ctr-{i}", namespace="ctr-bench")
                ctd.ctr("containers", "rm", f"ctr-{i}", namespace="ctr-bench")
        finally:
            agent.close()
            os.system("ip link del rkbench0 2>/dev/null")


if __name__ == "__main__":
    main()
