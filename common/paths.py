"""Where riklet keeps its sockets and state when nothing says otherwise.

One place for these defaults: the configuration, the launcher and ``rikletctl`` all ask here.
"""

from __future__ import annotations


def default_run_dir() -> str:
    """IPC sockets and pid files."""
    return "./.riklet/run"


def default_state_dir() -> str:
    """The durable state: SQLite, logs, the API token."""
    return "./.riklet/state"
