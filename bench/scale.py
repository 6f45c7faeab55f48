"""Scale benchmark (issue 14): the agent with 0, 100, 1000 and 5000 `sleep` process pods.

Starts a private agent (supervisord and the four services), then for each N of ``--pods``:
creates pods up to N from 8 concurrent Apply callers (pods/s from the first Apply to the last
pod Running; median Apply call), leaves the agent idle for ``--idle-seconds`` (CPU as % of one
core from /proc/PID/stat: utime+stime of the pods' shims, and of the agent's processes plus the
cutime+cstime of helpers they reaped), reads PSS from /proc/PID/smaps_rollup (the agent's
processes; the shims, per pod), times ``--probes`` single pods (the Apply call alone, and from
Apply to Running), and the
medians of 10 List calls and 10 /metrics scrapes. After the largest N it deletes every pod,
one Delete per pod from 8 callers (seconds until List is empty and every shim gone), and counts
what is left: shims, workloads, pod directories, cgroup directories; then it creates that many
pods again (at most 1000) and deletes them with one ``Delete(all)`` call, counted the same way.
Prints a table per N against the issue's goals and writes the same as markdown (``--markdown``).

Before each N it checks that the pods fit in MemAvailable at the per-pod PSS (shim and
workload) measured so far, and stops with a message when they would not.

    make bench-scale                                  # 0,100,1000,5000 pods, 60 s idle windows
    .venv/bin/python -m bench.scale --pods 0,100,500 --idle-seconds 20
    .venv/bin/python -m bench.scale --quick           # 0,20 pods, 5 s idle, 3 probes
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass

from bench import scale_pods as pods
from bench import scale_proc as proc
from bench.scale_report import (
    GOALS,
    Row,
    Table,
    delete_goal,
    failed,
    idle_cpu_goal,
    render_markdown,
    render_text,
    summary_markdown,
)
from common import cgroups
from common.errors import InvalidArgument
from services.manager.runtime import PodLayout
from tests.stack import Agent

MIB = 1024  # KiB per MiB: PSS is read in KiB
MEMORY_RESERVE_KIB = 1024 * MIB   # left free for the agent's growth and the machine's others
STOPPED_FOR_MEMORY = 2            # exit status when the memory guard cut the run short
AT_ONCE_PODS = 1000               # pods created again after the delete, then deleted in one call


@dataclass(frozen=True)
class Procs:
    """The agent's processes at one moment."""

    services: list[int]                # supervisord, the four services, the proxy's workers
    shims: list[int]
    workloads: list[int]               # everything below the shims
    keys: dict[int, proc.Key]          # pid -> (pid, start) of all the above


def look(agent: Agent, pods_root: str) -> Procs:
    stats = proc.all_stats()
    assert agent.proc is not None
    services = proc.session_pids(agent.proc.pid, stats)
    shims = proc.shim_pids(pods_root, stats)
    workloads = proc.descendants(shims, {pid: st.ppid for pid, st in stats.items()}) - shims
    keys = {pid: (pid, stats[pid].start) for pid in [*services, *shims, *workloads] if pid in stats}
    return Procs(services, sorted(shims), sorted(workloads), keys)


def mem_available_kib() -> int:
    with open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    raise OSError("/proc/meminfo has no MemAvailable")


