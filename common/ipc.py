"""The IPC wire format between riklet's services, defined once.

Request and reply travel as two frames ``[MAGIC, json]``; over a ROUTER socket the peer's
identity frame comes first. Events travel on PUB sockets as two frames ``[topic, json]`` with
dotted topics (``pod.<name>.<kind>``) so that subscribers filter by prefix.

Every JSON body carries ``v`` (the schema version). A frame that does not decode raises
:class:`BadFrame` naming the frame and the field at fault. Integer fields are checked strictly:
JSON's ``true`` is not 1 here (Python's ``True == 1`` would let it through), nor is ``1.0``.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from common.errors import BadFrame, RikletError, excerpt

SCHEMA_VERSION = 1
MAGIC = b"riklet.ipc.v1"
MAX_FRAME_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Request:
    op: str
    args: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class Reply:
    id: str
    ok: bool
    result: Any = None
    error: dict[str, Any] | None = None

    def raise_for_error(self) -> Any:
        if not self.ok:
            raise RikletError.from_dict(self.error)
        return self.result


@dataclass(frozen=True)
class Event:
    topic: str
    seq: int
    data: dict[str, Any]


def ok(request_id: str, result: Any = None) -> Reply:
    return Reply(id=request_id, ok=True, result=result)


def error(request_id: str, exc: RikletError) -> Reply:
    return Reply(id=request_id, ok=False, error=exc.to_dict())


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode()


def is_int(value: object) -> TypeGuard[int]:
    """An integer in a frame: ``True`` and ``1.0`` compare equal to 1 in Python, and are not."""
    return type(value) is int


def _loads(frame: bytes, name: str, limit: int | None = MAX_FRAME_BYTES) -> dict[str, Any]:
    if limit is not None and len(frame) > limit:
        raise BadFrame(f"frame larger than {limit} bytes", name)
    try:
        body = json.loads(frame)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadFrame(f"not JSON: {exc}", name) from exc
    except RecursionError as exc:
        raise BadFrame("nested too deeply", name) from exc
    if not isinstance(body, dict):
        raise BadFrame("expected a JSON object", name)
    version = body.get("v")
    if not is_int(version) or version != SCHEMA_VERSION:
        raise BadFrame(f"unsupported schema version {excerpt(version)} (want the integer "
                       f"{SCHEMA_VERSION})", f"{name}.v")
    return body


def _check_magic(frames: list[bytes]) -> None:
    if len(frames) != 2:
        raise BadFrame(f"expected 2 frames [magic, body], got {len(frames)}", "frames")
    if frames[0] != MAGIC:
        raise BadFrame(f"expected magic {MAGIC.decode()!r}", "frames[0]")


def encode_request(req: Request) -> list[bytes]:
    return [MAGIC, _dumps({"v": SCHEMA_VERSION, "id": req.id, "op": req.op, "args": req.args})]


def decode_request(frames: list[bytes]) -> Request:
    """Decode a request; raises BadFrame. Use :func:`request_id_of` to answer a bad one."""
    _check_magic(frames)
    body = _loads(frames[1], "body")
    rid, op, args = body.get("id"), body.get("op"), body.get("args", {})
    if not isinstance(rid, str) or not rid or len(rid) > 128:
        raise BadFrame("must be a non-empty string of at most 128 characters", "body.id")
    if not isinstance(op, str) or not op:
        raise BadFrame("must be a non-empty string", "body.op")
    if not isinstance(args, dict):
        raise BadFrame("must be an object", "body.args")
    return Request(op=op, args=args, id=rid)


def request_id_of(frames: list[bytes]) -> str:
    """Best-effort id of a malformed request, so the error reply can still be matched."""
    if not frames or len(frames[-1]) > MAX_FRAME_BYTES:
        return ""
    try:
        body = json.loads(frames[-1])
        rid = body.get("id") if isinstance(body, dict) else None
        return rid if isinstance(rid, str) and len(rid) <= 128 else ""
    except (ValueError, UnicodeDecodeError, IndexError, RecursionError):
        return ""


def encode_reply(rep: Reply) -> list[bytes]:
    body: dict[str, Any] = {"v": SCHEMA_VERSION, "id": rep.id, "ok": rep.ok}
    if rep.ok:
        body["result"] = rep.result
    else:
        body["error"] = rep.error
    return [MAGIC, _dumps(body)]


def decode_reply(frames: list[bytes]) -> Reply:
    # Replies come from our own servers and may be large (a snapshot): no size cap.
    _check_magic(frames)
    body = _loads(frames[1], "body", limit=None)
    rid, is_ok = body.get("id"), body.get("ok")
    if not isinstance(rid, str):
        raise BadFrame("must be a string", "body.id")
    if not isinstance(is_ok, bool):
        raise BadFrame("must be a boolean", "body.ok")
    err = body.get("error")
    if not is_ok and not isinstance(err, dict):
        raise BadFrame("must be an object when ok is false", "body.error")
    return Reply(id=rid, ok=is_ok, result=body.get("result"), error=err)


def encode_event(ev: Event) -> list[bytes]:
    return [ev.topic.encode(), _dumps({"v": SCHEMA_VERSION, "seq": ev.seq, "data": ev.data})]


def decode_event(frames: list[bytes]) -> Event:
    if len(frames) != 2:
        raise BadFrame(f"expected 2 frames [topic, body], got {len(frames)}", "frames")
    try:
        topic = frames[0].decode()
    except UnicodeDecodeError as exc:
        raise BadFrame("topic is not UTF-8", "frames[0]") from exc
    body = _loads(frames[1], "body", limit=None)
    seq, data = body.get("seq"), body.get("data")
    if not is_int(seq) or seq < 0:
        raise BadFrame("must be a non-negative integer", "body.seq")
    if not isinstance(data, dict):
        raise BadFrame("must be an object", "body.data")
    return Event(topic=topic, seq=seq, data=data)
