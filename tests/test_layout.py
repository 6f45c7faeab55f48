"""The house rules of the code base, checked on the source: a service never imports another
service, common/ never imports a service, no import cycles, and the manager's files stay small
enough to read in one sitting."""

from __future__ import annotations

import ast
import os
from collections.abc import Collection, Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("common", "services", "cli")
MAX_LINES = 450
# Files allowed past MAX_LINES, each with the reason and the issue that removes it.
TOO_LONG_ON_PURPOSE = {
}


def modules() -> dict[str, str]:
    """Dotted module name -> file path, for every module of ours."""
    found = {}
    for package in PACKAGES:
        for folder, dirs, files in os.walk(os.path.join(ROOT, package)):
            dirs[:] = [d for d in dirs if d not in ("__pycache__", "pb")]
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    found[dotted.removesuffix(".__init__")] = path
    return found


def top_level_imports(path: str, known: Collection[str]) -> Iterator[str]:
    """Modules imported when the file is imported: module level, outside ``if TYPE_CHECKING``
    (imports inside functions run later, on purpose, and cannot form an import-time cycle).
    ``from package import submodule`` imports the submodule, not the package's other modules."""
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), path)
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            continue
        for sub in ast.walk(node) if isinstance(node, ast.If | ast.Try) else [node]:
            if isinstance(sub, ast.Import):
                yield from (alias.name for alias in sub.names)
            elif isinstance(sub, ast.ImportFrom) and sub.module and sub.level == 0:
                named = (f"{sub.module}.{a.name}" for a in sub.names)
                submodules = [m for m in named if m in known]
                yield from submodules or [sub.module]


def all_imports(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def service_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "services" and len(parts) > 2 else None


def test_no_service_imports_another_and_common_imports_none() -> None:
    wrong = []
    for module, path in modules().items():
        mine = service_of(module)
        for imported in all_imports(path):
            theirs = service_of(imported)
            common_to_service = module.startswith("common") and imported.startswith("services")
            if common_to_service or (mine and theirs and theirs != mine):
                wrong.append(f"{module} imports {imported}")
    assert wrong == []


def test_there_is_no_import_cycle() -> None:
    mods = modules()
    graph = {m: {i for i in top_level_imports(p, mods) if i in mods and i != m} for m, p in mods.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(graph[module]):
            if state.get(nxt) == 1:
                cycles.append([*trail[trail.index(nxt):], nxt] if nxt in trail else [module, nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_manager_files_stay_small() -> None:
    long = {}
    for module, path in modules().items():
        rel = os.path.relpath(path, ROOT)
        if not module.startswith("services.manager") or rel in TOO_LONG_ON_PURPOSE:
            continue
        with open(path, encoding="utf-8") as fh:
            lines = sum(1 for _ in fh)
        if lines > MAX_LINES:
            long[rel] = lines
    assert long == {}
