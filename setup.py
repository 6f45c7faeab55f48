"""riklet's build hook: what a wheel needs that is not in the source tree, made at build time.

Into the package being built (setuptools' build_lib), never into the source tree:

- the gRPC code of riklet's own .proto files (common/pb: node, rik_common, rik_worker);
- containerd's API stubs (common/pb/ctrd) when containerd's .proto files are found on the build
  machine (RIKLET_CONTAINERD_API, or the places common/pb/containerd.py looks); the copied
  third-party .proto files are removed again, only the generated modules ship;
- the per-pod shim, compiled from services/manager/process/shim.c (gcc, libc6-dev), which
  makes the wheel platform-specific (py3-none-<platform>: no Python extension in it);
- services/supervisord.conf, from the top-level supervisord.conf (the one source), with the two
  lines that named the checkout pointed at an installed agent's directories;
- the marker common/INSTALLED, which tells common.paths that it runs from an installed wheel.

An editable install (``make install``) gets none of this here: the Makefile generates the stubs
and the shim in the checkout.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys

from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution as _Distribution

HERE = os.path.dirname(os.path.abspath(__file__))

# The packaged supervisord.conf: the checkout's, but an installed agent has no checkout.
CONF_REWRITES = (
    (r"(?m)^directory=%\(here\)s$", "directory=%(ENV_RIKLET_STATE_DIR)s"),
    (r"(?m)^serverurl=unix://%\(here\)s/\.riklet/run/supervisor\.sock$",
     "serverurl=unix:///run/riklet/supervisor.sock"),
)


def _load(name: str, path: str):  # type: ignore[no-untyped-def]
    """A module of the source tree by its path (its package's __init__ may import what the
    build environment lacks)."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def packaged_conf(text: str) -> str:
    for pattern, replacement in CONF_REWRITES:
        text, n = re.subn(pattern, lambda _m, r=replacement: r, text)
        if n != 1:
            raise RuntimeError(f"supervisord.conf: expected one line matching {pattern!r}, found {n}")
    return text


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        lib = os.path.abspath(self.build_lib)
        pb = _load("common.pb", os.path.join(HERE, "common", "pb", "__init__.py"))
        pb.generate(root=lib)
        ctrd = _load("common.pb.containerd", os.path.join(HERE, "common", "pb", "containerd.py"))
        shutil.rmtree(os.path.join(lib, "common", "pb", "ctrd"), ignore_errors=True)
        source = ctrd.find_source()
        if source is None:
            print("riklet build: containerd's API .proto files not found (set RIKLET_CONTAINERD_API): "
                  "this wheel's agent will fail pods with an image, with the reason", file=sys.stderr)
        else:
            ctrd.generate(source, root=lib, keep_protos=False)
        shim = _load("riklet_shim_build", os.path.join(HERE, "services", "manager", "process", "build.py"))
        process = os.path.join(lib, "services", "manager", "process")
        shim.build(os.path.join(HERE, "services", "manager", "process", "shim.c"),
                   os.path.join(process, "riklet-shim"))
        with open(os.path.join(HERE, "supervisord.conf"), encoding="utf-8") as fh:
            conf = packaged_conf(fh.read())
        with open(os.path.join(lib, "services", "supervisord.conf"), "w", encoding="utf-8") as fh:
            fh.write(conf)
        with open(os.path.join(lib, "common", "INSTALLED"), "w", encoding="utf-8") as fh:
            fh.write("riklet runs from an installed wheel: see common/paths.py\n")


class Distribution(_Distribution):
    def has_ext_modules(self) -> bool:
        return True  # the shim: a platform wheel, installed into platlib


class BdistWheel(bdist_wheel):
    """Tagged py3-none-<platform>: it carries a compiled program, but no Python extension."""

    def get_tag(self) -> tuple[str, str, str]:
        _python, _abi, platform = super().get_tag()
        return "py3", "none", platform


setup(distclass=Distribution, cmdclass={"build_py": BuildPy, "bdist_wheel": BdistWheel})
