"""rikletctl's pure parts: the output formats, the config file (parsing, errors naming the key,
writing 0600), the precedence of flag > environment > context > default, the completion walker
and the pull progress lines."""

from __future__ import annotations

import argparse
import io
import json
import os
import stat
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from cli import completion, connect, ctlconfig, output, pull
from cli.rikletctl import build_parser
from common.errors import InvalidArgument
from common.pb import node_pb2 as npb

THINGS = output.Listing("thing", ("NAME", "SIZE"), lambda t: (t["name"], str(t["size"])),
                        lambda t: dict(t), lambda t: t["name"], ("COLOR",), lambda t: (t["color"],))
ROWS = [{"name": "a", "size": 1, "color": "red"}, {"name": "longer", "size": 22, "color": "blue"}]


def test_each_format_prints_the_same_objects() -> None:
    assert output.render(THINGS, ROWS, "table") == ["NAME    SIZE", "a       1", "longer  22"]
    assert output.render(THINGS, ROWS, "wide") == ["NAME    SIZE  COLOR", "a       1     red",
                                                   "longer  22    blue"]
    assert output.render(THINGS, ROWS, "name") == ["thing/a", "thing/longer"]
    as_json = json.loads("\n".join(output.render(THINGS, ROWS, "json")))
    assert as_json == yaml.safe_load("\n".join(output.render(THINGS, ROWS, "yaml"))) == ROWS
    assert json.loads(output.render(THINGS, ROWS[:1], "json", single=True)[0]) == ROWS[0]
    assert output.render(THINGS, [], "table") == ["NAME  SIZE"]


def test_a_watch_keeps_the_first_tables_widths() -> None:
    stream = output.Stream(THINGS, "table")
    assert stream.table(ROWS[:1]) == ["NAME  SIZE", "a     1"]
    assert stream.one(ROWS[1]) == "longer  22"
    only = output.Stream(THINGS, "table")         # --watch-only: the header with the first row
    assert only.one(ROWS[0]).splitlines() == ["NAME  SIZE", "a     1"]
    assert json.loads(output.Stream(THINGS, "json").one(ROWS[0])) == ROWS[0]
    assert output.Stream(THINGS, "name").one(ROWS[0]) == "thing/a"


GOOD = """current-context: lab
contexts:
- name: lab
  endpoint: 10.0.0.7:9091
  token-file: lab.token
  tls-ca: ~/ca.pem
- name: local
  endpoint: unix:/run/riklet/api.sock
"""


def test_the_config_file_parses_with_paths_resolved(tmp_path: Any) -> None:
    path = str(tmp_path / "config.yaml")
    cfg = ctlconfig.parse(GOOD, path)
    lab = cfg.context(None)
    assert lab is not None and lab.name == "lab" and lab.endpoint == "10.0.0.7:9091"
    assert lab.token_file == str(tmp_path / "lab.token")
    assert lab.tls_ca == os.path.join(os.path.expanduser("~"), "ca.pem")
    assert ctlconfig.parse("", path).contexts == {}
    assert ctlconfig.load(str(tmp_path / "missing.yaml")).contexts == {}


