"""Generated gRPC code for riklet's Node API (built from node.proto at install time).

The ``*_pb2*.py`` files are never committed nor edited: ``make proto`` (run by ``make
install``) writes them, and :func:`ensure` writes them on first import if they are missing.
"""

from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def generate() -> None:
    from grpc_tools import protoc  # build-time dependency, only needed when stubs are missing

    proto = os.path.join("common", "pb", "node.proto")
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={ROOT}", f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}", os.path.join(ROOT, proto)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {proto}")


def ensure() -> None:
    stubs = [os.path.join(HERE, n) for n in ("node_pb2.py", "node_pb2_grpc.py")]
    source = os.path.join(HERE, "node.proto")
    if all(os.path.exists(s) and os.path.getmtime(s) >= os.path.getmtime(source) for s in stubs):
        return
    generate()

