"""A test environment for containerd-based tests, fully offline: an OCI image built from the
machine's busybox-static, a private containerd (its own root, state and sockets in one temp
directory) and a private image registry (Debian's docker-registry) that skopeo pushes into.

Everything here only starts processes it keeps the pid of and stops exactly those (and the
containerd shims that name its own directory on their command line)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

BUSYBOX = "/bin/busybox"
DEFAULT_REF = "riklet.test/busybox:latest"
IMAGE_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

# The annotation containerd's importer takes verbatim as the image name (ctr 1.6 would otherwise
# run the OCI ref.name through its --base-name/"import-DATE" prefix translator).
ANNOTATION_CONTAINERD_NAME = "io.containerd.image.name"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"

CONTAINERD = "containerd"
CTR = "ctr"
RUNC = "runc"
SHIM = "containerd-shim-runc-v2"
REGISTRY = "/usr/bin/docker-registry"
SKOPEO = "skopeo"

_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
         "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


def oci_arch() -> str:
    machine = platform.machine()
    return _ARCH.get(machine, machine)


@dataclass(frozen=True)
class TestImage:
    """An OCI archive built by build_busybox_oci, the name it imports as, and its manifest digest."""

    __test__ = False  # not a pytest test class

    archive: str
    ref: str
    digest: str


# ---------------------------------------------------------------------------------------------
# 1. the image


def _tarinfo(name: str, kind: bytes, mode: int, size: int = 0, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.linkname = linkname
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _busybox_applets() -> list[str]:
    out = subprocess.run([BUSYBOX, "--list"], check=True, capture_output=True, text=True).stdout
    names = {n.strip() for n in out.splitlines()}
    return sorted(n for n in names if n and n != "busybox" and "/" not in n)


def _layer_tar() -> bytes:
    passwd = (b"root:x:0:0:root:/root:/bin/sh\n"
              b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    group = b"root:x:0:\nnogroup:x:65534:\n"
    dirs = {"bin": 0o755, "dev": 0o755, "etc": 0o755, "proc": 0o555, "root": 0o700, "run": 0o755,
            "sys": 0o555, "tmp": 0o1777, "var": 0o755}
    files = {"etc/group": (group, 0o644), "etc/passwd": (passwd, 0o644)}
    with open(BUSYBOX, "rb") as f:
        files["bin/busybox"] = (f.read(), 0o755)
    links = {f"bin/{applet}": "busybox" for applet in _busybox_applets()}

    entries: list[tuple[str, tarfile.TarInfo, bytes | None]] = []
    for name, mode in dirs.items():
        entries.append((name, _tarinfo(name, tarfile.DIRTYPE, mode), None))
    for name, (data, mode) in files.items():
        entries.append((name, _tarinfo(name, tarfile.REGTYPE, mode, len(data)), data))
    for name, target in links.items():
        entries.append((name, _tarinfo(name, tarfile.SYMTYPE, 0o777, linkname=target), None))
    entries.sort(key=lambda e: e[0])

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for _, info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def build_busybox_oci(path: str, ref: str = DEFAULT_REF) -> str:
    """Write an OCI image layout tar archive of a busybox image to ``path``; return its manifest
    digest. Deterministic: the same busybox binary gives the same bytes and digest. The index
    names the image ``ref`` so that ``ctr images import`` (no --base-name) creates exactly that
    name and a one-image archive suits skopeo's ``oci-archive:PATH``."""
    layer = _layer_tar()
    layer_gz = gzip.compress(layer, compresslevel=6, mtime=0)
    arch = oci_arch()
    config = _json({
        "architecture": arch,
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {"Env": [IMAGE_PATH], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [_sha(layer)]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "riklet tests: busybox-static"}],
    })
    manifest = _json({
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": _sha(config), "size": len(config)},
        "layers": [{"mediaType": MT_LAYER, "digest": _sha(layer_gz), "size": len(layer_gz)}],
    })
    digest = _sha(manifest)
    tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else "latest"
    index = _json({
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": [{
            "mediaType": MT_MANIFEST, "digest": digest, "size": len(manifest),
            "platform": {"architecture": arch, "os": "linux"},
            "annotations": {ANNOTATION_CONTAINERD_NAME: ref, ANNOTATION_REF_NAME: tag},
        }],
    })
    members: list[tuple[str, bytes | None]] = [
        ("blobs", None),
        ("blobs/sha256", None),
        *sorted((f"blobs/sha256/{_sha(b)[7:]}", b) for b in {layer_gz, config, manifest}),
        ("index.json", index),
        ("oci-layout", _json({"imageLayoutVersion": "1.0.0"})),
    ]
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            if data is None:
                tar.addfile(_tarinfo(name, tarfile.DIRTYPE, 0o755))
            else:
                tar.addfile(_tarinfo(name, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
    os.replace(tmp, path)
    return digest


# ---------------------------------------------------------------------------------------------
# shared process helpers


def busybox_missing() -> str | None:
    """Why build_busybox_oci cannot work here, or None."""
    if not os.access(BUSYBOX, os.X_OK):
        return f"{BUSYBOX} is missing (apt-get install busybox-static)"
    return None


def _missing(*binaries: str) -> str | None:
    for b in binaries:
        if shutil.which(b) is None:
            return f"{b} is not installed"
    if os.geteuid() != 0:
        return "needs root"
    return None


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _terminate(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _ppids() -> dict[int, int]:
    out: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may contain spaces and parentheses
        out[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
    return out


def _descendants(roots: list[int]) -> list[int]:
    ppids = _ppids()
    children: dict[int, list[int]] = {}
    for pid, ppid in ppids.items():
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.append(child)
                todo.append(child)
    return found


def _cgroup_mounts() -> list[str]:
    with open("/proc/self/mounts") as f:
        return [cols[1] for cols in (line.split() for line in f) if cols[2] in ("cgroup", "cgroup2")]


def _unix_socket_paths(pids: list[int]) -> list[str]:
    """Filesystem paths of the unix sockets these processes hold open (from /proc/net/unix)."""
    inodes: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
    paths = []
    with contextlib.suppress(OSError), open("/proc/net/unix") as f:
        next(f, None)
        for line in f:
            cols = line.split()
            if len(cols) >= 8 and cols[6] in inodes and cols[7].startswith("/"):
                paths.append(cols[7])
    return sorted(set(paths))


def _kill_pids(pids: list[int], timeout: float = 5.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                # reap if it is our child; otherwise just wait for it to go away
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        break
                os.kill(pid, 0)
                state = Path(f"/proc/{pid}/stat").read_text()
                if state[state.rindex(")") + 2] == "Z":
                    break
            except (ProcessLookupError, FileNotFoundError):
                break
            time.sleep(0.01)


# ---------------------------------------------------------------------------------------------
# 2. a private containerd


def containerd_missing() -> str | None:
    """Why a private containerd cannot run here, or None."""
    return _missing(CONTAINERD, CTR, RUNC, SHIM)


class PrivateContainerd:
    """A containerd of its own: root, state, sockets and log in one short temp directory, the CRI
    plugin off, runc (io.containerd.runc.v2, cgroupfs) as the runtime."""

    RUNC_ROOT = "/run/containerd/runc"  # the runc v2 shim's default --root (+ /<namespace>)

    def __init__(self, base: str | None = None, start_timeout: float = 15.0) -> None:
        self._base_arg = base
        self.start_timeout = start_timeout
        self.dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0

    # paths, valid once started
    @property
    def socket(self) -> str:
        assert self.dir is not None, "not started"
        return str(self.dir / "c.sock")

    @property
    def root(self) -> str:
        assert self.dir is not None
        return str(self.dir / "root")

    @property
    def state(self) -> str:
        assert self.dir is not None
        return str(self.dir / "state")

    @property
    def log_path(self) -> Path:
        assert self.dir is not None
        return self.dir / "containerd.log"

    @property
    def runc_root(self) -> str:
        """Pass as ``ctr run --runc-root`` (runc option Root) to keep runc's state in here too;
        the default is RUNC_ROOT/<namespace>, shared with any other containerd."""
        assert self.dir is not None
        return str(self.dir / "runc")

    @property
    def fifo_dir(self) -> str:
        """Pass as ``ctr run --fifo-dir``: ctr's default (/run/containerd/fifo) keeps the fifos of
        detached (-d) containers after it exits; here they go away with the directory."""
        assert self.dir is not None
        return str(self.dir / "fifo")

    def start(self) -> PrivateContainerd:
        reason = containerd_missing()
        if reason is not None:
            raise RuntimeError(f"cannot start containerd: {reason}")
        t0 = time.monotonic()
        self.dir = Path(self._base_arg or tempfile.mkdtemp(prefix="rkctd-", dir="/tmp"))
        self.dir.mkdir(parents=True, exist_ok=True)
        assert len(self.socket) + len(".ttrpc") < 100, f"socket path too long: {self.socket}"
        config = self.dir / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{self.root}"\n'
            f'state = "{self.state}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "\n[grpc]\n"
            f'  address = "{self.socket}"\n'
            "\n[ttrpc]\n"
            f'  address = "{self.socket}.ttrpc"\n'
            "\n[debug]\n"
            '  level = "info"\n'
        )
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([CONTAINERD, "--config", str(config)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                tail = _log_tail(self.log_path)
                self.stop()
                raise RuntimeError(f"containerd exited ({rc}):\n{tail}")
            if os.path.exists(self.socket):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    r = subprocess.run([CTR, "-a", self.socket, "version"], capture_output=True,
                                       timeout=5, check=False, stdin=subprocess.DEVNULL)
                    if r.returncode == 0:
                        break
            if time.monotonic() > deadline:
                tail = _log_tail(self.log_path)
                self.stop()
                raise RuntimeError(f"containerd did not answer within {self.start_timeout}s:\n{tail}")
            time.sleep(0.05)
        self.start_seconds = time.monotonic() - t0
        return self

    def ctr(self, *args: str, namespace: str | None = None, check: bool = False,
            timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run ``ctr -a SOCKET [-n NAMESPACE] ARGS...`` and capture its output as text."""
        cmd = [CTR, "-a", self.socket]
        if namespace is not None:
            cmd += ["-n", namespace]
        return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout,
                              check=check, stdin=subprocess.DEVNULL)

    def _shim_pids(self) -> list[int]:
        assert self.dir is not None
        mine = str(self.dir)
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            argv = _cmdline(int(entry))
            if argv and os.path.basename(argv[0]).startswith("containerd-shim") and \
                    any(mine + "/" in a for a in argv[1:]):
                pids.append(int(entry))
        return pids

    def _bundles(self) -> list[tuple[str, str]]:
        """(namespace, container id) of every task bundle left in its state directory."""
        tasks = Path(self.state) / "io.containerd.runtime.v2.task"
        out = []
        with contextlib.suppress(OSError):
            for ns in sorted(tasks.iterdir()):
                out += [(ns.name, b.name) for b in sorted(ns.iterdir()) if b.is_dir()]
        return out

    def stop(self) -> None:
        """Stop the containerd it started, then its shims and their containers, unmount what is
        mounted under its directory and remove the directory. Safe to call more than once."""
        if self.dir is None:
            return
        namespaces: set[str] = set()
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(subprocess.SubprocessError, OSError):
                    namespaces.update(self.ctr("namespaces", "ls", "-q", timeout=5).stdout.split())
            _terminate(self.proc)
            self.proc = None
        shims = self._shim_pids()
        bundles = self._bundles()
        namespaces.update(ns for ns, _ in bundles)
        with contextlib.suppress(OSError):  # namespaces that ever had a task (even if now deleted)
            namespaces.update(p.name for p in (Path(self.state) / "io.containerd.runtime.v2.task").iterdir())
        # containers whose shim was ours: runc delete --force kills them and removes runc's state
        # (by default outside our directory, under RUNC_ROOT/<namespace>) and their cgroups
        if shutil.which(RUNC):
            for ns, cid in bundles:
                for root in (os.path.join(self.RUNC_ROOT, ns), os.path.join(self.runc_root, ns)):
                    if os.path.isdir(os.path.join(root, cid)):
                        subprocess.run([RUNC, "--root", root, "delete", "--force", cid],
                                       capture_output=True, timeout=30, check=False)
        sockets = _unix_socket_paths(shims)
        _kill_pids(_descendants(shims) + shims)
        for path in sockets:  # a killed shim leaves its socket (/run/containerd/s/<hash>) behind
            if path.startswith("/run/containerd/s/"):
                with contextlib.suppress(OSError):
                    os.unlink(path)
        # only if empty (rmdir fails otherwise): runc's root for each namespace, and the cgroup
        # /<namespace> that runc leaves behind as the parent of the containers' /<namespace>/<id>
        for ns in namespaces:
            for parent in (self.RUNC_ROOT, *_cgroup_mounts()):
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(parent, ns))
        self._unmount_all()
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.dir.exists():  # a busy mount came back? one more round
            self._unmount_all()
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    def _unmount_all(self) -> None:
        assert self.dir is not None
        prefix = str(self.dir) + "/"
        for _ in range(3):
            mounts = []
            with open("/proc/self/mounts") as f:
                for line in f:
                    target = line.split()[1].replace("\\040", " ").replace("\\011", "\t") \
                        .replace("\\012", "\n").replace("\\134", "\\")
                    if target.startswith(prefix):
                        mounts.append(target)
            if not mounts:
                return
            for target in sorted(set(mounts), key=lambda m: m.count("/"), reverse=True):
                subprocess.run(["umount", "-l", target], capture_output=True, check=False, timeout=30)

    def __enter__(self) -> PrivateContainerd:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# 3. a private registry


def registry_missing() -> str | None:
    """Why a private registry cannot run or be pushed to here, or None."""
    for b in (REGISTRY, SKOPEO):
        if shutil.which(b) is None:
            return f"{b} is not installed"
    return None


class Registry:
    """Debian's docker-registry on 127.0.0.1:<free port>, storing into a temp directory; plain
    HTTP (pull with ``ctr images pull --plain-http``)."""

    def __init__(self, start_timeout: float = 15.0) -> None:
        self.start_timeout = start_timeout
        self.dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.start_seconds = 0.0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        assert self.dir is not None
        return self.dir / "registry.log"

    def start(self) -> Registry:
        from tests.support import free_port

        reason = registry_missing()
        if reason is not None:
            raise RuntimeError(f"cannot start the registry: {reason}")
        t0 = time.monotonic()
        self.dir = Path(tempfile.mkdtemp(prefix="rkreg-"))
        (self.dir / "storage").mkdir()
        last = ""
        for _attempt in range(3):  # the free port may be taken before the registry binds it
            self.port = free_port()
            config = self.dir / "config.yml"
            config.write_text(
                "version: 0.1\n"
                "log:\n  level: warn\n  accesslog:\n    disabled: true\n"
                "storage:\n"
                f"  filesystem:\n    rootdirectory: {self.dir / 'storage'}\n"
                "  delete:\n    enabled: true\n"
                f"http:\n  addr: {self.address}\n  secret: riklet-tests\n"
            )
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen([REGISTRY, "serve", str(config)], stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + self.start_timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                if self._answers():
                    self.start_seconds = time.monotonic() - t0
                    return self
                time.sleep(0.05)
            last = _log_tail(self.log_path)
            _terminate(self.proc)
        self.stop()
        raise RuntimeError(f"docker-registry did not answer:\n{last}")

    def _answers(self) -> bool:
        import urllib.error
        import urllib.request

        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
        try:
            with opener.open(f"http://{self.address}/v2/", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def push_oci_archive(self, archive: str, repo_tag: str) -> None:
        """Copy the (one-image) OCI archive to ``ADDRESS/repo_tag`` over plain HTTP."""
        r = subprocess.run(
            [SKOPEO, "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
             f"oci-archive:{archive}", f"docker://{self.address}/{repo_tag}"],
            capture_output=True, text=True, timeout=120, check=False, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise RuntimeError(f"skopeo copy failed ({r.returncode}): {r.stderr.strip()}\n"
                               f"registry log:\n{_log_tail(self.log_path)}")

    def stop(self) -> None:
        if self.proc is not None:
            _terminate(self.proc)
            self.proc = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
