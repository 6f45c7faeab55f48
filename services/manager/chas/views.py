"""What ``GET /containers`` (filtered, paged) and ``GET /containers/{id}`` (inspect) answer, as
pure functions of pod records."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from common.errors import InvalidArgument
from common.pod import ready_of
from services.manager.chas.deploy import STATUSES, container_summary

LIST_PARAMS = ("status", "name", "name_prefix", "limit", "continue")
MAX_LIMIT = 1000
_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")
_PREFIX = re.compile(r"[a-z0-9][a-z0-9.-]{0,252}")


@dataclass(frozen=True)
class ListOptions:
    statuses: frozenset[str] = frozenset()
    name: str | None = None
    prefix: str | None = None
    limit: int | None = None
    after: str | None = None       # the last name of the previous page


def list_options(params: Mapping[str, str]) -> ListOptions:
    statuses: frozenset[str] = frozenset()
    if "status" in params:
        statuses = frozenset(s for s in params["status"].split(",") if s)
        known = {*STATUSES.values(), "terminating"}
        if not statuses or not statuses <= known:
            raise InvalidArgument(f"expected statuses among {', '.join(sorted(known))}, comma-separated",
                                  "query.status")
    name = params.get("name")
    if name is not None and not _NAME.fullmatch(name):
        raise InvalidArgument("expected a container name", "query.name")
    prefix = params.get("name_prefix")
    if prefix is not None and not _PREFIX.fullmatch(prefix):
        raise InvalidArgument("expected the beginning of a container name", "query.name_prefix")
    limit = None
    if "limit" in params:
        raw = params["limit"]
        if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw[:5]) <= MAX_LIMIT or len(raw) > 4:
            raise InvalidArgument(f"expected an integer from 1 to {MAX_LIMIT}", "query.limit")
        limit = int(raw)
    after = None
    if "continue" in params:
        after = decode_token(params["continue"])
        if limit is None:
            raise InvalidArgument("continue goes with the limit of the first page", "query.continue")
    return ListOptions(statuses, name, prefix, limit, after)


def encode_token(name: str) -> str:
    return base64.urlsafe_b64encode(b"n:" + name.encode()).decode().rstrip("=")


def decode_token(token: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    if len(token) > 400 or not raw.startswith("n:") or not _NAME.fullmatch(raw[2:]):
        raise InvalidArgument("not a continue token of this API (take it from the last page)",
                              "query.continue")
    return raw[2:]


def list_page(records: Iterable[Mapping[str, Any]], options: ListOptions) -> dict[str, Any]:
    """The seed's ``{"containers": [...]}`` by name; with ``limit``, one page of it and
    ``continue``: the token of the next page (null on the last). A page starts after the last
    name of the previous one, so pods created or deleted meanwhile shift nothing."""
    chosen = []
    for record in sorted(records, key=lambda r: str(r.get("name", ""))):
        name = str(record.get("name", ""))
        if options.after is not None and name <= options.after:
            continue
        if options.name is not None and name != options.name:
            continue
        if options.prefix is not None and not name.startswith(options.prefix):
            continue
        summary = container_summary(record)
        if options.statuses and summary["status"] not in options.statuses:
            continue
        chosen.append(summary)
        if options.limit is not None and len(chosen) > options.limit:
            break
    if options.limit is None:
        return {"containers": chosen}
    more = len(chosen) > options.limit
    page = chosen[:options.limit]
    return {"containers": page, "continue": encode_token(page[-1]["name"]) if more else None}


def rfc3339(seconds: Any) -> str | None:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds <= 0:
        return None
    return datetime.fromtimestamp(float(seconds), UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def inspect(record: Mapping[str, Any]) -> dict[str, Any]:
    """The summary plus what the node knows of the container."""
    spec = {k: v for k, v in (record.get("spec") or {}).items() if k != "chas"}
    status = record.get("status") or {}
    containers = []
    for c in status.get("containers") or []:
        if isinstance(c, Mapping):
            containers.append({
                "name": c.get("name"), "state": c.get("state"), "ready": bool(c.get("ready")),
                "started": c.get("started"), "restarts": int(c.get("restartCount") or 0),
                "exit_code": c.get("exitCode"), "reason": c.get("reason") or None,
                "started_at": rfc3339(c.get("startedAt")), "finished_at": rfc3339(c.get("finishedAt"))})
    return {
        **container_summary(record),
        "desired": record.get("desired"),
        "phase": status.get("phase"),
        "ready": ready_of(record),
        "restarts": int(status.get("restartCount") or 0),
        "exit_code": status.get("exitCode"),
        "ip": status.get("internalIp") or None,
        "created_at": rfc3339(record.get("created_at")),
        "started_at": rfc3339(status.get("startedAt")),
        "containers": containers,
        "spec": spec,
    }
