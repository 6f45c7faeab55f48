"""The CHaS node-agent file (seed 003, "Configuration") beside riklet's own; `riklet config show`;
deploy/install.sh into a staged root.

Precedence: defaults < CHaS file < riklet's file < environment < flags.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from common import config, configload
from common.errors import InvalidArgument

CHECKOUT = Path(__file__).resolve().parent.parent
RIKLET = os.path.join(os.path.dirname(sys.executable), "riklet")  # the venv's console script

# Seed 003, "Configuration File", verbatim (blank lines with their two spaces included).
SEED_YAML = "\n".join((
    "api:",
    '  chas_url: "http://chas-api:8080"',
    "  port: 9090",
    "  ",
    "node:",
    '  id: "worker-1"',
    '  hostname: "worker-1.local"',
    "  ",
    "containerd:",
    '  socket: "/run/containerd/containerd.sock"',
    '  namespace: "chas"',
    "  ",
    "monitoring:",
    "  health_interval: 30",
    "  metrics_enabled: true",
    "  ",
    "logging:",
    '  level: "INFO"',
    '  file: "/var/log/chas-node-agent.log"',
    "",
))


@pytest.fixture(autouse=True)
def no_system_chas_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default path points into the test's directory: a real /etc/chas file never leaks in."""
    monkeypatch.setattr(configload, "CHAS_CONFIG_PATH", str(tmp_path / "etc-chas-node-agent.yaml"))


def flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configload.add_flags(parser)
    return parser.parse_args(list(argv))


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# --- loading -------------------------------------------------------------------------------------

def test_five_layers_in_order_with_their_sources(tmp_path: Path) -> None:
    chas = write(tmp_path / "node-agent.yaml", "api:\n  port: 9191\nmonitoring:\n  health_interval: 15\n"
                 "logging:\n  level: DEBUG\ncontainerd:\n  namespace: chas\n")
    rik = write(tmp_path / "riklet.yaml", "chas:\n  port: 9292\n  health_interval: 20s\n"
                "logging:\n  level: warning\n")
    env = {"CHAS_CONFIG": chas, "RIKLET_CONFIG": rik, "NODE_PORT": "9393", "HEALTH_INTERVAL": "25"}
    cfg = config.load(flags("--node-port", "9494"), env)

    assert cfg.chas_port == 9494 and cfg.sources["chas.port"] == "flags"               # flag
    assert cfg.chas_health_interval == 25.0 and cfg.sources["chas.health_interval"] == "environment"
    assert cfg.logging_level == "WARNING" and cfg.sources["logging.level"] == rik       # riklet file
    assert cfg.containerd_namespace == "chas"                                             # CHaS file
    assert cfg.sources["containerd.namespace"] == f"{chas}: containerd.namespace"
    assert cfg.metrics_address == "127.0.0.1:9092" and cfg.sources["metrics.address"] == "default"

    said = {k: configload.describe_source(k, cfg.sources[k]) for k in cfg.sources}
    assert said["chas.port"] == "flag --node-port"
    assert said["chas.health_interval"] == "environment HEALTH_INTERVAL"
    assert said["logging.level"] == f"{rik}: logging.level"
    assert said["containerd.namespace"] == f"{chas}: containerd.namespace"
    assert said["metrics.address"] == "default"

    # Each layer alone over the ones below it.
    assert config.load(None, {"CHAS_CONFIG": chas}).chas_port == 9191
    assert config.load(None, {"CHAS_CONFIG": chas, "RIKLET_CONFIG": rik}).chas_port == 9292
    assert config.load(None, {"CHAS_CONFIG": chas}).sources["chas.port"] == f"{chas}: api.port"


def test_the_seed_example_is_accepted_and_maps_onto_riklet_settings(tmp_path: Path) -> None:
    path = write(tmp_path / "node-agent.yaml", SEED_YAML)
    cfg = config.load(flags("--chas-config", path), {})
    assert cfg.chas_api_url == "http://chas-api:8080"
    assert cfg.chas_port == 9090
    assert cfg.node_id == "worker-1"
    assert cfg.node_hostname == "worker-1.local"
    assert cfg.containerd_address == "/run/containerd/containerd.sock"
    assert cfg.containerd_namespace == "chas"
    assert cfg.chas_health_interval == 30.0
    assert cfg.monitoring_metrics_enabled is True
    assert cfg.logging_level == "INFO"
    assert cfg.logging_file == "/var/log/chas-node-agent.log"
    assert {k: v for k, v in cfg.sources.items() if v != "default"} == {
        riklet_key: f"{path}: {chas_key}" for chas_key, riklet_key in configload.CHAS_KEYS.items()}


