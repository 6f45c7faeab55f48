"""Small inputs that used to cost gigabytes or crash a handler, sent to a real agent.

Each bomb goes through the real gRPC Node API (and ``rikletctl apply -f -``) and must come back
as INVALID_ARGUMENT naming the field or the limit, quickly, without the manager's peak memory
growing, and with the agent still answering afterwards. The bounds on time and memory are
generous: they catch the defects (8 s and 2.4 GB for the alias bomb), not a slow machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from common.errors import MAX_FIELD_BYTES, MAX_MESSAGE_BYTES, InvalidArgument, bounded, excerpt
from common.model import MAX_DEPTH
from services.manager.api.node import MAX_GRPC_MESSAGE_BYTES, NodeService
from services.manager.rik.instances import instance_workload, load_definition
from tests.stack import BIN, Agent, chas_agent, npb
from tests.test_model import alias_bomb

ANSWER_WITHIN = 5.0              # seconds; the alias bomb took 8 s before the fix
PEAK_GROWTH_BYTES = 200 << 20    # the alias bomb took 2.4 GB before the fix


@pytest.fixture(scope="module")
def agent() -> Iterator[Agent]:
    with chas_agent() as a:  # the CHaS API is sent bombs too
        yield a


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def refused(agent: Agent, call: Callable[[], Any]) -> grpc.RpcError:
    """Run a gRPC call that must be refused; check it was quick, cheap and harmless."""
    manager = agent.service_pid("manager")
    before = peak_rss(manager)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        call()
    elapsed = time.monotonic() - started
    assert elapsed < ANSWER_WITHIN, f"took {elapsed:.1f}s"
    growth = peak_rss(manager) - before
    assert growth < PEAK_GROWTH_BYTES, f"the manager's peak memory grew by {growth >> 20} MiB"
    assert agent.service_pid("manager") == manager, "the manager restarted"
    agent.stub.List(npb.ListRequest(), timeout=5)      # and it still serves
    return err.value


def apply(agent: Agent, manifest: str, fmt: str = "") -> Callable[[], Any]:
    return lambda: agent.stub.Apply(npb.ApplyRequest(manifest=manifest, format=fmt), timeout=30)


def test_the_yaml_alias_bomb_is_refused_quickly_in_bounded_memory(agent: Agent) -> None:
    err = refused(agent, apply(agent, alias_bomb()))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("manifest: YAML aliases") and len(err.details()) < 200
    assert agent.pods() == []


@pytest.mark.parametrize(("manifest", "fmt"), [
    ("[" * 100_000, ""), ("[" * 100_000, "json"),
    ("kind: " + "[" * 100_000, "yaml"), ('{"name": "web", "spec": ' + "{" * 100_000, ""),
])
def test_deep_nesting_is_refused_naming_the_limit(agent: Agent, manifest: str, fmt: str) -> None:
    err = refused(agent, apply(agent, manifest, fmt))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == f"manifest: nested deeper than {MAX_DEPTH} levels of objects and lists"


def test_rikletctl_apply_from_stdin_refuses_deep_nesting_without_a_traceback(agent: Agent) -> None:
    started = time.monotonic()
    res = agent.ctl("apply", "-f", "-", input="[" * 100_000, check=False)
    assert time.monotonic() - started < ANSWER_WITHIN + 5   # plus the CLI's own start-up
    assert res.returncode == 1, res.stderr
    assert res.stderr.strip() == (f"rikletctl: invalid_argument: manifest: nested deeper than "
                                  f"{MAX_DEPTH} levels of objects and lists")
    res = agent.ctl("apply", "-f", "-", input=alias_bomb(), check=False)
    assert res.returncode == 1 and "invalid_argument: manifest: YAML aliases" in res.stderr
    assert "Traceback" not in res.stderr


def test_rikletctl_apply_refuses_a_non_utf8_or_oversized_manifest_itself(agent: Agent) -> None:
    ctl = os.path.join(BIN, "rikletctl")
    for data, expected in ((b"\xff\xfe[", "rikletctl: -f: -: not UTF-8 (invalid start byte at byte 0)"),
                           (b"a" * (5 << 20), "rikletctl: -f: -: larger than the 262144 bytes a "
                                              "manifest may be")):
        res = subprocess.run([ctl, "apply", "-f", "-"], env=agent.env, input=data,
                             capture_output=True, timeout=60)
        assert res.returncode == 2 and res.stderr.decode().strip() == expected, res.stderr


def test_a_20000_character_pod_name_is_invalid_argument_naming_name(agent: Agent) -> None:
    long_name = "x" * 20_000
    manifest = json.dumps({"name": long_name, "spec": {"containers": [{"name": "a", "command": ["x"]}]}})
    for call in (apply(agent, manifest),
                 lambda: agent.stub.Get(npb.GetRequest(name=long_name), timeout=10),
                 lambda: agent.stub.Delete(npb.DeleteRequest(name="é" * 20_000), timeout=10)):
        err = refused(agent, call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert err.details().startswith("name: '") and "is not a DNS label" in err.details()
        assert len(err.details()) < 300


def test_a_huge_string_field_is_refused_naming_the_field_and_the_limit(agent: Agent) -> None:
    manifest = json.dumps({"name": "web", "spec": {"containers": [
        {"name": "a", "command": ["sleep", "1"], "env": {"K": "v" * 200_000}}]}})
    err = refused(agent, apply(agent, manifest))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == ("spec.containers[0].env.K.value: 200000 characters, more than the 32768 "
                             "allowed")


def test_a_nul_containing_huge_key_is_named_by_a_short_excerpt(agent: Agent) -> None:
    err = refused(agent, apply(agent, json.dumps({"é\u0000" * 10_000: 1})))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown field" in err.details() and len(err.details().encode()) < 512


def test_the_agent_still_runs_a_pod_after_the_bombs(agent: Agent) -> None:
    manifest = json.dumps({"name": "after", "spec": {"containers": [
        {"name": "a", "command": ["sleep", "60"]}]}})
    agent.stub.Apply(npb.ApplyRequest(manifest=manifest), timeout=30)
    agent.wait_phase("after", "Running")


# -- the boundaries themselves ----------------------------------------------------------------

class _Aborted(Exception):
    pass


class _Context:
    """Records what a handler aborts with, as grpc's context would send it."""

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise _Aborted


