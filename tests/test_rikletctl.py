"""rikletctl as kubectl users expect it, against a real agent: the output formats, ``get -w``,
shell completion from bash and zsh with the agent's pod names, and the config file's contexts
(with the precedence flag > environment > context > default)."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import stat
import subprocess
import threading
from collections.abc import Iterator

import pytest
import yaml

from tests.stack import BIN, Agent
from tests.support import free_port, need, wait_for

pytestmark = pytest.mark.integration
CTL = os.path.join(BIN, "rikletctl")


@pytest.fixture(scope="module")
def agent() -> Iterator[Agent]:
    a = Agent().start()
    try:
        a.ctl("run", "web", "--", "sleep", "100000")
        a.wait_phase("web", "Running", 30)
        yield a
    finally:
        a.close()


def test_every_listing_prints_table_wide_json_yaml_and_name(agent: Agent) -> None:
    assert agent.ctl("get", "pods", "-o", "name").stdout.split() == ["pod/web"]
    wide = agent.ctl("get", "pods", "-o", "wide").stdout.splitlines()
    assert wide[0].split() == ["NAME", "READY", "PHASE", "RESTARTS", "PID", "PORTS", "AGE", "IP", "NODE",
                               "IMAGES", "WORKLOAD"]
    assert wide[1].split()[0] == "web" and wide[1].split()[-1] == "web"
    as_json = json.loads(agent.ctl("get", "pod", "web", "-o", "json").stdout)
    as_yaml = yaml.safe_load(agent.ctl("get", "pod", "web", "-o", "yaml").stdout)
    assert as_yaml["name"] == as_json["name"] == "web" and as_yaml["uid"] == as_json["uid"]
    assert [p["name"] for p in yaml.safe_load(agent.ctl("get", "pods", "-o", "yaml").stdout)] == ["web"]
    agent.ctl("volume", "create", "data")
    assert agent.ctl("volume", "ls", "-o", "name").stdout.split() == ["volume/data"]
    assert yaml.safe_load(agent.ctl("volume", "ls", "-o", "yaml").stdout)[0]["name"] == "data"
    assert agent.ctl("volume", "ls", "-o", "wide").stdout.split()[:4] == ["NAME", "SIZE", "AGE", "PATH"]
    assert agent.ctl("get", "apps", "-o", "name").stdout == ""
    assert yaml.safe_load(agent.ctl("events", "web", "-o", "yaml").stdout)[0]["pod"] == "web"
    bad = agent.ctl("get", "pods", "-o", "xml", check=False)
    assert bad.returncode == 2 and "invalid choice: 'xml'" in bad.stderr


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    q: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            q.put(line.rstrip("\n"))
    threading.Thread(target=pump, daemon=True).start()
    return q


def _until(q: queue.Queue[str], want: str, seen: list[str]) -> None:
    wait_for(lambda: any(want in line for line in _drain(q, seen)), 30, f"a line with {want!r}")


def test_get_watch_prints_the_table_then_a_row_per_change_and_ends_on_ctrl_c(agent: Agent) -> None:
    proc = subprocess.Popen([CTL, "get", "pods", "-w"], env=agent.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    try:
        q = _lines(proc)
        _until(q, "web", seen)
        assert seen[0].split()[:3] == ["NAME", "READY", "PHASE"]
        agent.ctl("run", "watched", "--", "sleep", "100000")
        wait_for(lambda: any("watched" in s and "Running" in s for s in _drain(q, seen)), 30,
                 "watched's Running row")
        assert all(len(s.split()) >= 6 for s in seen[1:])   # rows, in the table's columns
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
        assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        agent.ctl("delete", "watched", check=False)


def _drain(q: queue.Queue[str], seen: list[str]) -> list[str]:
    while not q.empty():
        seen.append(q.get())
    return seen


def _complete_env(agent: Agent) -> dict[str, str]:
    return {**agent.env, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}


BASH_CALL = ('source <(rikletctl completion bash); complete -p rikletctl; '
             'COMP_WORDS=({words}); COMP_CWORD={cword}; _rikletctl; printf "%s\\n" "${{COMPREPLY[@]}}"')


def test_bash_completes_commands_flags_and_the_agents_pod_names(agent: Agent) -> None:
    def complete(*words: str) -> list[str]:
        script = BASH_CALL.format(words=" ".join(f"'{w}'" for w in ("rikletctl", *words)), cword=len(words))
        res = subprocess.run(["bash", "-c", script], env=_complete_env(agent), capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        assert lines[0] == "complete -o default -F _rikletctl rikletctl"
        return lines[1:]
    assert complete("get", "pods", "") == ["web"]
    assert complete("describe", "pod", "w") == ["web"]
    assert complete("logs", "-f", "") == ["web"]
    assert complete("ge") == ["get"]
    assert complete("get", "pods", "-o", "") == ["table", "wide", "json", "yaml", "name"]
    assert "--watch-only" in complete("get", "pods", "--w")


def test_zsh_completes_the_agents_pod_names(agent: Agent) -> None:
    need(shutil.which("zsh") is not None, "zsh (Debian package zsh) for the zsh completion script")
    # compadd and compdef exist only inside zsh's completion system: stand-ins print what
    # the script hands them
    script = ('compdef() { print -r -- "compdef $*" }; compadd() { shift; print -rl -- "$@" }; '
              '_files() { print files }; source <(rikletctl completion zsh); '
              'words=(rikletctl get pods ""); CURRENT=4; _rikletctl; '
              'words=(rikletctl get pods -o y); CURRENT=5; _rikletctl')
    res = subprocess.run(["zsh", "-f", "-c", script], env=_complete_env(agent), capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["compdef _rikletctl rikletctl", "web", "table", "wide", "json",
                                       "yaml", "name"]


def test_contexts_reach_the_agent_with_flag_env_context_default_precedence(agent: Agent, tmp_path: str
                                                                           ) -> None:
    cfg = os.path.join(tmp_path, "riklet", "config.yaml")
    # no endpoint, token or agent config in the environment: only the context says them
    env = {k: v for k, v in agent.env.items()
           if k not in ("RIKLET_ENDPOINT", "RIKLET_CONFIG", "RIKLET_STATE_DIR", "RIKLET_TOKEN_FILE")}
    env["XDG_CONFIG_HOME"] = str(tmp_path)

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CTL, *args], env=env, capture_output=True, text=True, timeout=60)

    closed = f"127.0.0.1:{free_port()}"
    assert ctl("config", "set-context", "node", "--endpoint", agent.api, "--token-file",
               agent.token_path, "--use").returncode == 0
    assert ctl("config", "set-context", "away", "--endpoint", closed).returncode == 0
    assert stat.S_IMODE(os.stat(cfg).st_mode) == 0o600
    assert ctl("config", "current-context").stdout.strip() == "node"
    rows = ctl("config", "get-contexts").stdout.splitlines()
    assert rows[1].split()[:3] == ["*", "node", agent.api] and rows[2].split()[:2] == ["away", closed]

    assert ctl("get", "pods", "-o", "name").stdout.split() == ["pod/web"]          # the context
    assert ctl("get", "pods", "--context", "away").returncode == 3                  # --context
    env["RIKLET_ENDPOINT"] = closed
    assert ctl("get", "pods").returncode == 3                                       # env > context
    assert ctl("--endpoint", agent.api, "get", "pods", "-o", "name").stdout.split() == ["pod/web"]
    assert ctl("get", "pods", "--endpoint", agent.api).returncode == 0              # flag > env
    del env["RIKLET_ENDPOINT"]
    assert ctl("config", "use-context", "away").returncode == 0
    assert ctl("get", "pods").returncode == 3
    assert ctl("config", "use-context", "nowhere").returncode == 2

    # completion asks the agent of the context typed on the line
    res = ctl("__complete", "--context", "node", "get", "pods", "")
    assert res.stdout.split() == ["web"]

    with open(cfg, "a", encoding="utf-8") as fh:
        fh.write("- name: typo\n  endpiont: 127.0.0.1:1\n")
    bad = ctl("get", "pods")
    assert bad.returncode == 2 and "contexts[2].endpiont" in bad.stderr and "unknown key" in bad.stderr
