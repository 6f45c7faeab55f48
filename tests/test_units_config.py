"""Quantities and configuration layering: defaults < YAML < environment < flags."""

from __future__ import annotations

import argparse

import pytest

from common import config
from common.errors import InvalidArgument
from common.units import parse_cpu, parse_duration, parse_memory


@pytest.mark.parametrize(("text", "expected"), [
    ("64m", 64 * 2**20), ("64Mi", 64 * 2**20), ("1G", 2**30), ("512", 512), (1024, 1024), ("1.5k", 1536)])
def test_memory_sizes(text: object, expected: int) -> None:
    assert parse_memory(text, "m") == expected


@pytest.mark.parametrize(("text", "expected"), [("0.5", 500), ("500m", 500), (2, 2000), (0.25, 250)])
def test_cpu(text: object, expected: int) -> None:
    assert parse_cpu(text, "c") == expected


@pytest.mark.parametrize(("text", "expected"), [("5s", 5.0), ("500ms", 0.5), ("1m", 60.0), (3, 3.0)])
def test_durations(text: object, expected: float) -> None:
    assert parse_duration(text, "d") == expected


@pytest.mark.parametrize("bad", ["", "-1", "1x", True, "m"])
def test_bad_quantities_name_the_field(bad: object) -> None:
    for parse in (parse_memory, parse_cpu):
        with pytest.raises(InvalidArgument) as err:
            parse(bad, "spec.x")
        assert err.value.field == "spec.x"


def test_layers_override_in_order(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg_file = tmp_path / "riklet.yaml"
    cfg_file.write_text("api:\n  address: 127.0.0.1:7001\nlogging:\n  level: debug\nlogs:\n  max_files: 5\n")
    env = {"RIKLET_CONFIG": str(cfg_file), "RIKLET_API_ADDRESS": "127.0.0.1:7002"}
    flags = argparse.Namespace(config=None, api_address=None, logging_level="ERROR")
    cfg = config.load(flags, env)
    assert cfg.api_address == "127.0.0.1:7002" and cfg.sources["api.address"] == "environment"
    assert cfg.logging_level == "ERROR" and cfg.sources["logging.level"] == "flags"
    assert cfg.logs_max_files == 5 and cfg.sources["logs.max_files"] == str(cfg_file)
    assert cfg.metrics_address == "127.0.0.1:9092" and cfg.sources["metrics.address"] == "default"


def test_unknown_key_names_file_and_key(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg_file = tmp_path / "riklet.yaml"
    cfg_file.write_text("api:\n  adress: 127.0.0.1:1\n")
    with pytest.raises(InvalidArgument) as err:
        config.load(None, {"RIKLET_CONFIG": str(cfg_file)})
    assert err.value.field == "api.adress" and str(cfg_file) in err.value.message


def test_bad_value_names_its_source(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument) as err:
        config.load(None, {"RIKLET_API_ADDRESS": "nowhere"})
    assert err.value.field == "RIKLET_API_ADDRESS"
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("restart:\n  backoff_max: soon\n")
    with pytest.raises(InvalidArgument) as err:
        config.load(None, {"RIKLET_CONFIG": str(cfg_file)})
    assert err.value.field == f"{cfg_file}: restart.backoff_max"