def test_the_grpc_boundary_never_sends_a_message_over_the_metadata_limit() -> None:
    exc = InvalidArgument("short", "name")
    exc.message = "é" * 20_000       # set after construction, as some adapters do with fields

    def fail() -> None:
        raise exc

    context = _Context()
    with pytest.raises(_Aborted):
        NodeService._call(NodeService.__new__(NodeService), context, fail)  # type: ignore[arg-type]
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT
    assert context.details.startswith("name: éé") and context.details.endswith("…")
    encoded = len(context.details.encode())
    assert encoded <= MAX_GRPC_MESSAGE_BYTES
    assert encoded * 3 < 8192        # percent-encoded in the grpc-message trailer


def test_every_error_is_bounded_at_construction() -> None:
    exc = InvalidArgument("ü" * 100_000, "f" * 100_000)
    assert len(exc.message.encode()) <= MAX_MESSAGE_BYTES and exc.message.endswith("…")
    assert exc.field is not None and len(exc.field.encode()) <= MAX_FIELD_BYTES
    assert bounded("abc", 3) == "abc" and bounded("abcd", 3) == "…"
    assert bounded("ééé", 5) == "é…"                      # never cuts a character in two


def test_an_excerpt_costs_nothing_whatever_the_value() -> None:
    bomb: Any = ["x"] * 9
    for _ in range(8):
        bomb = [bomb] * 9                                  # 9**9 leaves, as the alias bomb
    started = time.monotonic()
    for value in (bomb, "y" * 10_000_000, 10 ** 4000, {str(i): i for i in range(100_000)}):
        text = excerpt(value)
        assert len(text) <= 64
    assert time.monotonic() - started < 1.0
    assert excerpt("web") == "'web'" and excerpt(None) == "None"
    assert excerpt("z" * 100) == "'" + "z" * 62 + "…"


def test_rik_definitions_with_deep_nesting_or_huge_values_are_refused_not_crashed() -> None:
    with pytest.raises(InvalidArgument) as err:
        load_definition("[" * 100_000)
    assert err.value.field == "definition"
    for kind in ([[["x"] * 1000] * 10] * 2, "[" * 300 + "]" * 300):
        text = json.dumps({"name": "web", "kind": kind}).replace('"[', "[").replace(']"', "]")
        try:
            data = load_definition(text)
        except InvalidArgument as exc:       # too deep for the definition decoder: also fine
            assert exc.field == "definition"
            continue
        with pytest.raises(InvalidArgument) as err:
            instance_workload(data, "instance-1", 5.0)
        assert err.value.field == "kind" and len(err.value.message) < 200


def test_chas_deploy_refuses_a_deep_or_huge_body_with_400(agent: Agent) -> None:
    status, _, body = agent.chas_request("POST", "/containers/deploy", body=b"[" * 500_000)
    assert status == 400 and body["error"]["field"] == "body", body
    status, _, body = agent.chas_request("POST", "/containers/deploy", body={"name": "n" * 200_000})
    assert status == 400 and body["error"]["field"] == "name" and len(json.dumps(body)) < 1024, body
    # the manifest limits reach the CHaS API through the workload it builds
    status, _, body = agent.chas_request("POST", "/containers/deploy",
                                         body={"name": "long", "command": ["x" * 40_000]})
    assert status == 400 and body["error"]["field"] == "command[0]", body
    assert "more than the 32768 allowed" in body["error"]["message"]
    agent.stub.List(npb.ListRequest(), timeout=5)
