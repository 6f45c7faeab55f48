"""Pod events, describe and top through rikletctl against a real agent: a crash loop told in
order, a delete told after the pod is gone, the history kept across a restart of memory, a
follower that sees new events as they happen, and CPU and memory as kubectl top prints them."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
from typing import Any

import pytest

from tests.stack import BIN, Agent
from tests.support import wait_for

pytestmark = pytest.mark.integration

PY = sys.executable


def events(agent: Agent, pod: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(agent.ctl("events", pod, "-o", "json").stdout)
    return found


def reasons(agent: Agent, pod: str) -> list[str]:
    return [e["reason"] for e in events(agent, pod)]


class Lines:
    """A running command's stdout, line by line, read on a thread: tests wait with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc, self.seen = proc, []
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))

    def wait(self, pattern: str, timeout: float = 20.0) -> str:
        def found() -> str | None:
            while not self._lines.empty():
                self.seen.append(self._lines.get_nowait())
            return next((line for line in self.seen if re.search(pattern, line)), None)
        line: str = wait_for(found, timeout, what=f"a line matching {pattern!r} in {self.seen}")
        return line


def test_a_crash_loop_is_told_in_order_and_kept_after_delete_and_restart(agent: Agent) -> None:
    agent.ctl("run", "crashy", "--restart", "Always", "--", "sh", "-c", "sleep 0.2; exit 1")
    wait_for(lambda: {"Scheduled", "Started", "Failed", "BackOff"} <= set(reasons(agent, "crashy"))
             and any(e["message"].endswith("(restart 1)") and e["reason"] == "Started"
                     for e in events(agent, "crashy")), 30,
             what="crashy's first restart told")
    told = events(agent, "crashy")
    assert told[0]["reason"] == "Scheduled" and told[1]["reason"] == "Started"
    assert [e["seq"] for e in told] == sorted(e["seq"] for e in told)
    assert [e["time"] for e in told] == sorted(e["time"] for e in told)
    failed = next(e for e in told if e["reason"] == "Failed")
    assert failed["type"] == "Warning" and "exited with code 1 (Error)" in failed["message"]
    assert failed["container"] == "crashy" and failed["uid"] == agent.pod("crashy")["uid"]
    restarted = [i for i, e in enumerate(told) if e["reason"] == "Started" and "(restart 1)" in e["message"]]
    backoff = [i for i, e in enumerate(told) if e["reason"] == "BackOff"]
    assert backoff and restarted and backoff[0] < restarted[0]

    table = agent.ctl("events", "crashy").stdout.splitlines()
    assert table[0].split() == ["LAST", "SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"]
    assert any(re.match(r"\d+[smhd]\s+Warning\s+BackOff\s+pod/crashy\s+back-off \d+s restarting failed "
                        r"container crashy", row) for row in table[1:]), table

    described = agent.ctl("describe", "pod", "crashy").stdout
    for expected in ("Name:         crashy", "Phase:", "Containers:", "  crashy:",
                     "Command:        sh -c sleep 0.2; exit 1", "Restart Count:", "Resources:      none",
                     "Events:", "Scheduled", "BackOff"):
        assert expected in described, f"{expected!r} not in:\n{described}"

    # A follower sees what happens next: the delete, and the pod gone.
    bad = agent.ctl("events", "Not_A_Pod", check=False)
    assert bad.returncode == 1 and "invalid_argument: pod:" in bad.stderr
    watch = subprocess.Popen([os.path.join(BIN, "rikletctl"), "events", "crashy", "-w"], env=agent.env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = Lines(watch)
        lines.wait(r"Normal\s+Scheduled\s+pod/crashy")   # the stored events come first
        agent.ctl("delete", "pod", "crashy")
        lines.wait(r"Normal\s+Killing\s+pod/crashy")
        lines.wait(r"Normal\s+Deleted\s+pod/crashy\s+the pod is stopped and removed")
    finally:
        watch.terminate()
        watch.wait(10)
    wait_for(lambda: not agent.pods(), 30, what="crashy gone")
    kept = events(agent, "crashy")
    assert kept[-1]["reason"] == "Deleted" and kept[:len(told)] == told

    agent.supervisorctl("restart", "riklet:memory")
    agent.wait_ready()
    assert wait_for(lambda: events(agent, "crashy"), 20, what="events after memory's restart") == kept


def test_top_prints_node_and_pod_usage_as_kubectl_does(agent: Agent) -> None:
    hold = "import time\nx = b'x' * (40 << 20)\ntime.sleep(600)"
    agent.ctl("run", "holder", "--restart", "Never", "--", PY, "-c", hold)
    agent.wait_phase("holder", "Running")

    def holder_row() -> list[str] | None:
        rows = [line.split() for line in agent.ctl("top", "pods").stdout.splitlines()]
        row = next((r for r in rows if r and r[0] == "holder"), None)
        return row if row is not None and int(row[2].removesuffix("Mi")) >= 40 else None

    row = wait_for(holder_row, 30, what="holder's 40 MiB in top pods")
    assert re.fullmatch(r"\d+m", row[1]) and re.fullmatch(r"\d+Mi", row[2])
    header = agent.ctl("top", "pods").stdout.splitlines()[0].split()
    assert header == ["NAME", "CPU(cores)", "MEMORY(bytes)"]
    [pod] = [p for p in json.loads(agent.ctl("top", "pods", "-o", "json").stdout) if p["name"] == "holder"]
    assert pod["memoryBytes"] >= 40 << 20 and pod["cpuCores"] >= 0

    node = agent.ctl("top", "node").stdout.splitlines()
    assert node[0].split() == ["NAME", "CPU(cores)", "CPU%", "MEMORY(bytes)", "MEMORY%"]
    name, cpu, cpu_pct, mem, mem_pct = node[1].split()
    assert re.fullmatch(r"\d+m", cpu) and re.fullmatch(r"\d+%", cpu_pct) and re.fullmatch(r"\d+%", mem_pct)
    assert int(mem.removesuffix("Mi")) >= 40 and 0 < int(mem_pct[:-1]) <= 100
    info = json.loads(agent.ctl("top", "node", "-o", "json").stdout)
    assert info["name"] == name and info["memoryCapacity"] > info["memoryBytes"] > 0
