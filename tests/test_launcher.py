"""`riklet run` defaults: state under ./.riklet in the checkout, unless the environment says."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.launcher import ROOT, defaults, prepare


def test_defaults_live_in_the_checkout() -> None:
    env = defaults({"PATH": "/usr/bin"})
    assert env["RIKLET_RUN_DIR"] == os.path.join(ROOT, ".riklet", "run")
    assert env["RIKLET_STATE_DIR"] == os.path.join(ROOT, ".riklet", "state")
    assert env["RIKLET_CONFIG"] == ""
    assert os.path.exists(os.path.join(ROOT, "supervisord.conf"))
    assert env["PATH"].endswith(":/usr/bin")


def test_environment_wins_over_defaults() -> None:
    given = {"RIKLET_RUN_DIR": "/tmp/x", "RIKLET_STATE_DIR": "/tmp/y", "RIKLET_CONFIG": "/c.yaml"}
    env = defaults(given)
    assert {k: env[k] for k in given} == given


# --- before the exec: one agent per run dir, a previous run's leftovers stopped -----------------

def _fake(bindir: Path, name: str, run_dir: Path, supervised: bool = True) -> subprocess.Popen[bytes]:
    """A process that looks like an agent's ``name`` of ``run_dir`` (a script of that name run
    by the interpreter, as a console script is) and only sleeps."""
    script = bindir / name
    if not script.exists():
        script.write_text("import time\ntime.sleep(60)\n")
    env = {"PATH": os.defpath, "RIKLET_RUN_DIR": str(run_dir)}
    if supervised:
        env["SUPERVISOR_ENABLED"] = "1"
    return subprocess.Popen([sys.executable, str(script)], env=env)


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[tuple[Path, Path, Path, list[subprocess.Popen[bytes]]]]:
    run_dir, state_dir, bindir = tmp_path / "run", tmp_path / "state", tmp_path / "bin"
    for d in (run_dir, state_dir, bindir):
        d.mkdir()
    started: list[subprocess.Popen[bytes]] = []
    yield run_dir, state_dir, bindir, started
    for p in started:
        p.kill()
        p.wait()


def test_prepare_stops_only_this_run_dirs_leftover_services(
        dirs: tuple[Path, Path, Path, list[subprocess.Popen[bytes]]],
        capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, state_dir, bindir, started = dirs
    leftovers = [_fake(bindir, f"riklet-{s}", run_dir) for s in ("memory", "manager")]
    spared = [_fake(bindir, "riklet-shim", run_dir),                       # a pod's shim
              _fake(bindir, "riklet-memory", run_dir.parent / "other"),    # another agent's
              _fake(bindir, "riklet-monitor", run_dir, supervised=False)]  # started by hand
    started += leftovers + spared
    os.close(prepare(str(run_dir), str(state_dir)))
    assert [p.wait(timeout=5) for p in leftovers] == [-signal.SIGTERM] * 2
    assert [p.poll() for p in spared] == [None] * 3
    err = capsys.readouterr().err
    assert f"stopping 2 processes left by a previous run in {run_dir}: " in err
    assert f"memory (pid {leftovers[0].pid})" in err and f"manager (pid {leftovers[1].pid})" in err


def test_prepare_refuses_next_to_a_live_supervisord(
        dirs: tuple[Path, Path, Path, list[subprocess.Popen[bytes]]]) -> None:
    run_dir, state_dir, bindir, started = dirs
    supervisord = _fake(bindir, "supervisord", run_dir, supervised=False)
    service = _fake(bindir, "riklet-memory", run_dir)
    started += [supervisord, service]
    with pytest.raises(SystemExit) as exc:
        prepare(str(run_dir), str(state_dir))
    assert str(exc.value) == (f"riklet: an agent is already running from {run_dir} (supervisord "
                              f"pid {supervisord.pid}): stop it first, or give this one another "
                              "RIKLET_RUN_DIR")
    assert service.poll() is None, "a live agent's services are left alone"


def test_prepare_refuses_while_another_start_holds_the_run_dir(
        dirs: tuple[Path, Path, Path, list[subprocess.Popen[bytes]]]) -> None:
    run_dir, state_dir, _, _ = dirs
    fd = prepare(str(run_dir), str(state_dir))
    try:
        with pytest.raises(SystemExit) as exc:
            prepare(str(run_dir), str(state_dir))
        assert f"already running from {run_dir} (pid {os.getpid()} holds agent.lock)" in str(exc.value)
    finally:
        os.close(fd)
    os.close(prepare(str(run_dir), str(state_dir)))   # free again once the first is gone
