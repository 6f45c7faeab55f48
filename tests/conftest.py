from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.stack import Agent


def need(condition: bool, reason: str) -> None:
    """Skip when a system dependency is missing, except in CI where that is a failure."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI needs this: {reason}")
    pytest.skip(reason)


@pytest.fixture
def agent() -> Iterator[Agent]:
    a = Agent().start()
    try:
        yield a
    finally:
        a.close()
