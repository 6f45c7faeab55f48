"""Python stubs for containerd's gRPC API, generated at install time from containerd's own
``.proto`` files (Debian ships them in ``golang-github-containerd-containerd-dev``; neither the
protos nor the stubs are committed here).

The protos are copied under ``common/pb/ctrd/`` with two changes that leave the wire format
alone: imports of ``github.com/containerd/containerd/api/...`` point at the local copy, and the
Go-only annotations (gogoproto, containerd's fieldpath plugin) are dropped. Package names, and
so gRPC method paths and ``Any`` type URLs, stay containerd's.

``python -m common.pb.containerd [SOURCE]`` generates; SOURCE is a directory holding
``github.com/containerd/containerd/api`` (default: look in the usual places).
"""

from __future__ import annotations

import os
import re
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(HERE, "ctrd")
API = "github.com/containerd/containerd/api"
STATUS = "github.com/gogo/googleapis/google/rpc/status.proto"

# Where the Go sources may be: the system's gocode tree, or one unpacked into the checkout by
# `make containerd-api` (apt-get download + dpkg -x, without installing Go).
CANDIDATES = ("/usr/share/gocode/src", os.path.join(ROOT, ".cache", "containerd-api", "usr", "share",
                                                      "gocode", "src"))

_GO_IMPORT = re.compile(r'^\s*import\s+weak\s+"[^"]+";\s*$', re.M)
_GO_OPTION = re.compile(r"^\s*option\s+\((gogoproto|containerd\.plugin)\.[^;]*;\s*$", re.M)
_GO_FIELD_OPTS = re.compile(r"\s*\[\s*\((gogoproto|containerd\.plugin)\.[^\]]*\]")


def find_source() -> str | None:
    env = os.environ.get("RIKLET_CONTAINERD_API")
    for base in ([env] if env else []) + list(CANDIDATES):
        if os.path.isdir(os.path.join(base, API)):
            return base
    return None


def available() -> bool:
    """Whether the stubs have been generated."""
    return os.path.exists(os.path.join(OUT, "services", "tasks", "v1", "tasks_pb2_grpc.py"))


def _rewrite(text: str) -> str:
    text = _GO_IMPORT.sub("", text)
    text = _GO_OPTION.sub("", text)
    text = _GO_FIELD_OPTS.sub("", text)
    text = text.replace(f'"{API}/', '"common/pb/ctrd/')
    return text.replace('"google/rpc/status.proto"', '"common/pb/ctrd/rpc/status.proto"')


def generate(source: str | None = None, root: str = ROOT, keep_protos: bool = True) -> list[str]:
    """Copy, rewrite and compile containerd's API protos into ``root/common/pb/ctrd``; returns
    the copied protos. ``keep_protos=False`` (a wheel's build) removes the copies afterwards:
    a wheel ships the generated modules, never third-party .proto files."""
    from grpc_tools import protoc  # build-time dependency

    source = source or find_source()
    if source is None:
        raise RuntimeError("containerd's API protos were not found; run `make containerd-api`")
    api = os.path.join(source, API)
    out = os.path.join(root, "common", "pb", "ctrd")
    shutil.rmtree(out, ignore_errors=True)
    protos: list[str] = []
    for dirpath, _dirs, files in os.walk(api):
        rel = os.path.relpath(dirpath, api)
        if rel.startswith(os.path.join("services", "ttrpc")):
            continue  # the ttrpc flavour of events: not served over gRPC
        for f in files:
            if f.endswith(".proto"):
                protos.append(_copy(os.path.join(dirpath, f), os.path.join(out, rel, f)))
    status = os.path.join(source, STATUS)
    if os.path.exists(status):
        protos.append(_copy(status, os.path.join(out, "rpc", "status.proto")))
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    args = ["protoc", f"-I{root}", f"-I{include}", f"--python_out={root}", f"--grpc_python_out={root}",
            *sorted(protos)]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on containerd's API protos")
    for dirpath, _dirs, _files in os.walk(out):
        open(os.path.join(dirpath, "__init__.py"), "a").close()
    if not keep_protos:
        for proto in protos:
            os.remove(proto)
    return protos


def _copy(src: str, dst: str) -> str:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(src, encoding="utf-8") as fh:
        text = _rewrite(fh.read())
    with open(dst, "w", encoding="utf-8") as fh:
        fh.write(text)
    return dst


if __name__ == "__main__":
    made = generate(sys.argv[1] if len(sys.argv) > 1 else None)
    print(f"generated containerd API stubs from {len(made)} protos into {os.path.relpath(OUT, ROOT)}")
