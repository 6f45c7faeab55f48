"""The manager's first moments, when events make several threads reach a driver at once: the
reconciler's first pass over every pod runs beside the orphan report (before events, a 0.5 s
tick came first and hid this)."""

from __future__ import annotations

import importlib
import threading
import time
from typing import Any

import pytest

from services.manager.containerd import client
from tests.support import need, wait_for


def test_containerd_stubs_load_once_for_threads_arriving_together(
        monkeypatch: pytest.MonkeyPatch) -> None:
    need(client.stubs_missing() is None, client.stubs_missing() or "")
    monkeypatch.setattr(client, "_MODULES", {})   # as in a fresh manager: the first caller imports
    real = importlib.import_module

    def slow_import(name: str, package: str | None = None) -> Any:
        time.sleep(0.02)   # widens the window a first import takes on a busy machine
        return real(name, package)
    monkeypatch.setattr(importlib, "import_module", slow_import)
    done = threading.Event()
    partial: list[set[str]] = []

    def first_use() -> None:
        client._modules()
        done.set()

    def meanwhile() -> None:   # other threads asking while the first one still imports
        wait_for(lambda: client._MODULES or done.is_set(), 10, what="the first import begun",
                 interval=0.001)
        while not done.is_set():
            try:
                got = set(client._modules())
            except Exception as exc:  # a half-filled table must not show either
                partial.append({repr(exc)})
                return
            if "tasks" not in got:
                partial.append(got)
                return
    threads = [threading.Thread(target=first_use)] + [threading.Thread(target=meanwhile) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert done.is_set() and partial == []
    assert set(client._MODULES) == {"version", "leases", "images", "content", "snapshots",
                                    "containers", "tasks"}
