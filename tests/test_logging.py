"""Where the services' logs go: the systemd journal (native protocol, structured fields) and
``logging.file`` (one file the services share, rotated by size across processes)."""

from __future__ import annotations

import array
import json
import logging
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from common import journal
from common import log as rlog

CHECKOUT = Path(__file__).resolve().parent.parent


def parse_native(data: bytes) -> list[tuple[str, str]]:
    """journald's side of the native protocol: FIELD=value lines, or FIELD\\n<u64 le len><bytes>\\n."""
    fields, i = [], 0
    while i < len(data):
        end = data.index(b"\n", i)
        line = data[i:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            i = end + 1
        else:
            name = line
            (size,) = struct.unpack("<Q", data[end + 1:end + 9])
            value = data[end + 9:end + 9 + size]
            assert data[end + 9 + size:end + 10 + size] == b"\n"
            i = end + 10 + size
        fields.append((name.decode(), value.decode()))
    return fields


@pytest.fixture
def journald(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A stand-in for /run/systemd/journal/socket: a datagram socket the test reads."""
    path = str(tmp_path / "journal.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    yield path, sock
    sock.close()


def receive(sock: socket.socket) -> dict[str, list[str]]:
    """One entry, whether it came as a datagram or as a memfd passed along."""
    fds = array.array("i")
    data, ancdata, _, _ = sock.recvmsg(1 << 20, socket.CMSG_SPACE(fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:fds.itemsize])
    if fds:
        with os.fdopen(fds[0], "rb") as memfd:
            memfd.seek(0)                         # journald maps it whole, from the start
            data = memfd.read()
    out: dict[str, list[str]] = {}
    for name, value in parse_native(data):
        out.setdefault(name, []).append(value)
    return out


@pytest.fixture
def logger(journald: tuple[str, socket.socket]) -> Iterator[logging.Logger]:
    handler = journal.JournalHandler("manager", journald[0])
    log = logging.getLogger("riklet.test.journal")
    log.handlers[:] = [handler]
    log.propagate, log.level = False, logging.DEBUG
    yield log
    handler.close()


def test_a_record_reaches_the_journal_with_its_fields(journald: tuple[str, socket.socket],
                                                       logger: logging.Logger) -> None:
    logger.warning("pod %s started", "web", extra={"pod": "web", "container": "app", "host_port": 8080})
    line = sys._getframe().f_lineno - 1
    entry = receive(journald[1])
    assert entry["MESSAGE"] == ["pod web started"]
    assert entry["PRIORITY"] == ["4"]
    assert entry["SYSLOG_IDENTIFIER"] == ["riklet-manager"]
    assert entry["RIKLET_SERVICE"] == ["manager"]
    assert entry["CODE_FILE"] == [__file__] and entry["CODE_LINE"] == [str(line)]
    assert entry["CODE_FUNC"] == ["test_a_record_reaches_the_journal_with_its_fields"]
    assert entry["POD"] == ["web"] and entry["CONTAINER"] == ["app"] and entry["HOST_PORT"] == ["8080"]


def test_newlines_use_the_binary_safe_form_and_lists_repeat_the_field(
        journald: tuple[str, socket.socket], logger: logging.Logger) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("apply failed", extra={"pod": ["web-0", "web-1"], "reason": "two\nlines"})
    entry = receive(journald[1])
    assert entry["PRIORITY"] == ["3"]
    assert entry["MESSAGE"][0].startswith("apply failed\nTraceback")
    assert "RuntimeError: boom" in entry["MESSAGE"][0]
    assert entry["POD"] == ["web-0", "web-1"]          # journalctl POD=web-1 finds it
    assert entry["REASON"] == ["two\nlines"]


def test_a_record_too_big_for_a_datagram_goes_as_a_memfd(journald: tuple[str, socket.socket],
                                                          logger: logging.Logger) -> None:
    # Past the largest send buffer the kernel grants (twice net.core.wmem_max): EMSGSIZE for sure.
    big = "x" * (2 * int(Path("/proc/sys/net/core/wmem_max").read_text()) + (1 << 20))
    logger.info("big", extra={"pod": "web", "payload": big})
    entry = receive(journald[1])
    assert entry["MESSAGE"] == ["big"] and entry["PAYLOAD"] == [big] and entry["POD"] == ["web"]


def test_auto_means_run_by_systemd_with_a_journal(journald: tuple[str, socket.socket],
                                                  tmp_path: Path) -> None:
    path = journald[0]
    assert rlog.wants_journal("auto", {"INVOCATION_ID": "0123abcd"}, path)
    assert rlog.wants_journal("auto", {"JOURNAL_STREAM": "8:1234"}, path)
    assert not rlog.wants_journal("auto", {}, path)                                   # not systemd's
    assert not rlog.wants_journal("auto", {"INVOCATION_ID": "x"}, str(tmp_path / "none"))  # no journal
    assert not rlog.wants_journal("false", {"INVOCATION_ID": "x"}, path)
    assert rlog.wants_journal("true", {}, path)


def test_setup_under_systemd_logs_to_the_journal_and_stderr(journald: tuple[str, socket.socket],
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("INVOCATION_ID", "0123abcd")
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        rlog.setup("proxy", "INFO", journald="auto", journal_socket=journald[0])
        logging.getLogger("riklet.test").info("listening", extra={"port": 8080})
        entry = receive(journald[1])
        assert entry["MESSAGE"] == ["listening"] and entry["SYSLOG_IDENTIFIER"] == ["riklet-proxy"]
        assert entry["PORT"] == ["8080"]
        line = json.loads(capfd.readouterr().err.splitlines()[-1])
        assert line["msg"] == "listening" and line["service"] == "proxy"
    finally:
        for h in root.handlers:
            h.close()
        root.handlers[:], root.level = saved[0], saved[1]


# --- logging.file ----------------------------------------------------------------------------------

WRITER = """
import logging, sys
from common import log
log.setup(sys.argv[1], "INFO", sys.argv[2], max_size=int(sys.argv[3]), max_files=int(sys.argv[4]))
for i in range(int(sys.argv[5])):
    logging.getLogger("w").info("line", extra={"n": i, "pad": "x" * (i % 97)})
"""


def write_at_once(path: Path, services: list[str], max_size: int, max_files: int, count: int) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, name, str(path), str(max_size), str(max_files),
                               str(count)], cwd=CHECKOUT, stderr=subprocess.DEVNULL) for name in services]
    for p in procs:
        assert p.wait(timeout=120) == 0


def log_files(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.iterdir()
                  if p.name.startswith(path.name) and not p.name.endswith(".lock"))


def test_two_services_rotating_one_file_lose_and_double_no_line(tmp_path: Path) -> None:
    path, max_size, count = tmp_path / "riklet.log", 8192, 1500
    write_at_once(path, ["manager", "proxy"], max_size, 1000, count)
    files = log_files(path)
    assert len(files) > 20                                           # it did rotate, many times
    seen = []
    for f in files:
        assert f.stat().st_size <= max_size, f
        seen += [(e["service"], e["n"]) for e in map(json.loads, f.read_text().splitlines())]
    assert sorted(seen) == sorted((s, n) for s in ("manager", "proxy") for n in range(count))


def test_rotation_keeps_max_files_copies(tmp_path: Path) -> None:
    path = tmp_path / "riklet.log"
    write_at_once(path, ["memory", "monitor"], 4096, 3, 800)
    assert [f.name for f in log_files(path)] == ["riklet.log", "riklet.log.1", "riklet.log.2", "riklet.log.3"]
    assert all(f.stat().st_size <= 4096 for f in log_files(path))
    newest = [json.loads(line)["n"] for line in path.read_text().splitlines()]
    assert max(newest) == 799                                         # the last lines are in FILE


def test_a_missing_journal_drops_records_quietly(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    handler = journal.JournalHandler("memory", str(tmp_path / "gone.sock"))
    handler.handle(logging.makeLogRecord({"msg": "hello", "levelno": logging.INFO}))
    assert handler.dropped == 1 and capfd.readouterr().err == ""     # stderr keeps the JSON line
    handler.close()
