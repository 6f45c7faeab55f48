"""The shims' side of events (a datagram naming the pod after each status write; the spec field
that says where), and the manager's first moments, when events make several threads reach a
driver at once: the reconciler's first pass over every pod runs beside the orphan report (before
events, a 0.5 s tick came first and hid that race)."""

from __future__ import annotations

import importlib
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from common.errors import InvalidArgument
from services.manager.containerd import client
from services.manager.process import ProcessRuntime, shimctl
from tests.support import cgroup_layout, need, wait_for


@pytest.fixture
def base() -> Iterator[str]:
    path = tempfile.mkdtemp(dir="/tmp", prefix="ev")   # unix socket paths are short
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_shim_names_its_pod_after_each_status_write(base: str) -> None:
    cgroup_layout()
    path = os.path.join(base, "ev.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)   # the deadline for each event
        rt = ProcessRuntime(os.path.join(base, "state"), 5.0, 1 << 20, 2,
                            {"initial": 1.0, "max": 10.0, "reset": 60.0}, notify_socket=path)
        pod = {"name": "once", "uid": uuid.uuid4().hex, "generation": 1,
               "spec": {"restartPolicy": "Never",
                        "containers": [{"name": "c", "command": ["true"], "resources": {}}]}}
        rt.start(pod)

        def state() -> tuple[str, str]:
            st = shimctl.read_status(rt.pod_dir("once")) or {}
            return st.get("state", ""), (st.get("containers") or [{}])[0].get("state", "")
        got: list[bytes] = []
        try:
            # started, container running, exited; then stopping, exited. `true` can be through the
            # first three before this test first looks: their datagrams wait in the socket.
            wait_for(lambda: state() == ("running", "terminated"), 10, what="the container exited")
            rt.stop(pod)
            wait_for(lambda: state()[0] == "exited", 10, what="the shim's last status")
            while len(got) < 2:
                got.append(sock.recv(256))
            sock.setblocking(False)
            while True:
                try:
                    got.append(sock.recv(256))
                except BlockingIOError:
                    break
        finally:
            rt.stop(pod)
            wait_for(lambda: not rt.observe(pod).alive, 10, what="the shim gone")  # type: ignore[union-attr]
            rt.cleanup(pod)
        # the writes are announced (the shim folds the changes of one turn into one write: at
        # least the start and the container's exit come before the stop), naming only the pod
        assert len(got) >= 2 and set(got) == {b"once"}


def test_the_notify_field_must_be_an_absolute_socket_path() -> None:
    spec = {"pod": "p", "uid": "u", "cgroup_parent": "riklet/p", "log": {"dir": "/tmp/x"},
            "containers": [{"name": "c", "command": ["true"]}]}
    assert shimctl.parse_spec(spec).notify is None
    assert shimctl.parse_spec({**spec, "notify": "/run/x.sock"}).notify == "/run/x.sock"
    for bad in ("relative.sock", "/" + "x" * 200, 7):
        with pytest.raises(InvalidArgument) as info:
            shimctl.parse_spec({**spec, "notify": bad})
        assert info.value.field == "notify"


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


def test_the_resync_skips_a_pod_only_while_nothing_happened_to_it(base: str) -> None:
    """ProcessRuntime.unchanged, the safety net's cheap look: true for a quiet running pod,
    false as soon as its status file is rewritten or its shim dies (even by SIGKILL, which
    sends no datagram), and false for a pod never observed."""
    cgroup_layout()
    rt = ProcessRuntime(os.path.join(base, "state"), 5.0, 1 << 20, 2,
                        {"initial": 1.0, "max": 10.0, "reset": 60.0})
    pod = {"name": "quiet", "uid": uuid.uuid4().hex, "generation": 1,
           "spec": {"containers": [{"name": "c", "command": ["sleep", "600"], "resources": {}}]}}
    assert rt.unchanged("quiet") is False
    try:
        obs = rt.start(pod)
        assert obs.alive and rt.observe(pod) is not None
        assert rt.unchanged("quiet") is True
        status = os.path.join(rt.pod_dir("quiet"), shimctl.STATUS_FILE)
        data = shimctl.read_status(rt.pod_dir("quiet"))
        shimctl.write_json(status, {**(data or {}), "updated_at": time.time()})
        assert rt.unchanged("quiet") is False, "a rewritten status must be looked at"
        obs = rt.observe(pod)
        assert obs is not None and obs.holder is not None and rt.unchanged("quiet") is True
        os.kill(obs.holder[0], 9)
        wait_for(lambda: not rt.unchanged("quiet"), 5, what="a killed shim noticed")
    finally:
        rt.stop(pod)
        rt.cleanup(pod)
    assert rt.unchanged("quiet") is False
