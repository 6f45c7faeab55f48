"""The IPC envelope: round trips, and garbage that is refused naming the frame or field."""

from __future__ import annotations

import json

import pytest

from common import ipc
from common.errors import BadFrame, NotFound, RikletError
from common.zmqutil import serve_request


def test_request_reply_and_event_round_trip() -> None:
    req = ipc.Request(op="pod.get", args={"name": "web"})
    assert ipc.decode_request(ipc.encode_request(req)) == req
    rep = ipc.error(req.id, NotFound("no pod web", "args.name"))
    back = ipc.decode_reply(ipc.encode_reply(rep))
    with pytest.raises(NotFound) as err:
        back.raise_for_error()
    assert err.value.field == "args.name"
    ev = ipc.Event(topic="pod.web.status", seq=7, data={"kind": "status"})
    assert ipc.decode_event(ipc.encode_event(ev)) == ev


@pytest.mark.parametrize(("frames", "field"), [
    ([b"only-one"], "frames"),
    ([b"wrong", b"{}"], "frames[0]"),
    ([ipc.MAGIC, b"not json"], "body"),
    ([ipc.MAGIC, b"[1]"], "body"),
    ([ipc.MAGIC, b'{"v": 99, "id": "x", "op": "a"}'], "body.v"),
    ([ipc.MAGIC, b'{"v": 1, "id": "", "op": "a"}'], "body.id"),
    ([ipc.MAGIC, b'{"v": 1, "id": "x", "op": 5}'], "body.op"),
    ([ipc.MAGIC, b'{"v": 1, "id": "x", "op": "a", "args": []}'], "body.args"),
    ([ipc.MAGIC, b"\xff\xfe"], "body"),
    # JSON true and 1.0 equal 1 in Python; the schema version is the integer 1 only
    ([ipc.MAGIC, b'{"v": true, "id": "x", "op": "a"}'], "body.v"),
    ([ipc.MAGIC, b'{"v": 1.0, "id": "x", "op": "a"}'], "body.v"),
    ([ipc.MAGIC, b'{"v": "1", "id": "x", "op": "a"}'], "body.v"),
])
def test_garbage_requests_are_refused_by_field(frames: list[bytes], field: str) -> None:
    with pytest.raises(BadFrame) as err:
        ipc.decode_request(frames)
    assert err.value.field == field
    # and a server answers them with an error instead of failing
    rep = ipc.decode_reply(serve_request(lambda r: None, frames))
    assert not rep.ok and rep.error is not None and rep.error["code"] == "bad_frame"
    assert rep.error["field"] == field


def test_handler_bug_becomes_internal_error_not_a_crash() -> None:
    def broken(req: ipc.Request) -> None:
        raise KeyError("oops")

    frames = ipc.encode_request(ipc.Request(op="x"))
    rep = ipc.decode_reply(serve_request(broken, frames))
    assert not rep.ok
    with pytest.raises(RikletError, match="KeyError"):
        rep.raise_for_error()


def test_oversized_frame_is_refused() -> None:
    big = json.dumps({"v": 1, "id": "x", "op": "a", "args": {"s": "x" * ipc.MAX_FRAME_BYTES}}).encode()
    with pytest.raises(BadFrame, match="larger"):
        ipc.decode_request([ipc.MAGIC, big])


@pytest.mark.parametrize("seq", ["true", "1.0", "-1", '"1"'])
def test_an_event_seq_is_a_non_negative_integer_not_a_boolean(seq: str) -> None:
    with pytest.raises(BadFrame) as err:
        ipc.decode_event([b"pod.web.status", f'{{"v": 1, "seq": {seq}, "data": {{}}}}'.encode()])
    assert err.value.field == "body.seq"


@pytest.mark.parametrize("version", ["true", "1.0"])
def test_replies_and_events_with_a_boolean_version_are_refused(version: str) -> None:
    with pytest.raises(BadFrame) as err:
        ipc.decode_reply([ipc.MAGIC, f'{{"v": {version}, "id": "x", "ok": true}}'.encode()])
    assert err.value.field == "body.v"
    with pytest.raises(BadFrame) as err:
        ipc.decode_event([b"hb", f'{{"v": {version}, "seq": 1, "data": {{}}}}'.encode()])
    assert err.value.field == "body.v"


def test_a_bad_version_error_quotes_a_short_excerpt_only() -> None:
    huge = json.dumps({"v": "9" * 100_000, "id": "x", "op": "a"}).encode()
    with pytest.raises(BadFrame) as err:
        ipc.decode_request([ipc.MAGIC, huge])
    assert err.value.field == "body.v" and len(err.value.message) < 200
