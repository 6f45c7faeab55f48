from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.stack import Agent


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def agent(request: pytest.FixtureRequest) -> Iterator[Agent]:
    a = Agent().start()
    try:
        yield a
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            a.dump_logs()
        a.close()
