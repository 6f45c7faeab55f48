"""The scale benchmark (bench.scale): its /proc parsers and CPU arithmetic, the goal table with
its ✓/✗ marks, its refusal of bad flags and of pods that would not fit, and one small run
through main() against a real agent that must print every figure and leave nothing behind."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from bench import scale, scale_proc, scale_report
from bench.scale_report import FAIL, OK, Goal, Row, Table

SMAPS_ROLLUP = """55d0c8a4b000-7ffd3a7fd000 ---p 00000000 00:00 0                          [rollup]
Rss:                9496 kB
Pss:                3120 kB
Pss_Dirty:          1888 kB
Pss_Anon:           1860 kB
Shared_Clean:       6208 kB
"""


def stat_line(pid: int, comm: str, ppid: int, sid: int, utime: int, stime: int, start: int,
              state: str = "S") -> str:
    # fields 3.. of proc(5): state ppid pgrp session tty tpgid flags minflt cminflt majflt
    # cmajflt utime stime cutime cstime priority nice threads itrealvalue starttime vsize
    return (f"{pid} ({comm}) {state} {ppid} {pid} {sid} 0 -1 4194560 10 0 0 0 {utime} {stime} 77 88 "
            f"20 0 1 0 {start} 1000 0")


def test_stat_reads_own_cpu_ticks_session_and_start_even_with_a_tricky_command_name() -> None:
    st = scale_proc.parse_stat(42, stat_line(42, "riklet (shim) x", 7, 40, 5, 3, 12345))
    # the reaped children's time (cutime 77, cstime 88) is kept apart from the process's own
    assert (st.pid, st.state, st.ppid, st.session, st.ticks, st.child_ticks, st.start) == \
        (42, "S", 7, 40, 8, 77 + 88, 12345)


def test_stat_refuses_a_truncated_line() -> None:
    with pytest.raises(ValueError, match="fields"):
        scale_proc.parse_stat(1, "1 (init) S 0 1 1")


def test_machine_busy_is_every_tick_but_idle_and_iowait() -> None:
    assert scale_proc.parse_machine_busy("cpu  10 1 5 900 7 0 2 3 0 0\ncpu0 5 0 2 450 3 0 1 1 0 0\n") == 21
    assert scale_proc.machine_busy() > 0


def test_pss_is_read_in_kib_from_smaps_rollup() -> None:
    assert scale_proc.pss_kib(SMAPS_ROLLUP) == 3120


def test_pss_refuses_a_rollup_without_it() -> None:
    with pytest.raises(ValueError, match="no Pss"):
        scale_proc.pss_kib("Rss: 10 kB\n")
    with pytest.raises(ValueError, match="unexpected"):
        scale_proc.pss_kib("Pss: 10 MB\n")


def test_cpu_counts_deltas_of_survivors_and_all_of_newcomers_never_the_dead_or_a_reused_pid() -> None:
    before = {(10, 100): 50, (11, 100): 70, (12, 100): 30}
    after = {(10, 100): 60,        # +10
             (12, 500): 4,         # pid 12 reused by a new process: its 4, not 4 - 30
             (13, 600): 6}         # born in the window: +6; pid 11 died: not counted
    assert scale_proc.cpu_seconds(before, after, hz=100) == pytest.approx((10 + 4 + 6) / 100)


def test_descendants_are_every_process_below_the_roots() -> None:
    parents = {2: 1, 3: 2, 4: 3, 5: 1, 6: 99}
    assert scale_proc.descendants([2], parents) == {3, 4}
    assert scale_proc.descendants([1], parents) == {2, 3, 4, 5}
    assert scale_proc.descendants([], parents) == set()


def test_live_process_helpers_see_this_process() -> None:
    me = scale_proc.read_stat(os.getpid())
    assert me is not None and me.session == os.getsid(0)
    assert scale_proc.alive([(me.pid, me.start)]) == [(me.pid, me.start)]
    assert scale_proc.alive([(me.pid, me.start + 1)]) == []       # same pid, another process
    assert scale_proc.any_alive([(me.pid, me.start + 1), (me.pid, me.start)])
    assert not scale_proc.any_alive([(me.pid, me.start + 1)])
    assert scale_proc.pss_total_kib([os.getpid()]) > 0


def test_rows_are_marked_against_their_goals() -> None:
    table = Table("1000 pods", [
        Row("idle CPU", 1.5, "%", scale_report.idle_cpu_goal(1000)),
        Row("idle CPU at 5000", 4.0, "%", scale_report.idle_cpu_goal(5000)),
        Row("bulk", 150.0, "pods/s", Goal(200, at_most=False)),
        Row("PSS per pod", None, "MiB", Goal(1.5), note="no pods"),
        Row("left over", 1, "", Goal(0)),
        Row("info", 24),
    ])
    text = scale_report.render_text([table])
    lines = {line.split("  ")[1]: line for line in text.splitlines()[2:] if line.strip()}
    assert lines["idle CPU"].endswith(OK) and "≤ 2%" in lines["idle CPU"]
    assert lines["idle CPU at 5000"].endswith(OK) and "≤ 5%" in lines["idle CPU at 5000"]
    assert lines["bulk"].endswith(FAIL) and "≥ 200 pods/s" in lines["bulk"]
    assert "no pods" in lines["PSS per pod"] and not lines["PSS per pod"].endswith((OK, FAIL))
    assert lines["left over"].endswith(FAIL)
    assert not lines["info"].endswith((OK, FAIL))
    assert scale_report.failed([table]) == ["1000 pods: bulk", "1000 pods: left over"]


def test_markdown_has_one_table_row_per_figure() -> None:
    table = Table("0 pods", [Row("List RPC", 1.25, "ms", Goal(20)), Row("a | b", 60.0, "ms", Goal(50))])
    md = scale_report.render_markdown([table], "preamble")
    assert md.startswith("preamble\n")
    assert "| List RPC | 1.25 ms | ≤ 20 ms | ✓ |" in md
    assert "| a \\| b | 60 ms | ≤ 50 ms | ✗ |" in md


def test_a_summary_sets_the_n_side_by_side_naming_a_goal_where_it_differs() -> None:
    tables = [Table(f"{n} pods", [Row("idle CPU", cpu, "%", scale_report.idle_cpu_goal(n)), Row("info", n)])
              for n, cpu in ((1000, 1.5), (5000, 4.5))]
    assert scale_report.summary_markdown(tables).splitlines() == [
        "| figure | goal | 1000 pods | 5000 pods |",
        "|---|---|---:|---:|",
        "| idle CPU | ≤ 2% | 1.5% ✓ | 4.5% ✓ (≤ 5%) |",
        "| info |  | 1000 | 5000 |",
    ]


def test_delete_goal_is_3_s_up_to_1000_pods_then_proportional() -> None:
    assert scale_report.delete_goal(500).bound == 3.0
    assert scale_report.delete_goal(5000).bound == 15.0


@pytest.mark.parametrize("pods", ["0,abc", "100,0", "0,0", "-1"])
def test_bad_pod_counts_are_refused_naming_the_flag(pods: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert scale.main(["--pods", pods]) == 64
    assert "--pods" in capsys.readouterr().err


def test_quick_sets_small_defaults_that_explicit_flags_override() -> None:
    args = scale.parse_args(["--quick", "--probes", "1"])
    assert (args.pods, args.idle_seconds, args.probes) == ([0, 20], 5.0, 1)
    args = scale.parse_args([])
    assert (args.pods, args.idle_seconds, args.probes) == ([0, 100, 1000, 5000], 60.0, 20)


def test_pods_that_would_not_fit_in_memory_are_refused_with_the_figures() -> None:
    assert scale.fits(1, 1.0) is None
    why = scale.fits(5000, 64 * 1024 * 1024.0)   # 64 GiB per pod
    assert why is not None and "5000 more pods" in why and "MemAvailable" in why


EVERY_ROW = [
    "new pods created", "bulk creation", "Apply call during bulk creation, median",
    "machine CPU per pod created",
    "Apply call alone (one caller), p50", "idle CPU, agent services", "idle CPU, shims",
    "idle CPU, total", "PSS, agent services", "PSS per pod", "Apply->Running, p50",
    "List RPC, median", "/metrics scrape, median", "machine load average", "pod processes found: shims",
    "agent processes", "pod processes found: workloads", "manager open files",
]
LEFTOVERS = ["shim processes", "workload processes", "pod directories", "cgroup directories"]


@pytest.mark.integration
def test_a_small_run_prints_every_figure_and_leaves_nothing(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    md = tmp_path / "scale.md"
    status = scale.main(["--pods", "0,3", "--idle-seconds", "1", "--probes", "2", "--markdown", str(md)])
    out = capsys.readouterr().out
    assert status == 0, out
    for title in ("0 pods", "3 pods"):
        section = out.split(f"\n{title}\n", 1)[1].split("\n\n", 1)[0]
        for label in EVERY_ROW:
            assert re.search(rf"^  {re.escape(label)}", section, re.M), f"{title}: no row {label!r}\n{out}"
    three = out.split("\n3 pods\n", 1)[1]
    assert re.search(r"^  pod processes found: shims +3\b", three, re.M), out
    assert re.search(r"^  pod processes found: workloads +3\b", three, re.M), out
    assert re.search(r"^  PSS per pod \(shims / N\) +[0-9.]+ MiB", three, re.M), out
    for how in ("one Delete per pod from 8 callers", "one Delete(all) call (rikletctl delete --all)"):
        deleted = out.split(f"\ndelete all (3 pods): {how}\n", 1)[1].split("\n\n", 1)[0]
        assert re.search(r"first Delete to List empty and every shim gone +[0-9.]+ s", deleted), out
        assert re.search(r"machine CPU per pod deleted \(every process and the kernel\) +[0-9.]+ ms",
                         deleted), out
        for what in LEFTOVERS:
            assert re.search(rf"^  left over: {what}.* 0 +0 +✓$", deleted, re.M), f"{what}\n{out}"
    text = md.read_text(encoding="utf-8")
    assert "| figure | goal | 0 pods | 3 pods |" in text, text
    assert re.search(r"^\| pod processes found: shims \|  \| 0 \| 3 \|$", text, re.M), text
    assert "| left over: shim processes | 0 | 0 | ✓ |" in text, text


def test_shims_and_workloads_are_also_taken_from_the_pods_status_files(tmp_path: Path) -> None:
    for name, status in (("a", {"shim_pid": 10, "shim_start": 100,
                                "containers": [{"pid": 11, "pid_start": 101}, {"pid": None}]}),
                         ("b", {"shim_pid": 20, "shim_start": 200, "containers": []}),
                         ("c", {"shim_pid": "x"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "status.json").write_text(json.dumps(status), encoding="utf-8")
    (tmp_path / "d").mkdir()   # no status yet
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "status.json").write_text("{half", encoding="utf-8")
    assert scale_proc.recorded(str(tmp_path)) == ({(10, 100), (20, 200)}, {(11, 101)})
    assert scale_proc.pod_dirs(str(tmp_path)) == ["a", "b", "c", "d", "e"]


@pytest.mark.integration
def test_a_run_whose_pods_would_not_fit_stops_before_creating_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    md = tmp_path / "scale.md"
    status = scale.main(["--pods", "10000000", "--idle-seconds", "1", "--probes", "0", "--markdown", str(md)])
    out = capsys.readouterr().out
    assert status == scale.STOPPED_FOR_MEMORY, out
    assert re.search(r"^stopping: 10000000 more pods at [0-9.]+ MiB PSS each .* MemAvailable", out, re.M), out
    assert "\n10000000 pods\n" not in out       # nothing measured at that N
    deleted = out.split("\ndelete all (0 pods): one Delete per pod from 8 callers\n", 1)[1]
    assert "one Delete(all) call" not in out   # no pods to create again
    for what in LEFTOVERS:                     # the pod that sized one pod is gone too
        assert re.search(rf"^  left over: {what}.* 0 +0 +✓$", deleted, re.M), f"{what}\n{out}"
    assert "Not measured at 10000000 pods and above: stopping:" in md.read_text(encoding="utf-8")
