"""`pip install` the wheel and go: the wheel and the sdist built as `make dist` builds them, the
wheel built again from the sdist offline, then installed into a fresh venv outside the checkout,
where the agent runs a pod driven by the installed rikletctl, also as a non-root user of the
token's group.

Needs: the checkout's venv (setuptools, grpcio-tools, build), gcc, python3-venv, PyPI or pip's
cache for the wheel's dependencies, and root (the agent's cgroups; a group made and removed).
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from common.pb import containerd
from tests.stack import _glob_status, pid_alive
from tests.support import free_ports, need, wait_for

pytestmark = pytest.mark.wheel

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("common", "services", "cli")


def _run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=kw.pop("timeout", 300), **kw)
    assert res.returncode == 0, f"{' '.join(argv)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


def _names(wheel: str) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return sorted(n for n in zf.namelist() if ".dist-info/" not in n or n.endswith("/entry_points.txt"))


def _one(directory: str, suffix: str) -> str:
    found = [f for f in os.listdir(directory) if f.endswith(suffix)]
    assert len(found) == 1, found
    return os.path.join(directory, found[0])


@dataclass
class Built:
    base: str
    wheel: str
    sdist: str
    rebuilt: str          # the wheel again, from the sdist, offline
    ctrd: bool            # containerd's API protos were found on this machine


@pytest.fixture(scope="module")
def built() -> Iterator[Built]:
    need(shutil.which("cc") is not None, "a C compiler (gcc, libc6-dev) to build the shim")
    base = tempfile.mkdtemp(prefix="rkwheel", dir="/tmp")
    os.chmod(base, 0o711)  # the non-root client below must reach the venv and the token
    source = containerd.find_source()
    env = {**os.environ, "RIKLET_CONTAINERD_API": source or ""}
    try:
        dist = os.path.join(base, "dist")
        _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, CHECKOUT], env=env)
        sdist = _one(dist, ".tar.gz")
        again = os.path.join(base, "again")
        _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-index", "--no-deps",
              "--wheel-dir", again, sdist], env=env, cwd=base)
        yield Built(base, _one(dist, ".whl"), sdist, _one(again, ".whl"), source is not None)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_the_wheel_carries_what_the_build_made_and_the_sdist_builds_it_again(built: Built) -> None:
    assert os.path.basename(built.wheel).endswith("-py3-none-linux_" + os.uname().machine + ".whl")
    names = _names(built.wheel)
    assert names == _names(built.rebuilt)
    for made in ("common/INSTALLED", "services/supervisord.conf", "services/manager/process/riklet-shim",
                 "common/pb/node_pb2.py", "common/pb/node_pb2_grpc.py", "common/pb/rik_worker_pb2_grpc.py"):
        assert made in names, made
    # Every file of the checkout's packages (a data file a package reads must be listed in
    # pyproject's package-data), but what make install generates there and the shim's source.
    not_shipped = re.compile(r"_pb2|\.pyc$|^INSTALLED$|^riklet-shim|^shim\.c$")
    for pkg in PACKAGES:
        for dirpath, dirs, files in os.walk(os.path.join(CHECKOUT, pkg)):
            dirs[:] = [d for d in dirs if d not in ("__pycache__", "ctrd")]
            for f in files:
                if not not_shipped.search(f):
                    rel = os.path.relpath(os.path.join(dirpath, f), CHECKOUT)
                    assert rel in names, f"{rel} is not in the wheel"
    assert "services/manager/process/shim.c" not in names  # the binary is used as it is
    assert not [n for n in names if n.startswith("common/pb/ctrd/") and n.endswith(".proto")]
    assert ("common/pb/ctrd/services/tasks/v1/tasks_pb2_grpc.py" in names) == built.ctrd
    with zipfile.ZipFile(built.wheel) as zf:
        conf = zf.read("services/supervisord.conf").decode()
        shim_mode = zf.getinfo("services/manager/process/riklet-shim").external_attr >> 16
    assert "serverurl=unix:///run/riklet/supervisor.sock" in conf.splitlines()
    assert "%(here)s" not in conf
    assert shim_mode & stat.S_IXUSR
    with zipfile.ZipFile(built.wheel) as zf:
        metadata = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert not [r for r in requires if "grpcio-tools" in r and "extra ==" not in r]  # build time only
    import tarfile
    with tarfile.open(built.sdist) as tf:
        top = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for shipped in ("LICENSE", "README.md", "supervisord.conf", "setup.py", "deploy/install.sh",
                    "deploy/riklet.service", "services/manager/process/shim.c", "common/pb/node.proto"):
        assert shipped in top, shipped
    assert not [n for n in top if "_pb2" in n or n.startswith("common/pb/ctrd")]


@dataclass
class Installed:
    venv: str
    cwd: str

    def bin(self, name: str) -> str:
        return os.path.join(self.venv, "bin", name)


def _interpreter() -> str:
    """The system's python3 when it is recent enough: a venv's interpreter is a link to it, and
    the non-root client must be able to run it (this venv's may sit under /root)."""
    system = "/usr/bin/python3"
    check = [system, "-c", "import sys, venv; sys.exit(sys.version_info < (3, 11))"]
    if os.path.exists(system) and subprocess.run(check, timeout=60).returncode == 0:
        return system
    return sys.executable


def _reachable_by_others(path: str) -> bool:
    real = os.path.realpath(path)
    parents = [os.path.dirname(real)]
    while parents[-1] != "/":
        parents.append(os.path.dirname(parents[-1]))
    return os.stat(real).st_mode & 0o005 == 0o005 and all(os.stat(p).st_mode & 0o001 for p in parents)


@pytest.fixture(scope="module")
def installed(built: Built) -> Installed:
    venv = os.path.join(built.base, "venv")
    _run([_interpreter(), "-m", "venv", venv])
    _run([os.path.join(venv, "bin", "pip"), "install", "--quiet", built.wheel], cwd=built.base, timeout=600)
    cwd = os.path.join(built.base, "elsewhere")
    os.mkdir(cwd)
    return Installed(venv, cwd)


def _clean_env(**extra: str) -> dict[str, str]:
    """No checkout on the path, nothing of the test's own riklet environment."""
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
    return {**keep, **extra}


def test_an_installed_agent_defaults_to_the_system_directories(installed: Installed) -> None:
    res = _run([installed.bin("riklet"), "config", "show", "-o", "json"], cwd=installed.cwd, env=_clean_env())
    shown = json.loads(res.stdout)
    assert shown["paths.run_dir"] == {"value": "/run/riklet", "source": "default"}
    assert shown["paths.state_dir"] == {"value": "/var/lib/riklet", "source": "default"}
    where = _run([installed.bin("python"), "-I", "-c", "import common; print(common.__file__)"],
                 cwd=installed.cwd, env=_clean_env())
    assert where.stdout.startswith(installed.venv), where.stdout


@pytest.fixture
def access_group() -> Iterator[str]:
    need(os.geteuid() == 0 and shutil.which("groupadd") is not None, "root and groupadd (a group is made)")
    name = f"rkw{os.getpid()}"  # not `riklet`: other agents on this machine would share with it
    _run(["groupadd", name])
    try:
        yield name
    finally:
        subprocess.run(["groupdel", name], capture_output=True, timeout=60)


def test_the_installed_agent_runs_a_pod_and_a_group_member_reaches_it(installed: Installed,
                                                                      access_group: str) -> None:
    base = tempfile.mkdtemp(prefix="rkw", dir=os.path.dirname(installed.venv))
    os.chmod(base, 0o711)
    api, metrics, chas = free_ports(3)
    state = os.path.join(base, "state")
    env = _clean_env(RIKLET_RUN_DIR=os.path.join(base, "run"), RIKLET_STATE_DIR=state,
                     RIKLET_API_ADDRESS=f"127.0.0.1:{api}", RIKLET_METRICS_ADDRESS=f"127.0.0.1:{metrics}",
                     NODE_PORT=str(chas), RIKLET_ENDPOINT=f"127.0.0.1:{api}", RIKLET_GROUP=access_group)

    def ctl(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run([installed.bin("rikletctl"), *args], cwd=installed.cwd, env=env,
                              capture_output=True, text=True, timeout=60, **kw)

    with open(os.path.join(base, "agent.out"), "wb") as out:
        agent = subprocess.Popen([installed.bin("riklet"), "run"], cwd=installed.cwd, env=env, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: ctl("get", "pods").returncode == 0, 90, what="the installed agent's Node API")
        res = ctl("run", "hello", "--", "sh", "-c", "echo hello-from-the-wheel; exec sleep 300")
        assert res.returncode == 0, res.stderr

        def running() -> bool:
            pods = json.loads(ctl("get", "pods", "-o", "json").stdout)
            return [(p["name"], p["phase"]) for p in pods] == [("hello", "Running")]
        wait_for(running, 60, what="pod hello Running")
        wait_for(lambda: "hello-from-the-wheel" in ctl("logs", "hello").stdout, 30, what="the pod's output")

        token = os.path.join(state, "api-token")
        st = os.stat(token)
        assert (stat.S_IMODE(st.st_mode), grp.getgrgid(st.st_gid).gr_name) == (0o640, access_group)
        need(_reachable_by_others(installed.bin("python")), "a python3 (3.11+) that any user may run: "
             "Debian's /usr/bin/python3")
        nobody = pwd.getpwnam("nobody")
        as_member = ctl("get", "pods", user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[access_group])
        assert as_member.returncode == 0 and "hello" in as_member.stdout, as_member.stderr
        outsider = ctl("get", "pods", user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[])
        assert outsider.returncode != 0 and "hello" not in outsider.stdout
        assert "api-token" in outsider.stderr, outsider.stderr   # told which file it cannot read

        assert ctl("delete", "hello").returncode == 0
        wait_for(lambda: json.loads(ctl("get", "pods", "-o", "json").stdout) == [], 60, what="pod hello gone")
    except BaseException:
        with open(os.path.join(base, "agent.out"), encoding="utf-8", errors="replace") as fh:
            print(fh.read()[-4000:])
        raise
    finally:
        _stop(agent, state)


def _stop(agent: subprocess.Popen[bytes], state: str) -> None:
    """Stop the agent we started, then whatever of its pods a failed test left running."""
    if agent.poll() is None:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=60)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
    # A stopped agent keeps its kernel proxy table (its workloads keep running): a test's must go.
    table = "riklet_" + hashlib.sha256(os.path.abspath(state).encode()).hexdigest()[:8]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["nft", "delete", "table", "ip", table], capture_output=True, timeout=10)
    for status in _glob_status(os.path.join(state, "pods")):
        pids = [status.get("shim_pid")] + [c.get("pid") for c in status.get("containers") or []]
        for pid in pids:
            if pid and pid_alive(int(pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)


def test_a_checkout_without_its_generated_code_says_what_to_run(tmp_path: Path) -> None:
    """Nothing is generated at run time any more: a checkout missing the stubs, or holding stubs
    older than their .proto, gets an error naming the command, and nothing is written."""
    shutil.copytree(os.path.join(CHECKOUT, "common"), tmp_path / "common",
                    ignore=shutil.ignore_patterns("*_pb2*", "ctrd", "__pycache__"))
    check = [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(tmp_path)!r}); "
             "import common.pb as p; p.ensure()"]
    missing = subprocess.run(check, capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "node_pb2.py is missing): run `make proto`" in missing.stderr
    assert not list((tmp_path / "common" / "pb").glob("*_pb2*"))
    for f in os.listdir(os.path.join(CHECKOUT, "common", "pb")):
        if "_pb2" in f:
            shutil.copy2(os.path.join(CHECKOUT, "common", "pb", f), tmp_path / "common" / "pb" / f)
    assert subprocess.run(check, capture_output=True, text=True, timeout=60).returncode == 0
    (tmp_path / "common" / "pb" / "node.proto").touch()
    os.utime(tmp_path / "common" / "pb" / "node_pb2.py", (0, 0))
    stale = subprocess.run(check, capture_output=True, text=True, timeout=60)
    assert stale.returncode != 0 and "is older than" in stale.stderr and "make proto" in stale.stderr
