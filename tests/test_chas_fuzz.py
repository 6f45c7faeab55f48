"""OpenAPI-driven fuzzing of the CHaS HTTP API against one real agent.

Deploy bodies are generated from the ``DeployRequest`` schema of ``openapi.json`` (valid ones),
then mutated (unknown keys, missing or mistyped fields, other JSON, bytes that are not JSON);
the other routes get random ids, paths, methods and query strings. Whatever is sent:

- the answer is never a 5xx;
- a non-2xx answer has the error shape ``{"error": {"code", "message", "field"?}}``;
- a 2xx answer matches the response schema of its route;
- a rejected request changes nothing: no container appears, none changes, none starts to go.

Bounded: CHAS_FUZZ_EXAMPLES (default 150) deploy bodies and two thirds as many other requests.
Commands are drawn from a short harmless list: a valid body really runs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from services.manager.chas import api as chas_api
from tests.stack import Agent, chas_agent

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("CHAS_FUZZ_EXAMPLES", "150"))
HOST_PORTS = (24100, 24199)   # below the ephemeral range, apart from test_chas_api's
CONFIG = ("containerd:\n  address: /nonexistent/riklet-fuzz/containerd.sock\n"
          f"chas:\n  host_ports: {HOST_PORTS[0]}-{HOST_PORTS[1]}\n")
NAMES = ["fz-a", "fz-b", "fz-c", "web-server-1", "deploy", "logs"]
SAFE_COMMANDS = [["sleep", "300"], ["true"], ["sh", "-c", "echo fuzz; sleep 300"], ["/nonexistent/program"]]

with open(chas_api.OPENAPI_PATH, encoding="utf-8") as _fh:
    SPEC: dict[str, Any] = json.load(_fh)

SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def agent() -> Iterator[Agent]:
    with chas_agent(CONFIG) as a:
        yield a


# -- strategies from the schema -------------------------------------------------------------------

def resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        node: Any = SPEC
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def from_schema(schema: dict[str, Any], path: str = "", nonnull: bool = False) -> st.SearchStrategy[Any]:
    """Values valid for ``schema`` (the OpenAPI 3.0 subset openapi.json uses); a few paths get
    narrower values so that what runs stays harmless and collides often enough to matter."""
    schema = resolve(schema)
    if schema.get("type") == "object" and "anyOf" in schema:  # alternatives of required fields
        base = {k: v for k, v in schema.items() if k != "anyOf"}
        return st.one_of(*[from_schema({**base, "required": [*base.get("required", []), *alt["required"]]},
                                       path, nonnull) for alt in schema["anyOf"]])
    if path in OVERRIDES:
        inner = OVERRIDES[path]
    elif "oneOf" in schema:
        inner = st.one_of(*[from_schema(s, path) for s in schema["oneOf"]])
    elif "enum" in schema:
        inner = st.sampled_from(schema["enum"])
    else:
        kind = schema.get("type")
        if kind == "string":
            longest = int(schema.get("maxLength", 10**6))
            if "pattern" in schema:
                shortest = int(schema.get("minLength", 0))
                inner = st.from_regex(schema["pattern"], fullmatch=True).filter(
                    lambda s: shortest <= len(s) <= longest)
            else:
                inner = st.text(min_size=schema.get("minLength", 0), max_size=min(longest, 30))
        elif kind == "integer":
            inner = st.integers(schema.get("minimum", -(2**40)), schema.get("maximum", 2**40))
        elif kind == "number":
            inner = st.floats(schema.get("minimum"), schema.get("maximum"), allow_nan=False,
                              allow_infinity=False, exclude_min=bool(schema.get("exclusiveMinimum")))
        elif kind == "boolean":
            inner = st.booleans()
        elif kind == "array":
            inner = st.lists(from_schema(schema["items"], path + "[]"), min_size=schema.get("minItems", 0),
                             max_size=min(schema.get("maxItems", 4), 4))
        elif kind == "object" and "properties" in schema:
            required = set(schema.get("required", []))
            props = schema["properties"]
            def sub(key: str) -> st.SearchStrategy[Any]:
                return from_schema(props[key], f"{path}.{key}".lstrip("."), key in required)
            inner = st.fixed_dictionaries({k: sub(k) for k in props if k in required},
                                          optional={k: sub(k) for k in props if k not in required})
        elif kind == "object":
            keys = st.from_regex(schema.get("x-key-pattern", r"[a-z]{1,8}"), fullmatch=True).filter(
                lambda s: len(s) <= 40)
            values = from_schema(schema.get("additionalProperties") or {"type": "string"}, path + "{}")
            inner = st.dictionaries(keys, values, max_size=3)
        else:
            inner = JSON
    return st.one_of(st.none(), inner) if schema.get("nullable") and not nonnull else inner


JSON: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=8)

OVERRIDES: dict[str, st.SearchStrategy[Any]] = {
    "name": st.sampled_from(NAMES) | st.from_regex(r"fz-[a-z0-9]{1,6}", fullmatch=True),
    "command": st.sampled_from(SAFE_COMMANDS),
    "image": st.sampled_from(["nginx:latest", "registry.local:5000/app@sha256:" + "0" * 64, "busybox"])
    | st.from_regex(r"[^\s\x00-\x1f\x7f]{1,40}", fullmatch=True),
    "args[]": st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=12),
    "exposed_ports[].host": st.none() | st.integers(*HOST_PORTS),
    "resources.memory": st.sampled_from(["64m", "512m", "1Gi", "1.5g", "0.5m", "100k", "2t"])
    | st.integers(1, 2**60),
}

DEPLOY_SCHEMA = SPEC["paths"]["/containers/deploy"]["post"]["requestBody"]["content"]["application/json"][
    "schema"]
VALID_BODIES = from_schema(DEPLOY_SCHEMA)


@st.composite
def mutated(draw: st.DrawFn) -> Any:
    """A valid body spoiled in one way."""
    body = dict(draw(VALID_BODIES))
    how = draw(st.sampled_from(["unknown_key", "drop", "retype", "retype_nested", "no_runtime"]))
    if how == "unknown_key":
        key = draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in chas_api.DEPLOY_KEYS))
        body[key] = draw(JSON)
    elif how == "drop":
        body.pop("name", None)
    elif how == "retype":
        key = draw(st.sampled_from(chas_api.DEPLOY_KEYS))
        value = draw(JSON)
        if key in ("command", "args") and isinstance(value, list):
            value = {"not": value}  # never a random program: a list of strings would run
        body[key] = value
    elif how == "retype_nested" and body.get("exposed_ports"):
        port = dict(body["exposed_ports"][0])
        port[draw(st.sampled_from(["container", "protocol", "host", "extra"]))] = draw(JSON)
        body["exposed_ports"] = [port, *body["exposed_ports"][1:]]
    else:
        body.pop("image", None)
        body.pop("command", None)
    return body


GARBAGE = st.one_of(st.binary(max_size=64), st.text(max_size=40).map(str.encode),
                    JSON.map(lambda v: json.dumps(v).encode()))
DEPLOY_BODIES = st.one_of(VALID_BODIES, VALID_BODIES, mutated(), GARBAGE)


@st.composite
def other_requests(draw: st.DrawFn) -> tuple[str, str]:
    """(method, path with query) for every route but deploy, plus paths that are no route."""
    ident = draw(st.sampled_from(NAMES) | st.text(min_size=1, max_size=20) | st.from_regex(r"[0-9a-f]{32}",
                                                                                         fullmatch=True))
    pid = quote(ident, safe="")
    values = st.sampled_from(["", "0", "1", "-1", "10", "false", "true", "yes", "abc", "fz-a"])
    params = draw(st.dictionaries(st.sampled_from(["tail", "follow", "container", "x", "since"]),
                                  values | st.text(max_size=6), max_size=3))
    assume(str(params.get("follow", "")).lower() not in ("true", "1", "yes"))  # a stream would not end
    query = urlencode(params)
    route = draw(st.sampled_from(["logs", "item", "list", "health", "openapi", "random"]))
    path = {"logs": f"/containers/{pid}/logs", "item": f"/containers/{pid}", "list": "/containers",
            "health": "/health", "openapi": "/openapi.json",
            "random": "/" + quote(draw(st.text(max_size=20)), safe="/")}[route]
    method = draw(st.sampled_from(["GET", "GET", "DELETE", "POST", "PUT", "PATCH", "OPTIONS", "FOO"]))
    return method, f"{path}?{query}" if query else path


# -- checks ---------------------------------------------------------------------------------------

def conforms(schema: dict[str, Any], value: Any, where: str = "$") -> None:
    """A small structural check of an answer against its response schema."""
    schema = resolve(schema)
    if value is None:
        assert schema.get("nullable"), f"{where}: null"
        return
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    kind = schema.get("type")
    types = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list,
             "object": dict}
    if kind:
        numeric = kind in ("integer", "number")
        assert isinstance(value, types[kind]) and not (numeric and isinstance(value, bool)), \
            f"{where}: {value!r} is not {kind}"
    if kind == "object":
        for key in schema.get("required", []):
            assert key in value, f"{where}: {key} missing"
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                conforms(sub, value[key], f"{where}.{key}")
    if kind == "array":
        for i, item in enumerate(value):
            conforms(schema["items"], item, f"{where}[{i}]")


def response_schema(path: str, method: str, status: int) -> dict[str, Any] | None:
    route = next((t for t in SPEC["paths"] if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", t), path)), None)
    op = SPEC["paths"].get(route or "", {}).get(method.lower())
    if op is None:
        return None
    answer = op["responses"].get(str(status))
    assert answer is not None, f"{method} {path} answered {status}, which the document does not list"
    answer = resolve(answer) if "$ref" in answer else answer
    content = answer.get("content", {}).get("application/json")
    return content["schema"] if content else None


def snapshot(agent: Agent) -> dict[str, tuple[Any, ...]]:
    status, _, body = agent.chas_request("GET", "/containers")
    assert status == 200, body
    return {c["id"]: (c["name"], c["image"], json.dumps(c["ports"]), c["status"] == "terminating")
            for c in body["containers"]}


def assert_unchanged(before: dict[str, tuple[Any, ...]], after: dict[str, tuple[Any, ...]]) -> None:
    # Pods deleted earlier may leave meanwhile; nothing may appear, change or start to go.
    assert set(after) <= set(before), f"new containers: {set(after) - set(before)}"
    for cid, now in after.items():
        was = before[cid]
        assert now[:3] == was[:3], f"{cid} changed: {was} -> {now}"
        assert now[3] <= was[3], f"{cid} started terminating"


def check_answer(method: str, path: str, status: int, headers: dict[str, str], body: Any) -> None:
    assert status < 500, f"{method} {path} -> {status}: {body!r}"
    if status >= 300:
        if method == "HEAD":
            return
        assert headers.get("content-type") == "application/json", headers
        assert isinstance(body, dict) and set(body) == {"error"}, body
        err = body["error"]
        assert set(err) <= {"code", "message", "field"} and {"code", "message"} <= set(err), err
        assert isinstance(err["code"], str) and isinstance(err["message"], str)
        assert err["code"] in SPEC["components"]["schemas"]["Error"]["properties"]["error"]["properties"][
            "code"]["enum"]
        if status == 405:
            assert headers.get("allow")
        return
    schema = response_schema(path.split("?")[0], method, status)
    if schema is not None:
        conforms(schema, body)


# -- the runs -------------------------------------------------------------------------------------

@SETTINGS
@given(body=DEPLOY_BODIES)
def test_fuzz_deploy(agent: Agent, body: Any) -> None:
    before = snapshot(agent)
    status, headers, answer = agent.chas_request("POST", "/containers/deploy", body)
    event(f"deploy {status}")
    check_answer("POST", "/containers/deploy", status, headers, answer)
    if status >= 300:
        assert_unchanged(before, snapshot(agent))
        return
    assert status in (200, 201)
    assert answer["name"] == body["name"]
    if status == 200:
        assert answer["id"] in before
    else:
        assert answer["id"] not in before and headers["location"] == f"/containers/{answer['id']}"
        asked = body.get("exposed_ports") or []
        assert len(answer["ports"]) == len(asked)
        for want, got in zip(asked, answer["ports"], strict=True):
            assert got["container"] == want["container"]
            assert got["host"] == want.get("host") or (want.get("host") is None
                                                       and HOST_PORTS[0] <= got["host"] <= HOST_PORTS[1])
    if status == 201:  # the same request again, written otherwise: the same container
        again = agent.chas_request("POST", "/containers/deploy",
                                   json.dumps(body, sort_keys=True, indent=1).encode())
        assert again[0] == 200 and again[2]["id"] == answer["id"], again
    if status == 201 and len(before) >= 8:  # keep the node small: delete what was just made
        deleted = agent.chas_request("DELETE", f"/containers/{answer['id']}")
        assert deleted[0] == 200, deleted


@settings(SETTINGS, max_examples=max(10, EXAMPLES * 2 // 3))
@given(request=other_requests())
def test_fuzz_other_routes(agent: Agent, request: tuple[str, str]) -> None:
    method, path = request
    before = snapshot(agent)
    status, headers, answer = agent.chas_request(method, path)
    event(f"{method if method in ('GET', 'DELETE') else 'other'} {status}")
    check_answer(method, path, status, headers, answer)
    if status >= 300:
        assert_unchanged(before, snapshot(agent))


def test_fuzz_left_a_working_node(agent: Agent) -> None:
    status, _, health = agent.chas_request("GET", "/health")
    assert status == 200 and health["status"] == "healthy", health
    assert agent.statuses() == {s: "RUNNING" for s in ("memory", "manager", "monitor", "proxy")}
