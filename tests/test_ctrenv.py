"""The containerd test environment works: the offline busybox image builds deterministically,
imports under its ref, runs, is pulled back from the private registry, and a private containerd
leaves nothing behind when stopped. These are the prerequisites of the containerd driver tests."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import ctrenv
from tests.support import need

NS = "riklet-envtest"
STOP_NS = "riklet-envtest-stop"


def _need_busybox() -> None:
    reason = ctrenv.busybox_missing()
    need(reason is None, reason or "")


def _members(archive: str) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def _blob(members: dict[str, bytes], digest: str) -> bytes:
    return members[f"blobs/sha256/{digest.removeprefix('sha256:')}"]


@pytest.fixture(scope="module")
def ns(containerd_env: ctrenv.PrivateContainerd) -> Iterator[str]:
    """The test namespace; emptied (tasks, containers, images) and removed at the end."""
    yield NS
    env = containerd_env
    for cid in env.ctr("containers", "ls", "-q", namespace=NS).stdout.split():
        env.ctr("tasks", "kill", "-s", "SIGKILL", cid, namespace=NS)
        env.ctr("tasks", "rm", "-f", cid, namespace=NS)
        env.ctr("containers", "rm", cid, namespace=NS)
    images = env.ctr("images", "ls", "-q", namespace=NS).stdout.split()
    if images:
        env.ctr("images", "rm", "--sync", *images, namespace=NS)
    env.ctr("namespaces", "rm", NS)
    assert NS not in env.ctr("namespaces", "ls", "-q").stdout.split()


def test_build_is_deterministic_and_well_formed(tmp_path: Path) -> None:
    _need_busybox()
    t0 = time.monotonic()
    digest = ctrenv.build_busybox_oci(str(tmp_path / "a.tar"))
    took = time.monotonic() - t0
    assert took < 5, f"build took {took:.2f}s"
    assert digest == ctrenv.build_busybox_oci(str(tmp_path / "b.tar"))
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]

    m = _members(str(tmp_path / "a.tar"))
    assert json.loads(m["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    (desc,) = json.loads(m["index.json"])["manifests"]
    assert desc["digest"] == digest
    assert desc["annotations"][ctrenv.ANNOTATION_CONTAINERD_NAME] == ctrenv.DEFAULT_REF
    assert desc["annotations"][ctrenv.ANNOTATION_REF_NAME] == "latest"
    manifest = json.loads(_blob(m, digest))
    config: dict[str, Any] = json.loads(_blob(m, manifest["config"]["digest"]))
    assert config["os"] == "linux" and config["architecture"] == ctrenv.oci_arch()
    assert config["config"]["Cmd"] == ["sh"]
    assert config["config"]["Env"] == [ctrenv.IMAGE_PATH]
    (layer_desc,) = manifest["layers"]
    layer = gzip.decompress(_blob(m, layer_desc["digest"]))
    assert config["rootfs"]["diff_ids"] == [ctrenv._sha(layer)]

    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        entries = {t.name: t for t in tar.getmembers()}
        passwd = tar.extractfile("etc/passwd").read().decode()  # type: ignore[union-attr]
    assert entries["bin/busybox"].isfile() and entries["bin/busybox"].mode == 0o755
    assert entries["bin/sh"].issym() and entries["bin/sh"].linkname == "busybox"
    assert entries["tmp"].isdir() and entries["tmp"].mode == 0o1777
    for d in ("etc", "proc", "sys", "dev", "root", "var", "run"):
        assert entries[d].isdir(), d
    assert "etc/group" in entries
    assert "nobody:x:65534:65534:" in passwd and passwd.startswith("root:x:0:0:")
    assert list(entries) == sorted(entries)


def test_import_names_the_image_and_it_runs(containerd_env: ctrenv.PrivateContainerd, ns: str,
                                            busybox_archive: ctrenv.TestImage) -> None:
    env = containerd_env
    r = env.ctr("images", "import", busybox_archive.archive, namespace=ns)
    assert r.returncode == 0, r.stderr
    assert env.ctr("images", "ls", "-q", namespace=ns).stdout.split() == [busybox_archive.ref]
    listed = env.ctr("images", "ls", namespace=ns).stdout
    assert busybox_archive.digest in listed

    r = env.ctr("run", "--rm", busybox_archive.ref, "envtest-hello", "sh", "-c", "echo hello",
                namespace=ns, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "hello"
    assert env.ctr("containers", "ls", "-q", namespace=ns).stdout.split() == []


def test_pull_from_the_private_registry(containerd_env: ctrenv.PrivateContainerd, ns: str,
                                        registry: ctrenv.Registry,
                                        busybox_archive: ctrenv.TestImage) -> None:
    ref = f"{registry.address}/busybox:latest"
    r = containerd_env.ctr("images", "pull", "--plain-http", ref, namespace=ns, timeout=60)
    assert r.returncode == 0, r.stderr
    assert ref in containerd_env.ctr("images", "ls", "-q", namespace=ns).stdout.split()
    # skopeo pushed the manifest unchanged: same digest as the archive
    rows = [line.split() for line in containerd_env.ctr("images", "ls", namespace=ns).stdout.splitlines()]
    assert [row[2] for row in rows if row[0] == ref] == [busybox_archive.digest]


def _shims_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        argv = ctrenv._cmdline(int(entry)) if entry.isdigit() else []
        if argv and "containerd-shim" in argv[0] and any(text in a for a in argv):
            pids.append(int(entry))
    return pids


def test_stop_leaves_nothing_behind(busybox_archive: ctrenv.TestImage) -> None:
    """Even with running containers (runc state in the default root and in its own), stop() ends
    them, their shims and containerd, and removes every trace (mounts, runc state, directory)."""
    reason = ctrenv.containerd_missing()
    need(reason is None, reason or "")
    env = ctrenv.PrivateContainerd().start()
    sleepers: dict[str, int] = {}
    try:
        base = str(env.dir)
        assert env.ctr("images", "import", busybox_archive.archive, namespace=STOP_NS).returncode == 0
        for cid, extra in (("default-root", []), ("own-root", ["--runc-root", env.runc_root])):
            r = env.ctr("run", "-d", "--fifo-dir", env.fifo_dir, *extra, busybox_archive.ref, cid,
                        "sleep", "3600", namespace=STOP_NS)
            assert r.returncode == 0, r.stderr
        for line in env.ctr("tasks", "ls", namespace=STOP_NS).stdout.splitlines()[1:]:
            cid, pid, status = line.split()
            assert status == "RUNNING"
            sleepers[cid] = int(pid)
        assert sorted(sleepers) == ["default-root", "own-root"]
        assert os.path.isdir(os.path.join(ctrenv.PrivateContainerd.RUNC_ROOT, STOP_NS, "default-root"))
        assert len(_shims_mentioning(base + "/")) == 2, "expected a shim per container"
    finally:
        env.stop()
    env.stop()  # idempotent
    assert not os.path.exists(base)
    assert _shims_mentioning(base + "/") == []
    with open("/proc/self/mounts") as f:
        assert base not in f.read()
    for pid in sleepers.values():
        assert not os.path.exists(f"/proc/{pid}") or \
            Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] == "Z"
    assert not os.path.exists(os.path.join(ctrenv.PrivateContainerd.RUNC_ROOT, STOP_NS))
    assert not [m for m in ctrenv._cgroup_mounts() if os.path.exists(os.path.join(m, STOP_NS))]
