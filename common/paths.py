"""Where riklet keeps its sockets and state when nothing says otherwise.

One place for these defaults: the configuration, the launcher and ``rikletctl`` all ask here.

Two layouts:

- a checkout (``make install``: an editable install, the code imported from the working tree):
  everything under ``./.riklet`` (``make run`` and the tests as they have always been);
- an installed wheel (``pip install riklet-*.whl``): the system's directories, ``/run/riklet``
  and ``/var/lib/riklet``.

How they are told apart: the wheel's build hook (setup.py) writes the marker file
``common/INSTALLED`` into the package it builds, and nothing else ever does. A checkout never
has it (it is ignored by git and never generated in place), whatever the current directory or
the way the code is run; an installed wheel always has it. ``pip install .`` from a checkout
builds a wheel, so it counts as installed, as it should.
"""

from __future__ import annotations

import os

MARKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "INSTALLED")


def installed() -> bool:
    """Whether this code runs from an installed wheel rather than a checkout."""
    return os.path.exists(MARKER)


def default_run_dir() -> str:
    """IPC sockets and pid files."""
    return "/run/riklet" if installed() else "./.riklet/run"


def default_state_dir() -> str:
    """The durable state: SQLite, logs, the API token."""
    return "/var/lib/riklet" if installed() else "./.riklet/state"