def test_the_default_path_is_read_when_it_exists_and_skipped_when_not(tmp_path: Path) -> None:
    assert config.load(None, {}).sources["chas.port"] == "default"     # missing default: fine
    write(Path(configload.CHAS_CONFIG_PATH), "api:\n  port: 9111\n")
    cfg = config.load(None, {})
    assert cfg.chas_port == 9111 and cfg.sources["chas.port"] == f"{configload.CHAS_CONFIG_PATH}: api.port"


@pytest.mark.parametrize("text, key", [
    ("api:\n  prot: 1\n", "api.prot"),
    ("api:\n  address: 127.0.0.1:1\n", "api.address"),     # riklet's key, not the CHaS file's
    ("nodes:\n  id: x\n", "nodes.id"),
])
def test_an_unknown_chas_key_names_the_file_and_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path / "node-agent.yaml", text)
    with pytest.raises(InvalidArgument) as err:
        config.load(None, {"CHAS_CONFIG": path})
    assert err.value.field == key and path in err.value.message


def test_a_bad_chas_value_names_the_file_and_its_key(tmp_path: Path) -> None:
    path = write(tmp_path / "node-agent.yaml", "api:\n  port: 99999\n")
    with pytest.raises(InvalidArgument) as err:
        config.load(None, {"CHAS_CONFIG": path})
    assert err.value.field == f"{path}: api.port"


