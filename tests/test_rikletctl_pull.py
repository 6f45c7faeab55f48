"""``rikletctl image pull`` shows each download and a total, from the agent's PullProgress
layers: a bar on a terminal, plain lines in a pipe (the private registry of tests/ctrenv.py)."""

from __future__ import annotations

import os
import pty
import re
import subprocess
from typing import Any

import pytest

from tests.stack import BIN
from tests.test_containerd import CtrAgent

pytestmark = pytest.mark.integration


def test_pull_shows_layers_bytes_and_a_total(containerd_env: Any, busybox_archive: Any,
                                            registry: Any) -> None:
    a = CtrAgent(containerd_env, busybox_archive, insecure=registry.address)
    try:
        a.start()
        ref = f"{registry.address}/busybox:latest"
        piped = a.agent.ctl("image", "pull", ref)
        assert piped.stdout.strip() == ref
        layers = [line for line in piped.stderr.splitlines() if line.startswith("layer-sha256:")]
        assert layers and all(line.split()[1] == "done" for line in layers), piped.stderr
        size = layers[0].split()[2]                      # "0.5" of "0.5 MiB/0.5 MiB"
        assert f"{size} MiB/{size} MiB" in layers[0] and "\x1b[" not in piped.stderr
        assert re.search(rf"^{re.escape(ref)}: [0-9.]+ MiB in [0-9.]+ s$", piped.stderr, re.M), piped.stderr

        # on a terminal: the frame, a bar per download and the total line
        a.agent.ctl("image", "rm", ref)
        main, term = pty.openpty()
        try:
            try:
                res = subprocess.run([os.path.join(BIN, "rikletctl"), "image", "pull", ref],
                                     env=a.agent.env, stdout=subprocess.PIPE, stderr=term, text=True,
                                     timeout=120)
            finally:
                os.close(term)
            shown = b""
            while True:
                try:
                    chunk = os.read(main, 65536)
                except OSError:    # the terminal's other end is closed: all was read
                    break
                if not chunk:
                    break
                shown += chunk
        finally:
            os.close(main)
        assert res.returncode == 0 and res.stdout.strip() == ref
        text = shown.decode()
        assert "layer-sha256:" in text and "|++++" in text, text
        assert re.search(rf"{re.escape(ref)}: elapsed [0-9.]+ s, total [0-9.]+ MiB/[0-9.]+ MiB", text), text
    finally:
        a.close()
