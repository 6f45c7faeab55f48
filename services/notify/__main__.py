"""``riklet-notify`` / ``python -m services.notify``: supervisord's fifth program, which tells
systemd how the agent is (services.notify.loop).

Without ``$NOTIFY_SOCKET`` (``riklet run`` by hand, a test, a unit not of Type=notify) it exits
0 before importing anything heavy: supervisord shows it EXITED and nothing else is spent.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from common.sdnotify import address


def main(argv: Sequence[str] | None = None) -> int:
    if address(os.environ) is None:
        return 0
    from services.notify.loop import run  # here: only where there is someone to tell

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
