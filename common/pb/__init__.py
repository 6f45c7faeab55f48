"""Generated gRPC code: riklet's Node API and the RIK worker protocol (from the .proto files
here, at install time).

The ``*_pb2*.py`` files are never committed nor edited: ``make proto`` (run by ``make
install``) writes them, and :func:`ensure` writes them on first import if they are missing.
"""

from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


PROTOS = ("node", "rik_common", "rik_worker")


def generate() -> None:
    from grpc_tools import protoc  # build-time dependency, only needed when stubs are missing

    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    for name in PROTOS:
        proto = os.path.join(ROOT, "common", "pb", f"{name}.proto")
        args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={ROOT}", f"--pyi_out={ROOT}",
                f"--grpc_python_out={ROOT}", proto]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")


def ensure() -> None:
    for name in PROTOS:
        source = os.path.join(HERE, f"{name}.proto")
        stubs = [os.path.join(HERE, f"{name}_pb2.py"), os.path.join(HERE, f"{name}_pb2_grpc.py")]
        if not all(os.path.exists(s) and os.path.getmtime(s) >= os.path.getmtime(source) for s in stubs):
            generate()
            return

