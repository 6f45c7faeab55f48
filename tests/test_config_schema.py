"""Settings checked by their schema (common.configtypes): what each kind of value accepts and
refuses, the refusal naming where the value came from; the logging settings in `riklet config show`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common import config, configload
from common.errors import InvalidArgument

RIKLET = os.path.join(os.path.dirname(sys.executable), "riklet")


@pytest.fixture(autouse=True)
def no_system_chas_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(configload, "CHAS_CONFIG_PATH", str(tmp_path / "etc-chas-node-agent.yaml"))


@pytest.mark.parametrize("env, value", [
    ("RIKLET_POD_SUBNET", "10.0.0.0/30"),          # too small
    ("RIKLET_POD_SUBNET", "10.0.0.1/16"),          # host bits set
    ("RIKLET_HOST_PORTS", "9-1"),
    ("RIKLET_HOST_PORTS", "0-10"),
    ("RIKLET_WORKLOAD_USER", "nobody"),
    ("RIKLET_PROXY_BIND_ADDRESS", "localhost"),    # an IP literal, never a name to resolve
    ("CHAS_API_URL", "ftp://chas"),
    ("RIKLET_BRIDGE", "a-bridge-name-too-long"),
    ("RIKLET_INSECURE", "perhaps"),
    ("CONTAINERD_SOCKET", "run/containerd.sock"),
    ("RIKLET_INSECURE_REGISTRIES", "ok:5000,not/a/host"),
    ("RIKLET_METRIC_RESOLUTION", "2h"),
    ("RIKLET_RESYNC_INTERVAL", "0s"),
    ("RIKLET_API_ADDRESS", "127.0.0.1:65536"),
    ("RIKLET_PROXY_MODE", "ebpf"),
    ("RIKLET_LOG_JOURNALD", "maybe"),
])
def test_a_bad_value_is_refused_naming_its_variable(env: str, value: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        config.load(None, {env: value})
    assert err.value.field == env and err.value.message


@pytest.mark.parametrize("yaml_text, key", [
    ("logging:\n  max_files: 0\n", "logging.max_files"),
    ("logging:\n  max_size: big\n", "logging.max_size"),
    ("logging:\n  journald: sometimes\n", "logging.journald"),
    ("proxy:\n  max_connections: -1\n", "proxy.max_connections"),
    ("policy:\n  allow_host_network: [true]\n", "policy.allow_host_network"),
    ("api:\n  max_streams: true\n", "api.max_streams"),      # a bool is not a count
    ("volumes:\n  host_path_prefixes: [relative/dir]\n", "volumes.host_path_prefixes"),
])
def test_a_bad_file_value_names_the_file_and_key(tmp_path: Path, yaml_text: str, key: str) -> None:
    path = tmp_path / "riklet.yaml"
    path.write_text(yaml_text)
    with pytest.raises(InvalidArgument) as err:
        config.load(None, {"RIKLET_CONFIG": str(path)})
    assert err.value.field == f"{path}: {key}"


def test_values_are_read_as_people_write_them(tmp_path: Path) -> None:
    path = tmp_path / "riklet.yaml"
    path.write_text("logging:\n  journald: true\n  max_size: 1Mi\nnode:\n  id: 42\n"
                    "policy:\n  allowed_registries: [' ghcr.io ', 'localhost:5000']\n  max_cpu: 500m\n")
    cfg = config.load(None, {"RIKLET_CONFIG": str(path), "RIKLET_INSECURE": "yes",
                             "CONTAINERD_SOCKET": "unix:///run/k.sock", "CHAS_API_URL": "http://chas:8080/",
                             "RIKLET_HOST_PORTS": "31000-31010", "RIKLET_WORKLOAD_USER": "1000",
                             "RIKLET_HOST_PATH_PREFIXES": "/srv/data/, /mnt/../opt"})
    assert cfg.logging_journald == "true" and cfg.logging_max_size == 2**20 and cfg.node_id == "42"
    assert cfg.policy_allowed_registries == ("ghcr.io", "localhost:5000") and cfg.policy_max_cpu == 500
    assert cfg.security_insecure is True and cfg.containerd_address == "/run/k.sock"
    assert cfg.chas_api_url == "http://chas:8080" and cfg.chas_host_ports == (31000, 31010)
    assert cfg.runtime_user == (1000, 1000) and cfg.volumes_host_path_prefixes == ("/srv/data", "/opt")
    assert (cfg.logging_max_files, cfg.logging_file) == (5, None)       # the defaults


def test_config_show_lists_the_logging_settings_and_their_sources(tmp_path: Path) -> None:
    path = tmp_path / "riklet.yaml"
    path.write_text(f"logging:\n  file: {tmp_path}/riklet.log\n  max_files: 2\n")
    out = subprocess.run([RIKLET, "config", "show", "-o", "json", "--config", str(path)], cwd=tmp_path,
                         env={"PATH": os.environ.get("PATH", os.defpath), "HOME": str(tmp_path),
                              "RIKLET_LOG_JOURNALD": "false"}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["logging.journald"] == {"value": "false", "source": "environment RIKLET_LOG_JOURNALD"}
    assert data["logging.max_files"] == {"value": 2, "source": f"{path}: logging.max_files"}
    assert data["logging.file"] == {"value": f"{tmp_path}/riklet.log", "source": f"{path}: logging.file"}
    assert data["logging.max_size"] == {"value": 10 * 2**20, "source": "default"}
