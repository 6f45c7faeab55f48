"""The proxy benchmark's machine-wide CPU accounting (bench.cpu) and the figures built on it
(bench.proxy_report): parsing /proc/stat, subtracting the idle level and the direct run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench import cpu, proxy_report

# user nice system idle iowait irq softirq steal guest guest_nice
STAT = """cpu  1000 20 300 5000 40 6 70 8 500 9
cpu0 500 10 150 2500 20 3 35 4 250 4
cpu1 500 10 150 2500 20 3 35 4 250 5
intr 12345 0 0
ctxt 999
"""


def test_busy_counts_user_nice_system_irq_softirq_of_all_cpus() -> None:
    # idle, iowait, steal (another machine's) and guest (already inside user) are not busy
    assert cpu.busy_ticks(STAT) == 1000 + 20 + 300 + 6 + 70


def test_busy_refuses_a_stat_without_the_aggregate_line() -> None:
    with pytest.raises(ValueError, match="no aggregate 'cpu' line"):
        cpu.busy_ticks("cpu0 1 2 3 4 5 6 7 8\n")
    with pytest.raises(ValueError, match="columns"):
        cpu.busy_ticks("cpu 1 2 3\n")


def test_process_ticks_sums_own_and_reaped_children_time() -> None:
    # comm may hold spaces and parentheses; fields 14-17 (1-based) are utime stime cutime cstime
    line = "42 (a (b) c) S 1 42 42 0 -1 4194560 10 0 0 0 7 3 11 13 20 0 1 0 100 0 0"
    assert cpu.process_ticks(line) == 7 + 3 + 11 + 13


def test_kernel_threads_are_never_foreign() -> None:
    flags = cpu.PF_KTHREAD | 0x40
    line = f"9 (ksoftirqd/0) S 2 0 0 0 -1 {flags} 0 0 0 0 50 60 0 0 20 0 1 0 5 0 0"
    assert cpu.process_ticks(line) is None


def test_window_subtracts_what_other_processes_used() -> None:
    before = cpu.Sample(busy_ticks=1000, foreign_ticks=400, at=10.0)
    after = cpu.Sample(busy_ticks=1500, foreign_ticks=550, at=12.0)
    win = cpu.window(before, after, hz=100)
    assert win == cpu.Window(busy_s=3.5, wall_s=2.0)
    with pytest.raises(ValueError, match="out of order"):
        cpu.window(after, before, hz=100)


def test_net_cost_subtracts_the_idle_level_per_second_of_the_run() -> None:
    idle = cpu.idle_rate(cpu.Window(busy_s=0.3, wall_s=3.0))       # 0.1 CPU busy at rest
    assert idle == pytest.approx(0.1)
    run = cpu.Window(busy_s=2.5, wall_s=5.0)                      # 0.5 of it is the idle level
    assert cpu.net_per_unit(run, idle, units=100_000) == pytest.approx(20e-6)
    with pytest.raises(ValueError, match="no work"):
        cpu.net_per_unit(run, idle, units=0)
    assert cpu.added_over_direct(20e-6, 12e-6) == pytest.approx(8e-6)


def test_foreign_ticks_counts_a_busy_process_of_another_namespace() -> None:
    # "net:[0]" is nobody's namespace: every user process, this busy child included, is foreign
    before = cpu.foreign_ticks("net:[0]")
    subprocess.run([sys.executable, "-c", "import time\nt = time.process_time()\n"
                    "while time.process_time() - t < 0.5: pass"], check=True)
    assert cpu.foreign_ticks("net:[0]") - before >= 0.4 * cpu.CLK_TCK


def _run(name: str, phase: int, rep: int, busy: float, units: float, scenario: str = "keep-alive",
         wall: float = 5.0, idle: float = 0.1) -> dict[str, object]:
    return {"name": name, "phase": phase, "rep": rep, "scenario": scenario, "busy_s": busy,
            "wall_s": wall, "units": units, "idle_cpus": idle}


def test_added_is_over_the_same_rounds_direct_run_of_the_first_phase() -> None:
    records = [
        _run("direct", 1, 0, busy=1.5, units=100_000),     # (1.5 - 0.5) / 1e5 = 10 us
        _run("haproxy", 1, 0, busy=2.5, units=50_000),     # 40 us, added 30
        _run("direct", 2, 0, busy=1.7, units=100_000),     # 12 us: the NAT table costs 2
        _run("riklet-kernel", 2, 0, busy=1.8, units=100_000),   # 13 us, added 3
        _run("direct", 1, 1, busy=1.5, units=50_000),      # another round: 20 us
        _run("haproxy", 1, 1, busy=2.5, units=50_000),     # added 20
    ]
    values, floors = proxy_report.added(records)
    assert values["keep-alive"]["haproxy"] == pytest.approx([30e-6, 20e-6])
    assert values["keep-alive"]["riklet-kernel"] == pytest.approx([3e-6])
    assert values["keep-alive"][proxy_report.CT_DIRECT] == pytest.approx([2e-6])
    assert floors["keep-alive"] == pytest.approx([10e-6, 20e-6])


def test_the_row_shows_ratios_against_the_reference_and_the_goal() -> None:
    row = proxy_report.scenario_row("keep-alive", {"haproxy": 30e-6, "nginx": 25e-6,
                                                   "riklet-kernel": 3e-6, "riklet-userspace": 33e-6})
    assert row == ("| keep-alive 1 KiB x64, µs per request | 30 | 25 | 3 | 33 | 0.10x HAProxy 2.6 ✓ "
                   "| 1.10x HAProxy 2.6 ✗ | ≤ 0.25x HAProxy 2.6 |")
    udp = proxy_report.scenario_row("udp", {"nginx": 10e-6, "riklet-userspace": 9e-6})
    assert "| — | 10 | — | 9 | — | 0.90x nginx stream ✗ | ≤ 0.25x nginx stream |" in udp


def test_unavailable_kernel_mode_is_said_with_its_reason() -> None:
    results = {"runs": [_run("direct", 1, 0, 1.5, 1e5), _run("haproxy", 1, 0, 2.5, 5e4)],
               "kills": [{"name": "haproxy", "outage_s": 0.02, "failed": 2}],
               "kernel_unavailable": "proxy.mode: unknown configuration key",
               "settings": {"reps": 1}, "kill_rounds": 1}
    text = proxy_report.render(results)
    assert "riklet-kernel: not available (proxy.mode: unknown configuration key)" in text
    assert "| 2 (20 ms max) (restarted at once) |" in text


def test_kernel_mode_also_shows_the_dnat_alone_over_direct_with_its_table_loaded() -> None:
    row = proxy_report.scenario_row("connect", {"haproxy": 50e-6, "riklet-kernel": 20e-6,
                                                proxy_report.CT_DIRECT: 12e-6})
    assert "| 20 (8 NAT alone) |" in row
    assert "| 0.40x HAProxy 2.6 ✓ (0.16x NAT alone ✓) |" in row


def test_failed_requests_under_load_are_reported() -> None:
    records = [_run("direct", 1, 0, 1.5, 1e5) | {"errors": 0.0},
               _run("haproxy", 1, 0, 2.5, 5e4) | {"errors": 3.0},
               _run("haproxy", 1, 1, 2.5, 5e4) | {"errors": 2.0}]
    assert proxy_report.failed_requests(records) == [
        "failed requests under load: haproxy, keep-alive: 5 in all runs"]
