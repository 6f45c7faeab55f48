"""The Exec stream's boundary, without an agent: what a first input must say, and the node's cap
on execs running at once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from common.errors import InvalidArgument, NotFound, TooLarge
from common.pb import node_pb2 as pb
from services.manager.api.execstream import MAX_CHUNK, Execs, parse_start, pick_container


def start(**fields: Any) -> pb.ExecInput:
    return pb.ExecInput(start=pb.ExecStart(**{"pod": "web", "command": ["sh"], **fields}))


def test_a_good_start() -> None:
    req = parse_start(start(container="app", tty=True, stdin=True, window=pb.WindowSize(cols=120, rows=40)))
    assert (req.pod, req.container, req.command, req.tty, req.stdin, req.window) == \
        ("web", "app", ("sh",), True, True, (120, 40))
    assert parse_start(start(tty=True)).window == (80, 24)


@pytest.mark.parametrize(("message", "field"), [
    (None, "start"),
    (pb.ExecInput(stdin=b"x"), "start"),
    (pb.ExecInput(start=pb.ExecStart(pod="web", command=["sh"]), stdin=b"x"), "start"),
    (start(pod="Web"), "pod"),
    (start(pod=""), "pod"),
    (start(container="a_b"), "container"),
    (start(command=[]), "command"),
    (start(command=[""]), "command"),
    (start(command=["sh", "a\0b"]), "command[1]"),
    (start(command=["x"] * 2000), "command"),
    (start(command=["x" * (MAX_CHUNK * 3)]), "command"),
    (start(tty=True, window=pb.WindowSize(cols=100_000, rows=1)), "window"),
])
def test_bad_starts_name_the_field(message: pb.ExecInput | None, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_start(message)
    assert err.value.field == field


def test_containers_are_picked_by_name() -> None:
    one = {"name": "web", "spec": {"containers": [{"name": "app"}]}}
    two = {"name": "web", "spec": {"containers": [{"name": "app"}, {"name": "side"}]}}
    assert pick_container(one, "")["name"] == "app"
    assert pick_container(two, "side")["name"] == "side"
    with pytest.raises(InvalidArgument, match="app, side"):
        pick_container(two, "")
    with pytest.raises(NotFound, match="'nope'"):
        pick_container(two, "nope")


class Context:
    """What Exec asks of a gRPC call: to hear when it ends."""

    def add_callback(self, callback: Any) -> bool:
        return True


class SlowMemory:
    """A memory whose get waits until let go, then knows no pod."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.go = threading.Event()

    def get(self, name: str) -> dict[str, Any]:
        self.entered.set()
        self.go.wait(10)
        raise NotFound(f"no pod {name}", "name")


def test_the_node_caps_execs_running_at_once() -> None:
    memory = SlowMemory()
    execs = Execs(memory, None, None, max_execs=1)
    errors: list[Exception] = []

    def first() -> None:
        try:
            next(execs.stream(iter([start()]), Context()))  # type: ignore[arg-type]
        except NotFound as exc:
            errors.append(exc)

    t = threading.Thread(target=first)
    t.start()
    assert memory.entered.wait(10)
    second: Iterator[pb.ExecOutput] = execs.stream(iter([start()]), Context())  # type: ignore[arg-type]
    with pytest.raises(TooLarge, match="limit 1"):
        next(second)
    memory.go.set()
    t.join(10)
    assert errors and errors[0].field == "pod"   # the unknown pod is named as the exec's pod
    with pytest.raises(NotFound):               # and its slot is free again
        next(execs.stream(iter([start()]), Context()))  # type: ignore[arg-type]
