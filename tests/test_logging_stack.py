"""The real agent run as systemd would run it: its services log to the journal with fields a
`journalctl -u riklet POD=web` finds, and to the shared `logging.file`."""

from __future__ import annotations

import json
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.stack import Agent
from tests.support import wait_for
from tests.test_logging import parse_native

pytestmark = pytest.mark.integration


class Journal:
    """A socket standing in for journald's, drained by a thread so that no service ever waits on it."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.5)
        self.entries: list[dict[str, list[str]]] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        while not self.stopping.is_set():
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            entry: dict[str, list[str]] = {}
            for name, value in parse_native(data):
                entry.setdefault(name, []).append(value)
            self.entries.append(entry)

    def matching(self, **fields: str) -> list[dict[str, list[str]]]:
        return [e for e in list(self.entries) if all(v in e.get(k, ()) for k, v in fields.items())]

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def journaled(tmp_path: Path) -> Iterator[tuple[Agent, Journal, Path]]:
    logfile = tmp_path / "riklet.log"
    agent = Agent(f"logging:\n  journald: auto\n  file: {logfile}\n  max_size: 256Ki\n  max_files: 2\n")
    journal = Journal(f"{agent.base}/journal.sock")
    agent.env.update(INVOCATION_ID="5f0c0ffee", RIKLET_JOURNAL_SOCKET=f"{agent.base}/journal.sock")
    try:
        yield agent.start(), journal, logfile
    finally:
        agent.close()
        journal.close()


def test_the_services_log_to_the_journal_and_the_shared_file(journaled: tuple[Agent, Journal, Path]) -> None:
    agent, journal, logfile = journaled
    agent.ctl("run", "web", "--restart", "Never", "--", sys.executable, "-c", "import time; time.sleep(300)")
    agent.wait_phase("web", "Running")

    started = wait_for(lambda: journal.matching(POD="web", MESSAGE="pod started"), 30,
                       what="the journal entry of web's start")[0]
    assert started["SYSLOG_IDENTIFIER"] == ["riklet-manager"] and started["RIKLET_SERVICE"] == ["manager"]
    assert started["PRIORITY"] == ["6"] and started["CODE_FILE"][0].endswith(".py")
    services = {e["RIKLET_SERVICE"][0] for e in journal.entries}
    assert services == {"memory", "manager", "monitor", "proxy"}

    files = [logfile, *(Path(f"{logfile}.{n}") for n in (1, 2))]
    lines = [json.loads(line) for f in files if f.exists() for line in f.read_text().splitlines()]
    assert {line["service"] for line in lines} == {"memory", "manager", "monitor", "proxy"}
    assert any(line.get("pod") == "web" and line["msg"] == "pod started" for line in lines)
