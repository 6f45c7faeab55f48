"""systemd's notification protocol (sd_notify(3)) without libsystemd.

A message is one datagram of ``KEY=VALUE`` lines sent to the AF_UNIX socket named by
``$NOTIFY_SOCKET``: a path, or an abstract name written with a leading ``@``. Without that
variable (not started by a ``Type=notify`` unit) a :class:`Notifier` holds no socket and every
call returns at once.

The watchdog: ``$WATCHDOG_USEC`` is the unit's ``WatchdogSec=``; a service pings (``WATCHDOG=1``)
at half that. systemd sets ``$WATCHDOG_PID`` to the unit's main process; riklet's main process is
supervisord and the pings come from a program under it (NotifyAccess=all), so the watchdog also
counts as ours when ``$WATCHDOG_PID`` names our supervisord.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Collection, Mapping

log = logging.getLogger(__name__)

SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"
ENV = (SOCKET_ENV, WATCHDOG_USEC_ENV, WATCHDOG_PID_ENV)   # all that systemd hands a notifying service


def address(environ: Mapping[str, str]) -> str | None:
    """The socket address ``$NOTIFY_SOCKET`` names (abstract names start with NUL), or None."""
    name = environ.get(SOCKET_ENV, "")
    if name.startswith("@"):
        return "\0" + name[1:]
    if name.startswith("/"):
        return name
    return None  # unset, or a kind this module does not speak (vsock:)


def watchdog_interval(environ: Mapping[str, str], pids: Collection[int] = ()) -> float | None:
    """Seconds between two pings (half of ``$WATCHDOG_USEC``), or None: no watchdog for us.
    ``pids``: the processes whose watchdog we keep (our own pid always counts)."""
    usec = environ.get(WATCHDOG_USEC_ENV, "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = environ.get(WATCHDOG_PID_ENV, "")
    if owner and (not owner.isdigit() or int(owner) not in {os.getpid(), *pids}):
        return None
    return int(usec) / 2e6


class Notifier:
    """Sends notifications to systemd; a no-op without ``$NOTIFY_SOCKET``."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.address = address(os.environ if environ is None else environ)
        self._sock: socket.socket | None = None
        self._failing = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send one message (``notify(READY=1, STATUS="...")``); False when it did not go.
        A value must not contain a newline: it would start another field."""
        if self.address is None:
            return False
        if any("\n" in str(value) for value in fields.values()):
            raise ValueError("a notification value holds a newline")
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message.encode(), self.address)
        except OSError as exc:
            # systemd restarting or the unit gone: say so once, keep trying on the next message.
            if not self._failing:
                log.warning("cannot notify systemd", extra={"socket": self.address, "error": str(exc)})
            self._failing = True
            return False
        self._failing = False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