def test_an_explicit_chas_file_must_exist(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere.yaml")
    with pytest.raises(InvalidArgument) as err:
        config.load(None, {"CHAS_CONFIG": missing})
    assert err.value.field == "CHAS_CONFIG" and missing in err.value.message
    assert "does not exist" in err.value.message
    with pytest.raises(InvalidArgument) as err:
        config.load(flags("--chas-config", missing), {})
    assert err.value.field == "--chas-config" and missing in err.value.message


def test_dev_null_turns_the_default_file_off_and_a_directory_is_refused(tmp_path: Path) -> None:
    write(Path(configload.CHAS_CONFIG_PATH), "api:\n  port: 9111\n")
    assert config.load(None, {"CHAS_CONFIG": "/dev/null"}).sources["chas.port"] == "default"
    with pytest.raises(InvalidArgument) as err:
        config.load(flags("--chas-config", str(tmp_path)), {})
    assert err.value.field == "--chas-config" and "directory" in err.value.message


def test_the_flag_wins_over_chas_config(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", "api:\n  port: 1111\n")
    b = write(tmp_path / "b.yaml", "api:\n  port: 2222\n")
    assert config.load(flags("--chas-config", b), {"CHAS_CONFIG": a}).chas_port == 2222


# --- riklet config show ----------------------------------------------------------------------------

def run_show(tmp_path: Path, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(tmp_path)}
    return subprocess.run([RIKLET, "config", "show", *argv], cwd=tmp_path, env={**base, **env},
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def layered(tmp_path: Path) -> dict[str, str]:
    chas = write(tmp_path / "node-agent.yaml", SEED_YAML)
    rik = write(tmp_path / "riklet.yaml", "logs:\n  max_files: 5\n")
    return {"chas": chas, "rik": rik}


def test_config_show_prints_every_setting_value_and_source(tmp_path: Path, layered: dict[str, str]) -> None:
    out = run_show(tmp_path, "--chas-config", layered["chas"], "--config", layered["rik"], "--node-id", "n1",
                   LOG_LEVEL="debug")
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in out.stdout.splitlines()[1:]}
    assert set(rows) == {s.key for s in configload.SETTINGS}
    assert rows["node.id"] == ["n1", "flag --node-id"]
    assert rows["logging.level"] == ["DEBUG", "environment LOG_LEVEL"]
    assert rows["logs.max_files"] == ["5", f"{layered['rik']}: logs.max_files"]
    assert rows["chas.port"] == ["9090", f"{layered['chas']}: api.port"]
    assert rows["containerd.address"] == ["/run/containerd/containerd.sock",
                                          f"{layered['chas']}: containerd.socket"]
    assert rows["metrics.address"] == ["127.0.0.1:9092", "default"]


def test_config_show_json(tmp_path: Path, layered: dict[str, str]) -> None:
    out = run_show(tmp_path, "-o", "json", "--config", layered["rik"], CHAS_CONFIG=layered["chas"],
                   NODE_PORT="9393")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data) == {s.key for s in configload.SETTINGS}
    assert data["chas.port"] == {"value": 9393, "source": "environment NODE_PORT"}
    assert data["monitoring.metrics_enabled"] == {"value": True,
                                                  "source": f"{layered['chas']}: monitoring.metrics_enabled"}
    assert data["chas.health_interval"]["value"] == 30.0
    assert data["logs.max_files"] == {"value": 5, "source": f"{layered['rik']}: logs.max_files"}
    assert data["runtime.user"] == {"value": [65534, 65534], "source": "default"}
    assert data["chas.api_url"]["value"] == "http://chas-api:8080"


@pytest.mark.parametrize("argv, env, named", [
    ((), {"NODE_PORT": "99999"}, "NODE_PORT"),
    (("--chas-config", "/nonexistent/node-agent.yaml"), {}, "/nonexistent/node-agent.yaml"),
    (("--log-level", "loud"), {}, "--log-level"),
])
def test_config_show_exits_2_naming_the_bad_setting(tmp_path: Path, argv: tuple[str, ...],
                                                    env: dict[str, str], named: str) -> None:
    out = run_show(tmp_path, *argv, **env)
    assert out.returncode == 2 and out.stdout == ""
    assert "configuration error" in out.stderr and named in out.stderr


def test_config_show_names_an_unknown_chas_key(tmp_path: Path) -> None:
    path = write(tmp_path / "node-agent.yaml", "api:\n  chas_uri: http://x\n")
    out = run_show(tmp_path, CHAS_CONFIG=path)
    assert out.returncode == 2 and "api.chas_uri" in out.stderr and path in out.stderr


# --- deploy/install.sh into a staged root ------------------------------------------------------

class Staged:
    def __init__(self, root: Path, runs: list[subprocess.CompletedProcess[str]]) -> None:
        self.root, self.runs = root, runs
        self.prefix = root / "opt" / "riklet"
        self.python = self.prefix / "venv" / "bin" / "python"
        self.unit = root / "etc" / "systemd" / "system" / "riklet.service"
        self.yaml = root / "etc" / "riklet" / "riklet.yaml"

    def installed(self, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
        """The installed riklet (-I: its own package, never this checkout's)."""
        return subprocess.run([str(self.python), "-I", *argv], cwd=self.root, capture_output=True, text=True,
                              env={"PATH": os.defpath, **env}, timeout=120)


def install(root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CHECKOUT / "deploy" / "install.sh"), "--root", str(root), *extra],
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Staged]:
    """Installed twice (the operator's riklet.yaml edited in between), once for the module."""
    root = tmp_path_factory.mktemp("root")
    first = install(root)
    assert first.returncode == 0, first.stdout + first.stderr
    yaml_file = root / "etc" / "riklet" / "riklet.yaml"
    yaml_file.write_text(yaml_file.read_text() + "logs:\n  max_files: 7   # the operator's\n")
    second = install(root)
    assert second.returncode == 0, second.stdout + second.stderr
    yield Staged(root, [first, second])


def test_install_lays_out_prefix_config_and_unit(staged: Staged) -> None:
    assert staged.python.exists()
    assert (staged.prefix / ".riklet-install").exists() and (staged.prefix / "README.md").exists()
    conf = (staged.prefix / "supervisord.conf").read_text()
    assert "serverurl=unix:///run/riklet/supervisor.sock" in conf.splitlines()
    assert "[program:manager]" in conf
    # The venv's scripts name the final prefix, not the staging directory.
    assert (staged.prefix / "venv" / "bin" / "riklet").read_text().splitlines()[0] == \
        "#!/opt/riklet/venv/bin/python"
    for name in ("riklet", "rikletctl"):
        wrapper = (staged.root / "usr" / "local" / "bin" / name).read_text()
        assert f"exec /opt/riklet/venv/bin/{name} " in wrapper
        assert "RIKLET_CONFIG:=/etc/riklet/riklet.yaml" in wrapper
    assert str(staged.root) not in (staged.unit.read_text() + conf)


