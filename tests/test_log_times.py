"""Log times: the index beside each log (common/logindex.py), ``since`` and ``timestamps`` in
the readers, and through a real agent: a process pod's log read with rikletctl and the CHaS
API, tail and follow."""

from __future__ import annotations

import calendar
import http.client
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common import logindex, rotlog
from common.errors import InvalidArgument
from common.pb import node_pb2 as npb
from common.since import parse_since
from services.manager.api import logs
from tests.stack import Agent, chas_agent
from tests.support import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAMP = re.compile(rb"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{9})Z ")
S = 10**9


def parse_stamp(line: bytes) -> tuple[int, bytes]:
    """(ns, the rest) of a stamped line."""
    m = STAMP.match(line)
    assert m, line
    secs = calendar.timegm(time.strptime(m.group(1).decode(), "%Y-%m-%dT%H:%M:%S"))
    return secs * S + int(m.group(2)), line[m.end():]


class Clock:
    def __init__(self, at: int) -> None:
        self.at = at

    def __call__(self) -> int:
        return self.at


def header_inode(log: str) -> int:
    magic, ino = logindex.HEADER.unpack(Path(log + ".times").read_bytes()[:16])
    assert magic == logindex.MAGIC
    return int(ino)


# -- units: the writer's index and the readers ----------------------------------------------------

def test_times_follow_their_lines_through_rotation_and_tail_since(tmp_path: Path) -> None:
    log = str(tmp_path / "c.log")
    clock = Clock(1000 * S)
    w = rotlog.RotatingWriter(log, 30, 3, clock=clock)
    for i in range(16):                     # 6 bytes a write, 5 writes a file: 4 files, 1 dropped
        clock.at = (1000 + i) * S
        w.write(b"line%d\n" % i if i < 10 else b"li%02d\n\n" % i)
    w.close()
    files = rotlog.rotated_files(log)
    assert [os.path.basename(f) for f in files] == ["c.log.2", "c.log.1", "c.log"]
    for f in files:                          # each index names its own log
        assert header_inode(f) == os.stat(f).st_ino
    assert not os.path.exists(log + ".3.times")
    stamped = rotlog.tail(log, None, timestamps=True).splitlines()
    times = [parse_stamp(line) for line in stamped]
    assert times[0] == (1005 * S, b"line5")
    assert times[-2:] == [(1015 * S, b"li15"), (1015 * S, b"")]
    assert [at for at, _ in times] == sorted(at for at, _ in times)
    later = b"".join(b"li%02d\n\n" % i for i in range(10, 16))
    assert rotlog.tail(log, None, since=1009 * S) == b"line9\n" + later
    assert rotlog.tail(log, 3, since=1013 * S) == b"\nli15\n\n"
    assert rotlog.tail(log, 100, since=1014 * S + 1) == b"li15\n\n"
    assert rotlog.tail(log, 2, since=2000 * S) == b""
    assert rotlog.tail(log, 1, timestamps=True) == b"1970-01-01T00:16:55.000000000Z \n"
    assert rotlog.tail(log, 0, since=1, timestamps=True) == b""
    assert rotlog.tail(log, None) == rotlog.tail(log, None, since=0)   # nothing older than 1970


def test_partial_lines_take_the_time_of_their_first_byte(tmp_path: Path) -> None:
    log = str(tmp_path / "c.log")
    clock = Clock(10 * S)
    w = rotlog.RotatingWriter(log, 1 << 20, 2, clock=clock)
    w.write(b"first half ")
    clock.at = 20 * S
    w.write(b"second half\nnext\nunfinish")
    clock.at = 20 * S + 500_000            # within 1 ms: no record, the time of the one before
    w.write(b"ed\nlast")
    w.close()
    assert rotlog.tail(log, None, since=15 * S) == b"next\nunfinished\nlast"
    out = rotlog.tail(log, None, timestamps=True)
    assert out == (b"1970-01-01T00:00:10.000000000Z first half second half\n"
                   b"1970-01-01T00:00:20.000000000Z next\n1970-01-01T00:00:20.000000000Z unfinished\n"
                   b"1970-01-01T00:00:20.000000000Z last")
    assert os.path.getsize(log + ".times") == 16 * 3   # header + 2 records


