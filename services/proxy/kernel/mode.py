"""Which data path the proxy uses: ``proxy.mode`` kernel, userspace, or auto (kernel where nftables
works and the proxy holds CAP_NET_ADMIN, else userspace, saying why)."""

from __future__ import annotations

import logging

from services.proxy.kernel import nft

log = logging.getLogger(__name__)

MODES = ("auto", "kernel", "userspace")


def choose(wanted: str) -> tuple[str, str]:
    """(the mode to run, why). ``kernel`` asked for where it cannot work falls back to user
    space with an error logged: forwarding somehow beats forwarding nothing."""
    if wanted == "userspace":
        return "userspace", "proxy.mode is userspace"
    why = nft.unavailable()
    if wanted == "kernel":
        if why is not None:
            log.error("proxy.mode is kernel but the kernel path is unavailable: forwarding in "
                      "user space", extra={"reason": why})
            return "userspace", f"kernel asked for, but {why}"
        return "kernel", "proxy.mode is kernel"
    if why is not None:
        log.warning("kernel data path unavailable: forwarding in user space", extra={"reason": why})
        return "userspace", f"auto: {why}"
    return "kernel", "auto: nftables works and the proxy has CAP_NET_ADMIN"
