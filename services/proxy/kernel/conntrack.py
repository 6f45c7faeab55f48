"""Conntrack hygiene and counts for the kernel data path, through Debian's ``conntrack`` tool.

A NAT decision lives in the flow's conntrack entry: a UDP flow that keeps sending keeps its
entry alive, and with it the old endpoint, forever. When an endpoint leaves a host port its
entries for that port are deleted (UDP always; TCP too when the endpoint is gone, not merely
unhealthy), so the next packet is NATed afresh to a ready endpoint.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from services.proxy.routes import Endpoint, RouteKey

log = logging.getLogger(__name__)

TIMEOUT = 10.0
MAX_LISTED = 1_000_000      # entries parsed at most per count (the table's own limit is similar)


@dataclass(frozen=True)
class Stale:
    """Entries of flows that arrived on ``key``'s host port and were NATed to ``endpoint``."""

    key: RouteKey
    endpoint: Endpoint


def binary() -> str | None:
    return shutil.which("conntrack") or shutil.which("conntrack", path="/usr/sbin:/sbin")


def delete(stale: Iterable[Stale]) -> int:
    """Delete the entries; returns how many went. A missing tool is logged once per call."""
    path = binary()
    items = list(stale)
    if not items:
        return 0
    if path is None:
        log.warning("conntrack is not installed: flows may stick to removed endpoints",
                    extra={"endpoints": len(items)})
        return 0
    gone = 0
    for s in items:
        args = [path, "-D", "-p", s.key[0].lower(), "--orig-port-dst", str(s.key[1]),
                "--reply-src", s.endpoint.address, "--reply-port-src", str(s.endpoint.port)]
        try:
            res = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("conntrack -D failed", extra={"error": str(exc)})
            continue
        gone += _deleted(res.stderr)
    return gone


def _deleted(stderr: str) -> int:
    # "conntrack v1.4.7 (conntrack-tools): 3 flow entries have been deleted."
    for part in stderr.split(":")[-1:]:
        words = part.split()
        if words and words[0].isdigit():
            return int(words[0])
    return 0


def counts(ports: Iterable[RouteKey]) -> dict[RouteKey, int]:
    """Conntrack entries NATed by a destination rule, per (protocol, original destination
    port), for ``ports`` only. Empty when the tool is missing or fails."""
    wanted = set(ports)
    path = binary()
    if path is None or not wanted:
        return {}
    try:
        res = subprocess.run([path, "-L", "--dst-nat"], capture_output=True, text=True, timeout=TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("conntrack -L failed", extra={"error": str(exc)})
        return {}
    found: Counter[RouteKey] = Counter()
    for n, line in enumerate(res.stdout.splitlines()):
        if n >= MAX_LISTED:
            break
        key = _key(line)
        if key in wanted:
            found[key] += 1
    return dict(found)


def _key(line: str) -> RouteKey | None:
    """(PROTOCOL, original dport) of one ``conntrack -L`` line."""
    words = line.split()
    if not words:
        return None
    for w in words:
        if w.startswith("dport="):
            port = w[len("dport="):]
            return (words[0].upper(), int(port)) if port.isdigit() else None
    return None