def limits(max_pods: int) -> list[str]:
    """The machine's task limits and this process's open-file limit (the agent inherits it)
    against a shim and a workload per pod (a pidfd and a file per pod in the manager, at
    most); lines to print."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    tasks = sum(_threads(pid) for pid in proc.all_stats()) + 2 * max_pods   # a thread takes a pid
    checks = (("kernel.pid_max", _int_file("/proc/sys/kernel/pid_max"), tasks),
              ("kernel.threads-max", _int_file("/proc/sys/kernel/threads-max"), tasks),
              (f"RLIMIT_NOFILE soft (hard {hard}; the agent inherits it)", soft, 2 * max_pods + 1024))
    return [f"  {name}: {value}; needs about {need} for {max_pods} pods: "
            f"{'fits' if value >= need else 'TOO LOW'}" for name, value, need in checks]


def _threads(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def _int_file(path: str) -> int:
    with open(path, encoding="ascii") as fh:
        return int(fh.read().split()[0])


def fits(new_pods: int, per_pod_kib: float) -> str | None:
    """Why ``new_pods`` more pods would not fit in memory, or None."""
    need = new_pods * per_pod_kib
    free = mem_available_kib() - MEMORY_RESERVE_KIB
    if need <= free:
        return None
    return (f"stopping: {new_pods} more pods at {per_pod_kib / MIB:.1f} MiB PSS each (shim and "
            f"workload, measured) need {need / MIB / 1024:.1f} GiB, but MemAvailable less a "
            f"{MEMORY_RESERVE_KIB // MIB} MiB reserve is {max(0, free) / MIB / 1024:.1f} GiB")


def size_one_pod(agent: Agent, watcher: pods.Watcher, pods_root: str) -> float:
    """PSS (KiB) of a pod's shim and workload, from one pod started alone: a pessimistic
    figure (no other shim shares its pages) for the memory check before the first N. Seeing it
    Running on the Watch stream also proves the stream open before anything is timed by it."""
    pods.probe_hold(agent, watcher, "scale-sizer", resync=False)
    try:
        held = look(agent, pods_root)
        return float(proc.pss_total_kib([*held.shims, *held.workloads]))
    finally:
        pods.remove(agent, watcher, "scale-sizer")


def idle_cpu(agent: Agent, pods_root: str, seconds: float) -> tuple[float, float]:
    """(agent's processes, shims) CPU as % of one core over an idle window."""
    before = look(agent, pods_root)
    svc0, shim0 = proc.ticks_of(before.services, reaped=True), proc.ticks_of(before.shims)
    t0 = time.monotonic()
    time.sleep(seconds)
    after = look(agent, pods_root)
    svc1, shim1 = proc.ticks_of(after.services, reaped=True), proc.ticks_of(after.shims)
    wall = time.monotonic() - t0
    return (100 * proc.cpu_seconds(svc0, svc1) / wall, 100 * proc.cpu_seconds(shim0, shim1) / wall)


def measure(agent: Agent, watcher: pods.Watcher, n: int, have: int, args: argparse.Namespace) -> Table:
    """Steps 1-5 at N pods, ``have`` of which exist already."""
    pods_root = os.path.join(agent.state_dir, "pods")
    busy = proc.machine_busy()
    bulk = pods.bulk_create(agent, watcher, [f"scale-{i:05d}" for i in range(have, n)])
    busy_per_pod = per_pod_ms(proc.machine_busy() - busy, bulk.created)
    time.sleep(min(5.0, args.idle_seconds / 4))   # let the last status writes settle
    cpu_svc, cpu_shims = idle_cpu(agent, pods_root, args.idle_seconds)
    load = os.getloadavg()[0]   # other work on the machine skews every latency here
    now = look(agent, pods_root)
    svc_mib = proc.pss_total_kib(now.services) / MIB
    shim_mib = proc.pss_total_kib(now.shims) / MIB
    timed = [pods.probe(agent, watcher, f"probe-{n}-{k}") for k in range(args.probes)]
    alone, probes = [a for a, _ in timed], [r for _, r in timed]
    fds = proc.fd_usage(agent.service_pid("manager"))
    return Table(f"{n} pods", [
        Row("new pods created", bulk.created),
        Row(f"bulk creation, {pods.CALLERS} callers", bulk.rate, "pods/s", GOALS["bulk"], note="no new pods"),
        Row("Apply call during bulk creation, median",
            statistics.median(bulk.apply_ms) if bulk.apply_ms else None, "ms", GOALS["apply_call"],
            note="no new pods"),
        Row("machine CPU per pod created (every process and the kernel)", busy_per_pod, "ms",
            note="no new pods"),
        Row(f"Apply call alone (one caller), p50 of {len(alone)}",
            statistics.median(alone) if alone else None, "ms", GOALS["apply_call"]),
        Row(f"idle CPU, agent services ({args.idle_seconds:g} s)", cpu_svc, "%"),
        Row("idle CPU, shims", cpu_shims, "%"),
        Row("idle CPU, total (% of one core)", cpu_svc + cpu_shims, "%", idle_cpu_goal(n)),
        Row("PSS, agent services", svc_mib, "MiB", GOALS["pss_services"]),
        Row("PSS per pod (shims / N)", shim_mib / n if n else None, "MiB", GOALS["pss_per_pod"],
            note="no pods"),
        Row(f"Apply->Running, p50 of {len(probes)}", statistics.median(probes) if probes else None, "ms",
            GOALS["apply_running"]),
        Row("List RPC, median of 10", pods.list_ms(agent), "ms", GOALS["list"]),
        Row("/metrics scrape, median of 10", pods.metrics_ms(agent), "ms", GOALS["metrics"]),
        Row("machine load average, 1 min (after the idle window)", load),
        Row("agent processes (supervisord, services, proxy workers)", len(now.services)),
        Row("pod processes found: shims", len(now.shims)),
        Row("pod processes found: workloads", len(now.workloads)),
        Row(f"manager open files (limit {fds[1] if fds else '?'})", fds[0] if fds else None),
    ])


def teardown(agent: Agent, watcher: pods.Watcher, at_once: bool = False) -> Table:
    """Delete everything, one Delete per pod from several callers (``at_once``: one Delete of
    all), then count what is left (polled for a few seconds to settle)."""
    pods_root = os.path.join(agent.state_dir, "pods")
    before = look(agent, pods_root)
    shims, workloads = proc.recorded(pods_root)
    shim_keys = sorted(shims.union(before.keys[p] for p in before.shims))
    work_keys = sorted(workloads.union(before.keys[p] for p in before.workloads))
    busy = proc.machine_busy()
    delete = pods.delete_all_at_once if at_once else pods.delete_all
    n, seconds = delete(agent, watcher, lambda: not proc.any_alive(shim_keys))
    busy_per_pod = per_pod_ms(proc.machine_busy() - busy, n)
    group = PodLayout(agent.state_dir).agent_cgroup()

    def left() -> tuple[int, int, int, int]:
        return (len(proc.alive(shim_keys)), len(proc.alive(work_keys)), len(proc.pod_dirs(pods_root)),
                len(proc.cgroup_dirs(group, cgroups.hierarchies())))

    deadline = time.monotonic() + 10
    counts = left()
    while any(counts) and time.monotonic() < deadline:
        time.sleep(0.1)
        counts = left()
    leftover = GOALS["leftover"]
    how = ("one Delete(all) call (rikletctl delete --all)" if at_once
           else f"one Delete per pod from {pods.CALLERS} callers")
    return Table(f"delete all ({n} pods): {how}", [
        Row("delete all: first Delete to List empty and every shim gone", seconds, "s", delete_goal(n)),
        Row("machine CPU per pod deleted (every process and the kernel)", busy_per_pod, "ms",
            note="no pods"),
        Row("left over: shim processes", counts[0], "", leftover),
        Row("left over: workload processes", counts[1], "", leftover),
        Row("left over: pod directories", counts[2], "", leftover),
        Row(f"left over: cgroup directories under {group}", counts[3], "", leftover),
    ])


def per_pod_ms(ticks: int, pods_done: int) -> float | None:
    """Milliseconds of machine CPU per pod, from busy clock ticks."""
    return 1000.0 * ticks / proc.CLK_TCK / pods_done if pods_done else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", help="pod counts, ascending (default 0,100,1000,5000)")
    parser.add_argument("--idle-seconds", type=float, help="idle window per N (default 60)")
    parser.add_argument("--probes", type=int, help="single pods timed Apply->Running per N (default 20)")
    parser.add_argument("--quick", action="store_true", help="smoke run: pods 0,20, idle 5 s, probes 3")
    parser.add_argument("--markdown", default=os.path.join(os.path.dirname(__file__), "last-scale.md"),
                        help="where the markdown tables go")
    args = parser.parse_args(argv)
    quick = args.quick
    args.pods = _counts(args.pods or ("0,20" if quick else "0,100,1000,5000"))
    args.idle_seconds = args.idle_seconds if args.idle_seconds is not None else 5.0 if quick else 60.0
    args.probes = args.probes if args.probes is not None else 3 if quick else 20
    if args.idle_seconds <= 0:
        parser.error("--idle-seconds must be above 0")
    if args.probes < 0:
        parser.error("--probes must be 0 or more")
    return args


def _counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise InvalidArgument(f"--pods: {text!r} is not a list of numbers like 0,100,1000", "pods") from None
    if any(c < 0 for c in counts) or counts != sorted(set(counts)):
        raise InvalidArgument(f"--pods: {text!r} must be distinct counts >= 0, ascending", "pods")
    return counts


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except InvalidArgument as exc:
        print(f"bench.scale: {exc}", file=sys.stderr)
        return 64
    print(f"scale benchmark: pods {args.pods}, idle {args.idle_seconds:g} s, probes {args.probes}")
    print("machine limits:", *limits(max(args.pods)), sep="\n")
    agent = Agent()
    agent.env["LOG_LEVEL"] = "INFO"   # the default; the test stack's DEBUG would cost CPU per pod
    agent.start()
    watcher = pods.Watcher(agent).start()
    try:
        per_n, notes = measure_all(agent, watcher, args)
        again = min(len(pods.all_names(agent)), AT_ONCE_PODS)   # what was measured, not asked
        final = [teardown(agent, watcher)]
        print(render_text(final))
        if again:   # as many pods again (up to AT_ONCE_PODS), deleted with one call
            pods.bulk_create(agent, watcher, [f"again-{i:05d}" for i in range(again)])
            time.sleep(2.0)   # the last status writes settle, as before the first delete
            final.append(teardown(agent, watcher, at_once=True))
            print(render_text(final[-1:]))
    finally:
        watcher.close()
        agent.close()
    write_markdown(args, per_n, final, notes)
    misses = failed([*per_n, *final])
    print(f"figures that miss their goal: {len(misses)}" + (" (" + "; ".join(misses) + ")" if misses else ""))
    return STOPPED_FOR_MEMORY if notes else 0


def measure_all(agent: Agent, watcher: pods.Watcher,
                args: argparse.Namespace) -> tuple[list[Table], list[str]]:
    """A table per N, printed as it is done; stops (with a note) before an N that would not
    fit in memory at the per-pod PSS measured last."""
    pods_root = os.path.join(agent.state_dir, "pods")
    estimate = size_one_pod(agent, watcher, pods_root)
    tables: list[Table] = []
    have = 0
    for n in args.pods:
        if n > have and (why := fits(n - have, estimate)) is not None:
            print(why)
            return tables, [f"Not measured at {n} pods and above: {why}."]
        tables.append(measure(agent, watcher, n, have, args))
        print(render_text(tables[-1:]), flush=True)
        have = n
        now = look(agent, pods_root)
        if now.shims:
            estimate = proc.pss_total_kib([*now.shims, *now.workloads]) / len(now.shims)
    return tables, []


def write_markdown(args: argparse.Namespace, per_n: list[Table], final: list[Table],
                   notes: list[str]) -> None:
    """One table with a column per N, then the delete-all table and any note."""
    with open("/proc/meminfo", encoding="ascii") as fh:
        total = int(fh.readline().split()[1])
    preamble = (f"`make bench-scale` ({time.strftime('%Y-%m-%d')}; {os.cpu_count()} cores, "
                f"{total / MIB / 1024:.0f} GiB, Linux {platform.release()}; pods {args.pods}, "
                f"idle windows {args.idle_seconds:g} s, probes {args.probes})")
    with open(args.markdown, "w", encoding="utf-8") as fh:
        fh.write(f"{preamble}\n\n{summary_markdown(per_n)}\n{render_markdown(final)}"
                 + "".join(f"{note}\n" for note in notes))


if __name__ == "__main__":
    sys.exit(main())
