"""`riklet run` defaults: state under ./.riklet in the checkout, unless the environment says."""

from __future__ import annotations

import os

from services.launcher import ROOT, defaults


def test_defaults_live_in_the_checkout() -> None:
    env = defaults({"PATH": "/usr/bin"})
    assert env["RIKLET_RUN_DIR"] == os.path.join(ROOT, ".riklet", "run")
    assert env["RIKLET_STATE_DIR"] == os.path.join(ROOT, ".riklet", "state")
    assert env["RIKLET_CONFIG"] == ""
    assert os.path.exists(os.path.join(ROOT, "supervisord.conf"))
    assert env["PATH"].endswith(":/usr/bin")


def test_environment_wins_over_defaults() -> None:
    given = {"RIKLET_RUN_DIR": "/tmp/x", "RIKLET_STATE_DIR": "/tmp/y", "RIKLET_CONFIG": "/c.yaml"}
    env = defaults(given)
    assert {k: env[k] for k in given} == given
