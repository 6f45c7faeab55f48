"""How a containerd task's run ended and what follows, as pure rules: runc's exit status
classified (signals, OOM kills), the restart policy, and a start failure's Kubernetes-style
reason (ErrImagePull...)."""

from __future__ import annotations

import signal
from typing import Any

from common.errors import RikletError, Unavailable


def classify(exit_status: int, oom_killed: bool) -> dict[str, Any]:
    """How a task ended: runc reports a signal death as 128 + the signal's number."""
    if 128 < exit_status <= 128 + 64:
        number = exit_status - 128
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"SIG{number}"
        if number == signal.SIGKILL and oom_killed:
            return {"exitCode": exit_status, "signal": name, "reason": "OOMKilled",
                    "message": "killed for exceeding its memory limit"}
        return {"exitCode": exit_status, "signal": name, "reason": "Signaled",
                "message": f"killed by {name}"}
    return {"exitCode": exit_status, "signal": None,
            "reason": "Completed" if exit_status == 0 else "Error", "message": None}


def should_restart(policy: str, end: dict[str, Any]) -> bool:
    if policy == "OnFailure":
        return (end.get("exitCode") or 0) != 0 or end.get("reason") not in (None, "Completed")
    return policy == "Always"


class StartFailure(RikletError):
    """A container could not start, with a Kubernetes-style reason (ErrImagePull...)."""

    code = Unavailable.code

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, "image")
        self.reason = reason
