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


# --- containerd test environment (tests/ctrenv.py); imported lazily so other tests pay nothing ---

@pytest.fixture(scope="session")
def containerd_env() -> Iterator[Any]:
    """A private containerd (tests.ctrenv.PrivateContainerd) for the whole session."""
    from tests import ctrenv
    from tests.support import need

    reason = ctrenv.containerd_missing()
    need(reason is None, reason or "")
    with ctrenv.PrivateContainerd() as env:
        yield env


@pytest.fixture(scope="session")
def busybox_archive(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """tests.ctrenv.TestImage: an OCI archive of busybox-static that imports as its ``ref``."""
    from tests import ctrenv
    from tests.support import need

    reason = ctrenv.busybox_missing()
    need(reason is None, reason or "")
    path = tmp_path_factory.mktemp("oci") / "busybox.oci.tar"
    digest = ctrenv.build_busybox_oci(str(path), ctrenv.DEFAULT_REF)
    return ctrenv.TestImage(str(path), ctrenv.DEFAULT_REF, digest)


@pytest.fixture(scope="session")
def registry(busybox_archive: Any) -> Iterator[Any]:
    """A private registry (tests.ctrenv.Registry) holding the busybox image as busybox:latest:
    pull ``f"{registry.address}/busybox:latest"`` over plain HTTP."""
    from tests import ctrenv
    from tests.support import need

    reason = ctrenv.registry_missing()
    need(reason is None, reason or "")
    with ctrenv.Registry() as reg:
        reg.push_oci_archive(busybox_archive.archive, "busybox:latest")
        yield reg
