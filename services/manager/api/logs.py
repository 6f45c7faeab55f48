"""The Node API's ``Logs``: the tail of a container's log, then (``follow``) what comes, with
``since_unix_nano`` and ``timestamps`` (common/rotlog.py, common/logindex.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from common import rotlog
from common.errors import InvalidArgument
from common.pb import node_pb2 as pb

CHUNK = 64 * 1024


def stream(path: str, request: pb.LogsRequest, stop: threading.Event) -> Iterator[bytes]:
    """Checks the request now (errors before the first chunk), then the chunks to send."""
    if request.since_unix_nano < 0:
        raise InvalidArgument("expected nanoseconds since the epoch (0: all lines)", "since_unix_nano")
    since = request.since_unix_nano or None
    stamps = bool(request.timestamps)
    # follow() takes its position when called: before tail(), so nothing falls between.
    new = rotlog.follow(path, stop, since=since, timestamps=stamps) if request.follow else iter(())
    data = rotlog.tail(path, request.tail if request.tail > 0 else None, since, stamps)
    return _chunks(data, new)


def _chunks(data: bytes, new: Iterator[bytes]) -> Iterator[bytes]:
    try:
        for i in range(0, len(data), CHUNK):
            yield data[i:i + CHUNK]
        yield from new
    finally:
        close = getattr(new, "close", None)
        if close is not None:
            close()
