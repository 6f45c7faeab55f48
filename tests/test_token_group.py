"""Sharing the API token with a group (common.auth): the file 0640 to the group, its directory
searchable by the group only, bits only ever added. The whole path, with a real agent and a
non-root rikletctl, is in test_wheel.py."""

from __future__ import annotations

import grp
import os
import stat
from pathlib import Path

import pytest

from common import auth
from tests.support import need

GROUP = "nogroup"  # any existing group: the test makes none


@pytest.fixture
def gid(monkeypatch: pytest.MonkeyPatch) -> int:
    need(os.geteuid() == 0, "root (files handed to another group)")
    try:
        found = grp.getgrnam(GROUP).gr_gid
    except KeyError:
        pytest.skip(f"no group {GROUP}")
    monkeypatch.setenv(auth.GROUP_ENV, GROUP)
    return found


def _mode(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return stat.S_IMODE(st.st_mode), st.st_gid


def test_a_new_token_is_shared_with_the_group_and_its_directory_searchable(tmp_path: Path, gid: int) -> None:
    token = tmp_path / "state" / "api-token"
    auth.load_or_create_token(str(token))
    assert _mode(token) == (0o640, gid)
    assert _mode(token.parent) == (0o710, gid)


def test_a_token_made_before_the_group_is_shared_at_the_next_start(tmp_path: Path, gid: int,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(auth.GROUP_ENV, "")              # sharing off: as without the group
    token = tmp_path / "state" / "api-token"
    first = auth.load_or_create_token(str(token))
    assert _mode(token)[0] == 0o600 and _mode(token.parent)[0] == 0o700
    monkeypatch.setenv(auth.GROUP_ENV, GROUP)
    assert auth.load_or_create_token(str(token)) == first
    assert _mode(token) == (0o640, gid)


def test_a_directory_others_may_search_is_left_alone(tmp_path: Path, gid: int) -> None:
    shared = tmp_path / "etc"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    before = _mode(shared)
    auth.open_to_group(str(shared))
    assert _mode(shared) == before
