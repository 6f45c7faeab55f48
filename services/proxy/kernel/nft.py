"""The ``nft`` command: one JSON transaction at a time, the listing of our table, its counters,
and whether this process can program nftables at all.

Through the binary rather than libnftables' Python binding: Debian ships ``nft`` with the
nftables package, the binding is another package, and a transaction costs ~5 ms either way.
``nft -j -f -`` applies its whole input as one netlink batch: all of it or nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any

from common.errors import Unavailable
from services.proxy.kernel.ruleset import FAMILY, Present

TIMEOUT = 10.0
CAP_NET_ADMIN = 12


class NftError(Unavailable):
    """``nft`` refused a command or could not run."""


def binary() -> str | None:
    return shutil.which("nft") or next((p for p in ("/usr/sbin/nft", "/sbin/nft") if os.path.exists(p)), None)


def run(args: Sequence[str], stdin: str | None = None) -> str:
    path = binary()
    if path is None:
        raise NftError("the nft command is not installed (Debian: apt-get install nftables)", "proxy.mode")
    try:
        res = subprocess.run([path, *args], input=stdin, capture_output=True, text=True, timeout=TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NftError(f"nft {' '.join(args)} failed: {exc}", "proxy.mode") from exc
    if res.returncode != 0:
        raise NftError(f"nft {' '.join(args)}: {res.stderr.strip() or res.returncode}", "proxy.mode")
    return res.stdout


def apply(commands: list[dict[str, Any]]) -> None:
    """Apply ``commands`` as one atomic transaction."""
    run(["-j", "-f", "-"], json.dumps({"nftables": commands}))


def _items(table: str, what: str = "table") -> list[dict[str, Any]] | None:
    try:
        out = run(["-j", "list", what, FAMILY, table]) if what == "table" else \
            run(["-j", "list", "counters", "table", FAMILY, table])
    except NftError as exc:
        if "No such file or directory" in str(exc):
            return None
        raise
    items = json.loads(out).get("nftables", [])
    return [i for i in items if isinstance(i, dict)]


def present(table: str) -> Present | None:
    """The chains and counters our table holds now; None when there is no such table."""
    items = _items(table)
    if items is None:
        return None
    chains = frozenset(i["chain"]["name"] for i in items if "chain" in i)
    counters = frozenset(i["counter"]["name"] for i in items if "counter" in i)
    return Present(chains=chains, counters=counters)


def listing(table: str) -> list[dict[str, Any]] | None:
    """``nft -j list table`` of our table (None: absent)."""
    return _items(table)


def counters(table: str) -> dict[str, tuple[int, int]]:
    """Each named counter of our table: (packets, bytes)."""
    items = _items(table, "counters") or []
    return {i["counter"]["name"]: (int(i["counter"].get("packets", 0)), int(i["counter"].get("bytes", 0)))
            for i in items if "counter" in i}


def delete_table(table: str) -> bool:
    """Delete our table; False if it was not there."""
    try:
        run(["delete", "table", FAMILY, table])
    except NftError as exc:
        if "No such file or directory" in str(exc):
            return False
        raise
    return True


def has_net_admin() -> bool:
    """Whether this process holds CAP_NET_ADMIN in its effective set."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError):
        return False
    return False


def unavailable() -> str | None:
    """Why the kernel path cannot be used here (None: it can): no nft, no CAP_NET_ADMIN, or
    nft cannot create and delete a scratch table (no nf_tables in this kernel)."""
    if binary() is None:
        return "the nft command is not installed"
    if not has_net_admin():
        return "the proxy lacks CAP_NET_ADMIN"
    scratch = f"riklet_probe_{os.getpid()}"
    try:
        apply([{"add": {"table": {"family": FAMILY, "name": scratch}}},
               {"add": {"chain": {"family": FAMILY, "table": scratch, "name": "p", "type": "nat",
                                  "hook": "prerouting", "prio": -100, "policy": "accept"}}}])
        delete_table(scratch)
    except NftError as exc:
        return f"nft cannot program a nat table: {exc}"
    return None