def test_the_unit(staged: Staged) -> None:
    text = staged.unit.read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    for want in ("Restart=always", "RestartSec=5", "KillMode=process", "LimitNOFILE=1048576",
                 "After=network-online.target containerd.service", "Wants=containerd.service",
                 "Environment=RIKLET_RUN_DIR=/run/riklet", "Environment=RIKLET_STATE_DIR=/var/lib/riklet",
                 "Environment=RIKLET_CONFIG=/etc/riklet/riklet.yaml", "WantedBy=multi-user.target",
                 "ExecStart=/opt/riklet/venv/bin/riklet run"):
        assert want in lines, want
    assert not any(line.startswith("Requires=") for line in lines)
    if shutil.which("systemd-analyze"):   # where systemd's tools are installed, let them judge it
        probe = staged.root / "verify" / "riklet.service"
        probe.parent.mkdir(exist_ok=True)
        probe.write_text(text.replace("/opt/riklet", str(staged.prefix)))
        out = subprocess.run(["systemd-analyze", "verify", str(probe)], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0 and "riklet.service" not in out.stderr, out.stderr


def test_the_installed_package_works(staged: Staged) -> None:
    out = staged.installed("-c", "import common, common.pb.node_pb2_grpc, common.pb.rik_worker_pb2_grpc; "
                           "print(common.__file__)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(str(staged.prefix / "venv")), out.stdout
    show = staged.installed("-m", "services.launcher", "config", "show", "-o", "json",
                            RIKLET_CONFIG=str(staged.yaml), CHAS_CONFIG=str(staged.root / "none.yaml"))
    assert show.returncode == 2 and "none.yaml" in show.stderr      # the installed one reads CHAS_CONFIG
    show = staged.installed("-m", "services.launcher", "config", "show", "-o", "json",
                            RIKLET_CONFIG=str(staged.yaml))
    assert show.returncode == 0, show.stderr
    assert json.loads(show.stdout)["logs.max_files"] == {"value": 7,
                                                         "source": f"{staged.yaml}: logs.max_files"}
    shim = staged.installed("-c", "from services.manager.process import build; print(build.BINARY)")
    assert shim.returncode == 0 and shim.stdout.startswith(str(staged.prefix / "venv")), shim.stderr
    assert os.access(shim.stdout.strip(), os.X_OK)  # compiled at install, not at the first pod


def test_installing_twice_keeps_the_operators_file(staged: Staged) -> None:
    assert "kept" in staged.runs[1].stdout and "max_files: 7" in staged.yaml.read_text()
    shipped = (CHECKOUT / "deploy" / "riklet.yaml").read_text()
    assert staged.yaml.read_text().startswith(shipped)


def test_the_shipped_yaml_lists_every_setting_commented_out(tmp_path: Path) -> None:
    lines = (CHECKOUT / "deploy" / "riklet.yaml").read_text().splitlines()
    assert not [line for line in lines if line and not line.startswith("#")]    # all commented

    uncommented = [line[1:] for line in lines if re.match(r"^#(  )*[a-z_]+:", line)]
    path = write(tmp_path / "riklet.yaml", "\n".join(uncommented) + "\n")
    assert set(configload.read_yaml(path)) == {s.key for s in configload.SETTINGS}
    config.load(None, {"RIKLET_CONFIG": path})     # and every value parses


def test_uninstall_keeps_etc_and_state(staged: Staged) -> None:  # last: it removes the install
    out = subprocess.run([str(CHECKOUT / "deploy" / "install.sh"), "--uninstall", "--root", str(staged.root)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert not staged.prefix.exists() and not staged.unit.exists()
    assert not (staged.root / "usr" / "local" / "bin" / "riklet").exists()
    assert staged.yaml.exists()