def test_a_log_without_an_index_has_unknown_times(tmp_path: Path) -> None:
    log = str(tmp_path / "c.log")
    Path(log).write_bytes(b"old one\nold two\n")      # written by an earlier riklet
    Path(log + ".1").write_bytes(b"older\n")
    w = rotlog.RotatingWriter(log, 1 << 20, 3, clock=Clock(50 * S))
    w.write(b"new\n")
    w.close()
    assert rotlog.tail(log, None, since=1) == b"new\n"
    assert rotlog.tail(log, 2, timestamps=True) == (b"0001-01-01T00:00:00.000000000Z old two\n"
                                                    b"1970-01-01T00:00:50.000000000Z new\n")
    assert rotlog.tail(log, None, timestamps=True).startswith(b"0001-01-01T00:00:00.000000000Z older\n")
    # an index that names another file (a rotation seen half-way) is never used for this one
    Path(log + ".1.times").write_bytes(Path(log + ".times").read_bytes())
    assert rotlog.tail(log + "", None, since=1) == b"new\n"
    assert rotlog.tail(log, 3, timestamps=True).count(logindex.UNKNOWN_STAMP) == 2


def test_follow_stamps_and_filters_lines_across_rotation(tmp_path: Path) -> None:
    log = str(tmp_path / "c.log")
    clock = Clock(100 * S)
    w = rotlog.RotatingWriter(log, 40, 3, clock=clock)
    w.write(b"before, half")
    stop = threading.Event()
    stamped = rotlog.follow(log, stop, poll=0.01, timestamps=True)
    filtered = rotlog.follow(log, stop, poll=0.01, since=200 * S)
    w.write(b" done\n")                      # ends the line under way: no stamp of its own
    clock.at = 150 * S
    w.write(b"old\n")
    clock.at = 200 * S
    w.write(b"new 1\n" + b"x" * 20 + b"\n")  # rotates
    clock.at = 201 * S
    w.write(b"new 2 ")
    w.write(b"continued\n")
    w.close()
    got = {"stamped": b"", "filtered": b""}

    def read(name: str, it: Iterator[bytes]) -> None:
        for chunk in it:
            got[name] += chunk
            if got[name].endswith(b"continued\n"):
                return
    readers = [threading.Thread(target=read, args=item, daemon=True)
               for item in (("stamped", stamped), ("filtered", filtered))]
    for t in readers:
        t.start()
    wait_for(lambda: not any(t.is_alive() for t in readers), 10, "both followers to read the end")
    stop.set()
    assert got["filtered"] == b"new 1\n" + b"x" * 20 + b"\nnew 2 continued\n"
    lines = got["stamped"].splitlines()
    assert lines[0] == b" done"
    assert [parse_stamp(line) for line in lines[1:]] == [
        (150 * S, b"old"), (200 * S, b"new 1"), (200 * S, b"x" * 20), (201 * S, b"new 2 continued")]


def test_since_reads_rfc3339_unix_seconds_and_durations() -> None:
    now = 1_800_000_000 * S
    assert parse_since("2027-01-15T08:00:00.123456789Z", "f") == (
        calendar.timegm((2027, 1, 15, 8, 0, 0, 0, 0, 0)) * S + 123_456_789)
    assert parse_since("2027-01-15T09:00:00+01:00", "f") == parse_since("2027-01-15T08:00:00Z", "f")
    assert parse_since("1800000000.25", "f") == now + S // 4
    assert parse_since("10m", "f", now) == now - 600 * S
    assert parse_since("1h30m0.5s", "f", now) == now - 5400 * S - S // 2
    for bad in ("", "yesterday", "10x", "-5", "2027-13-01T00:00:00Z", "2027-01-01T00:00:00"):
        with pytest.raises(InvalidArgument) as exc:
            parse_since(bad, "query.since")
        assert exc.value.field == "query.since"


def test_the_node_api_refuses_a_negative_since_and_reads_the_fields(tmp_path: Path) -> None:
    log = str(tmp_path / "c.log")
    w = rotlog.RotatingWriter(log, 1 << 20, 2, clock=Clock(7 * S))
    w.write(b"a\n")
    w.close()
    stop = threading.Event()
    with pytest.raises(InvalidArgument) as exc:
        logs.stream(log, npb.LogsRequest(name="p", since_unix_nano=-1), stop)
    assert exc.value.field == "since_unix_nano"
    req = npb.LogsRequest(name="p", since_unix_nano=7 * S, timestamps=True)
    assert b"".join(logs.stream(log, req, stop)) == b"1970-01-01T00:00:07.000000000Z a\n"
    assert b"".join(logs.stream(log, npb.LogsRequest(name="p", since_unix_nano=8 * S), stop)) == b""