@pytest.mark.parametrize("text, field", [
    ("contexts: {}", "contexts"),
    ("current-contxt: a", "current-contxt"),
    ("contexts:\n- endpoint: a:1", "contexts[0].name"),
    ("contexts:\n- name: a\n  endpoint: nope", "contexts[0].endpoint"),
    ("contexts:\n- name: a\n  endpoint: h:99999", "contexts[0].endpoint"),
    ("contexts:\n- name: a\n  token-file: 3", "contexts[0].token-file"),
    ("contexts:\n- name: a\n  tls-cacert: x", "contexts[0].tls-cacert"),
    ("contexts:\n- name: a\n- name: a", "contexts[1].name"),
    ("current-context: b\ncontexts:\n- name: a", "current-context"),
    ("[1, 2", "config"),
])
def test_a_bad_config_file_is_refused_naming_the_key(text: str, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        ctlconfig.parse(text, "cfg.yaml")
    assert field in str(err.value) and "cfg.yaml" in str(err.value)


def test_set_context_writes_the_file_0600_and_keeps_other_keys(tmp_path: Any) -> None:
    path = str(tmp_path / "sub" / "config.yaml")
    cfg = ctlconfig.set_context(ctlconfig.load(path), "lab", {"endpoint": "h:1", "token-file": "/t"})
    ctlconfig.save(cfg)
    cfg = ctlconfig.set_context(ctlconfig.load(path), "lab", {"endpoint": "h:2", "token-file": None})
    ctlconfig.save(cfg)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert ctlconfig.load(path).contexts["lab"] == ctlconfig.Context("lab", "h:2", "/t")
    with pytest.raises(InvalidArgument, match="--endpoint"):
        ctlconfig.set_context(cfg, "lab", {"endpoint": "no port"})


def _args(**kw: Any) -> argparse.Namespace:
    base = {k: None for k in ("endpoint", "token_file", "tls_ca", "tls_cert", "tls_key", "context", "config")}
    return argparse.Namespace(**{**base, **kw})


def test_flag_beats_environment_beats_context_beats_default(tmp_path: Any) -> None:
    cfg = tmp_path / "config.yaml"
    (tmp_path / "ctx.token").write_text("c" * 20)
    cfg.write_text("current-context: a\ncontexts:\n- name: a\n  endpoint: ctx:1\n  token-file: ctx.token\n"
                   "- name: b\n  endpoint: other:2\n  tls-ca: /ca\n")
    env = {"RIKLETCONFIG": str(cfg)}
    default = str(tmp_path / "none")
    ctx = connect.resolve(_args(), lambda: default, env)
    assert (ctx.endpoint, ctx.token, ctx.tls) == ("ctx:1", "c" * 20, (None, None, None))
    assert connect.resolve(_args(context="b"), lambda: default, env).tls == ("/ca", None, None)
    by_env = connect.resolve(_args(), lambda: default, {**env, "RIKLET_ENDPOINT": "env:3",
                                                         "RIKLET_TOKEN": "e" * 20})
    assert (by_env.endpoint, by_env.token) == ("env:3", "e" * 20)
    by_flag = connect.resolve(_args(endpoint="flag:4"), lambda: default, {**env, "RIKLET_ENDPOINT": "env:3"})
    assert by_flag.endpoint == "flag:4"
    none = connect.resolve(_args(config=str(tmp_path / "missing.yaml")), lambda: default, {})
    assert (none.endpoint, none.token_file) == (connect.DEFAULT_ENDPOINT, default)
    with pytest.raises(InvalidArgument, match="no context 'c'"):
        connect.resolve(_args(context="c"), lambda: default, env)


def test_completion_walks_the_parser() -> None:
    asked: list[tuple[str, dict[str, str]]] = []

    def names(kind: str, flags: dict[str, str]) -> list[str]:
        asked.append((kind, flags))
        return [f"{kind}-1"]
    parser = build_parser()
    assert "get" in completion.candidates(parser, ["g"], names) and "__complete" not in \
        completion.candidates(parser, [""], names)
    assert completion.candidates(parser, ["--context", "lab", "get", "pods", ""], names) == ["pods-1"]
    assert asked[-1] == ("pods", {"context": "lab"})
    assert completion.candidates(parser, ["delete", "a", ""], names) == ["pods-1"]
    assert completion.candidates(parser, ["volume", "rm", ""], names) == ["volumes-1"]
    assert completion.candidates(parser, ["config", "use-context", ""], names) == ["contexts-1"]
    assert completion.candidates(parser, ["get", ""], names) == ["pods", "pod", "po", "apps", "app"]
    assert completion.candidates(parser, ["apply", "-f", ""], names) == [completion.FILES]
    assert completion.candidates(parser, ["--context", ""], names) == ["contexts-1"]
    assert "--watch" in completion.candidates(parser, ["get", "pods", "--"], names)


def _progress(done: bool = False, **layers: tuple[str, int, int]) -> npb.PullProgress:
    ls = [npb.PullLayer(ref=f"layer-sha256:{k * 64}", state=s, offset=o, total=t)
          for k, (s, o, t) in layers.items()]
    return npb.PullProgress(message="pulling", done=done, image="img" if done else "", layers=ls,
                            bytes_done=sum(x.offset for x in ls), bytes_total=sum(x.total for x in ls))


def test_pull_progress_plain_and_on_a_terminal() -> None:
    mb = 2**20
    msgs = [_progress(a=("downloading", mb, 2 * mb)), _progress(a=("downloading", 2 * mb // 1, 4 * mb)),
            _progress(a=("done", 4 * mb, 4 * mb), b=("downloading", 0, mb)), _progress(done=True)]
    err, out = io.StringIO(), io.StringIO()
    pull.show("img", msgs, err, out, tty=False)
    lines = err.getvalue().splitlines()
    assert lines[:3] == ["layer-sha256:aaaaaaaaaaaa: downloading 1.0 MiB/2.0 MiB",
                         "layer-sha256:aaaaaaaaaaaa: done 4.0 MiB/4.0 MiB",
                         "layer-sha256:bbbbbbbbbbbb: downloading 0.0 MiB/1.0 MiB"]
    assert lines[3].startswith("img: 4.0 MiB in ") and out.getvalue() == "img\n"
    err = io.StringIO()
    pull.show("img", msgs, err, io.StringIO(), tty=True)
    frames = err.getvalue()
    assert "\x1b[2F" in frames     # redrawn in place: up over the one download and the total
    assert "|" + "+" * 15 + "-" * 15 + "| 1.0 MiB/2.0 MiB" in frames
    assert "img: elapsed" in frames and "total 4.0 MiB/5.0 MiB" in frames
    old = io.StringIO()            # an agent that sends messages only
    pull.show("img", [SimpleNamespace(done=False, message="50%", layers=[], bytes_done=0),
                      SimpleNamespace(done=True, image="img", layers=[], bytes_done=0)], old, io.StringIO(),
              tty=True)
    assert old.getvalue() == "50%\n"


def test_the_agent_keeps_each_download_of_a_pull_until_its_end() -> None:
    from services.manager.containerd.images import Layers
    seen = Layers()
    assert seen.update([("layer-a", 5, 10), ("manifest-m", 1, 2)]) == (
        ("layer-a", "downloading", 5, 10), ("manifest-m", "downloading", 1, 2))
    # containerd lists only the downloads in progress: one that left the list is done
    assert seen.update([("layer-a", 8, 10)]) == (("layer-a", "downloading", 8, 10),
                                                 ("manifest-m", "done", 2, 2))
    seen.finish([("sha256:b", 7), ("sha256:c", 3)])   # the manifest's layers, some never seen
    assert seen.update([]) == (("layer-a", "done", 10, 10), ("manifest-m", "done", 2, 2),
                               ("layer-sha256:b", "done", 7, 7), ("layer-sha256:c", "done", 3, 3))
