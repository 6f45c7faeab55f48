"""`riklet run` checks the configuration once and hands the services the result: a bad setting
stops the start before anything is made, and the services, while the files and variables the
record came from hold, run without the schema library and the YAML parser."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from common import config, configload
from tests.stack import BIN, Agent
from tests.support import wait_for


@pytest.fixture(autouse=True)
def no_system_chas_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(configload, "CHAS_CONFIG_PATH", str(tmp_path / "etc-chas-node-agent.yaml"))


def environ(tmp_path: Path, **extra: str) -> dict[str, str]:
    yaml_file = tmp_path / "riklet.yaml"
    if not yaml_file.exists():
        yaml_file.write_text("logs:\n  max_files: 7\ncontainerd:\n  insecure_registries: [a:5000, b]\n")
    return {"RIKLET_RUN_DIR": str(tmp_path / "run"), "RIKLET_STATE_DIR": str(tmp_path / "state"),
            "RIKLET_CONFIG": str(yaml_file), "NODE_PORT": "9123", **extra}


def checked(tmp_path: Path, env: dict[str, str]) -> str:
    path = str(tmp_path / "config.json")
    configload.write_checked(configload.load(None, env), env, path)
    return path


def test_the_checked_record_reads_back_as_the_loaded_configuration(tmp_path: Path) -> None:
    env = environ(tmp_path)
    path = checked(tmp_path, env)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    cfg = config.read_checked(path, env)
    assert cfg == configload.load(None, env)   # every value, tuples as tuples, and the sources
    assert cfg is not None and cfg.containerd_insecure_registries == ("a:5000", "b")
    assert cfg.logs_max_files == 7 and cfg.sources["logs.max_files"] == env["RIKLET_CONFIG"]
    assert cfg.chas_port == 9123 and cfg.sources["chas.port"] == "environment"


def test_a_changed_variable_or_file_makes_the_record_stale(tmp_path: Path) -> None:
    env = environ(tmp_path)
    path = checked(tmp_path, env)
    assert config.read_checked(path, env) is not None
    assert config.read_checked(path, {**env, "NODE_PORT": "9124"}) is None          # changed
    assert config.read_checked(path, {**env, "LOG_LEVEL": "DEBUG"}) is None         # newly set
    assert config.read_checked(path, {k: v for k, v in env.items() if k != "NODE_PORT"}) is None
    # The CHaS file's default path appearing counts as a change too.
    (tmp_path / "etc-chas-node-agent.yaml").write_text("api:\n  port: 9111\n")
    assert config.read_checked(path, env) is None
    (tmp_path / "etc-chas-node-agent.yaml").unlink()
    assert config.read_checked(path, env) is not None
    Path(env["RIKLET_CONFIG"]).write_text("logs:\n  max_files: 8\n")
    assert config.read_checked(path, env) is None


@pytest.mark.parametrize("text", ["", "{", '{"version": 99}', '{"version": 1, "inputs": {}}', "[]"])
def test_a_damaged_record_is_ignored_not_trusted(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(text)
    assert config.read_checked(str(path), environ(tmp_path)) is None


def test_a_service_falls_back_to_reading_the_sources_when_the_record_is_stale(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = environ(tmp_path)
    path = checked(tmp_path, env)
    for key, value in {**env, config.CHECKED_ENV: path}.items():
        monkeypatch.setenv(key, value)
    cfg, _ = config.parse_args("t", [])
    assert cfg.logs_max_files == 7
    Path(env["RIKLET_CONFIG"]).write_text("logs:\n  max_files: 9\n")
    cfg, _ = config.parse_args("t", [])
    assert cfg.logs_max_files == 9 and cfg.sources["logs.max_files"] == env["RIKLET_CONFIG"]
    # A setting on the command line is the service's own: the record does not answer for it.
    Path(env["RIKLET_CONFIG"]).write_text("logs:\n  max_files: 7\n")
    path = checked(tmp_path, env)
    cfg, _ = config.parse_args("t", ["--log-level", "debug"])
    assert cfg.logging_level == "DEBUG" and cfg.sources["logging.level"] == "flags"


def test_riklet_run_refuses_a_bad_setting_before_making_anything(tmp_path: Path) -> None:
    env = {**os.environ, **environ(tmp_path, NODE_PORT="99999")}
    out = subprocess.run([os.path.join(BIN, "riklet"), "run"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2, out
    assert "riklet: configuration error" in out.stderr and "NODE_PORT" in out.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "state").exists()


def mapped(pid: int) -> str:
    with open(f"/proc/{pid}/maps", encoding="utf-8") as fh:
        return fh.read()


@pytest.mark.integration
def test_the_services_run_from_the_checked_record(agent: Agent) -> None:
    record = os.path.join(agent.run_dir, "config.json")
    with open(record, encoding="utf-8") as fh:
        values = json.load(fh)["values"]
    assert values["api_address"] == agent.api and values["paths_state_dir"] == agent.state_dir
    pids = {name: agent.service_pid(name) for name in ("memory", "manager", "monitor", "proxy")}
    workers = wait_for(agent.proxy_workers, 15, what="the proxy's worker")
    pids.update({f"proxy worker {pid}": pid for pid in workers})
    for name, pid in pids.items():
        maps = mapped(pid)
        assert "msgspec" not in maps, f"{name} loaded msgspec"
        if name != "manager":       # the manager parses manifests with PyYAML
            assert "_yaml" not in maps, f"{name} loaded PyYAML"
