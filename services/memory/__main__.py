"""``riklet-memory`` / ``python -m services.memory``: run the Runtime Memory service."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence
from types import FrameType

from common import log as logsetup
from common.config import parse_args
from common.errors import Unavailable
from common.parentwatch import watch_parent
from services.memory.server import MemoryServer

log = logging.getLogger("services.memory")


def main(argv: Sequence[str] | None = None) -> int:
    watch_parent("riklet-memory")
    cfg, _ = parse_args("riklet-memory", argv)
    logsetup.configure("memory", cfg)
    try:
        server = MemoryServer(cfg)
    except Unavailable as exc:
        # A live twin: exiting non-zero lets supervisord report it instead of two owners of state.
        log.error("cannot start: %s", exc)
        return 1

    def stop(_signum: int, _frame: FrameType | None) -> None:
        server.request_stop()  # nothing else here: a handler may interrupt any code, even logging

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve()
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
