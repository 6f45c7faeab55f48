"""riklet-proxy: forwards the node's host ports to pod endpoints, following memory's pods.

Two processes: the keeper (services.proxy.keeper, what supervisord runs: small, starts fast)
and the worker it starts (services.proxy.worker, the data path: ``--worker``). A restarted
worker takes its predecessor's listening sockets over (services.proxy.handoff), so restarting
the proxy loses no connection. Both take the same flags; the keeper passes its own on.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from common import config
from common import log as common_log


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--keeper-pid", type=int, default=None, help=argparse.SUPPRESS)


class _Tag(logging.Filter):
    """Which process of the two wrote a line: both write into the program's one log."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = self.role
        record.pid = os.getpid()
        return True


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    cfg, ns = config.parse_args("riklet-proxy", args, extra=_flags)
    common_log.configure("proxy", cfg)
    tag = _Tag("worker" if ns.worker else "keeper")
    for handler in logging.getLogger().handlers:
        handler.addFilter(tag)
    if ns.worker:
        from services.proxy import worker

        return worker.main(cfg, ns.keeper_pid)
    from common.parentwatch import watch_parent
    from services.proxy import keeper

    watch_parent("riklet-proxy")   # the keeper only: a worker follows its keeper
    return keeper.main(args)


if __name__ == "__main__":
    raise SystemExit(main())