def test_the_containerd_log_driver_writes_the_index(tmp_path: Path) -> None:
    log = str(tmp_path / "c.log")
    out_r, out_w = os.pipe()
    ready_r, ready_w = os.pipe()
    script = (f"import os, sys; sys.path.insert(0, {ROOT!r}); "
              f"high = [os.dup2({out_r}, 100), os.dup2({ready_w}, 101)]; "
              f"os.close({out_r}); os.close({ready_w}); "
              "os.dup2(100, 3); os.dup2(101, 5); os.close(100); os.close(101); "
              "from services.manager.containerd.logdriver import main; sys.exit(main(sys.argv[1:]))")
    before = time.time_ns()
    proc = subprocess.Popen([sys.executable, "-c", script, "path", log], pass_fds=(out_r, ready_w))
    os.close(out_r)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b""
    os.close(ready_r)
    os.write(out_w, b"from the task\n")
    os.close(out_w)
    assert proc.wait(timeout=30) == 0
    at, rest = parse_stamp(rotlog.tail(log, None, timestamps=True))
    assert rest == b"from the task\n" and before <= at <= time.time_ns()
    assert header_inode(log) == os.stat(log).st_ino


# -- through a real agent: a process pod (the shim writes the index) ------------------------------

@pytest.fixture(scope="module")
def agent() -> Iterator[Agent]:
    with chas_agent("containerd:\n  address: /nonexistent/riklet-test/containerd.sock\n") as a:
        yield a


def _logs(agent: Agent, *args: str) -> bytes:
    return agent.ctl("logs", "talker", *args).stdout.encode()


@pytest.mark.integration
def test_a_pods_log_times_through_rikletctl_and_chas(agent: Agent, tmp_path: Path) -> None:
    go = tmp_path / "go"
    script = (f"echo one; echo two; until [ -e {go}1 ]; do sleep 0.02; done; echo three; echo four; "
              f"until [ -e {go}2 ]; do sleep 0.02; done; echo five; exec sleep 100000")
    start = time.time_ns()
    agent.ctl("run", "talker", "--", "sh", "-c", script)
    wait_for(lambda: _logs(agent) == b"one\ntwo\n", 30, "the first two lines")
    moment = time.time_ns()
    Path(f"{go}1").touch()
    wait_for(lambda: _logs(agent).endswith(b"four\n"), 30, "the next two")

    # rikletctl
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment // S)) + f".{moment % S:09d}Z"
    assert _logs(agent, "--since-time", iso) == b"three\nfour\n"
    assert _logs(agent, "--since", "1h", "--tail", "1") == b"four\n"
    stamped = [parse_stamp(line) for line in _logs(agent, "--timestamps").splitlines()]
    assert [rest for _, rest in stamped] == [b"one", b"two", b"three", b"four"]
    times = [at for at, _ in stamped]
    assert start <= times[0] <= times[1] < moment <= times[2] <= times[3] <= time.time_ns()
    bad = agent.ctl("logs", "talker", "--since", "yesterday", check=False)
    assert bad.returncode == 2 and "--since" in bad.stderr
    pod_logs = os.path.join(agent.state_dir, "pods", "talker", "logs", "talker.log")
    assert header_inode(pod_logs) == os.stat(pod_logs).st_ino

    # CHaS
    url = "/containers/talker/logs"
    unix = f"{moment // S}.{moment % S:09d}"
    for since in (unix, iso.replace("Z", "+00:00")):
        status, _, body = agent.chas_request("GET", f"{url}?since={since.replace('+', '%2B')}")
        assert (status, body) == (200, b"three\nfour\n")
    status, _, body = agent.chas_request("GET", f"{url}?since=10m&timestamps=true&tail=1")
    assert status == 200 and parse_stamp(body) == (times[3], b"four\n")
    status, _, body = agent.chas_request("GET", f"{url}?since=next+week")
    assert status == 400 and body["error"]["field"] == "query.since"

    # CHaS follow with timestamps: the tail, then a new line as it comes
    host, port = agent.chas.rsplit(":", 1)
    with open(os.path.join(agent.state_dir, "api-token"), encoding="utf-8") as fh:
        auth = {"Authorization": f"Bearer {fh.read().strip()}"}
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", f"{url}?follow=true&timestamps=true&tail=1", headers=auth)
        resp = conn.getresponse()
        assert resp.status == 200
        assert parse_stamp(resp.readline()) == (times[3], b"four\n")
        moment2 = time.time_ns()
        Path(f"{go}2").touch()
        at, rest = parse_stamp(resp.readline())
        assert rest == b"five\n" and moment2 <= at <= time.time_ns()
    finally:
        conn.close()
        agent.ctl("delete", "talker", check=False)
