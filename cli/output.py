"""How rikletctl prints what it lists, the same way for every command: ``-o table`` (the
default), ``wide`` (more columns), ``json``, ``yaml`` (the same document as json) and ``name``
(``KIND/NAME`` lines, for scripts: ``rikletctl get pods -o name | xargs ...``).

A command describes its objects once, as a :class:`Listing`: the kind, the table's columns,
the extra columns of ``wide``, how a row and a document are made from one object. Pure
formatting: the functions here return lines; :func:`emit` prints them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import yaml

FORMATS = ("table", "wide", "json", "yaml", "name")
DOCS = ("table", "json", "yaml")    # a command that shows one document, not a list of objects
T = TypeVar("T")


@dataclass(frozen=True)
class Listing(Generic[T]):
    """What a command lists: ``columns`` and ``row`` for the table; ``wide_columns`` and
    ``wide_row`` append to them under ``-o wide``; ``doc`` is the json/yaml document of one."""
    kind: str
    columns: Sequence[str]
    row: Callable[[T], Sequence[str]]
    doc: Callable[[T], dict[str, Any]]
    name: Callable[[T], str]
    wide_columns: Sequence[str] = ()
    wide_row: Callable[[T], Sequence[str]] = field(default=lambda _obj: ())

    def header(self, wide: bool) -> list[str]:
        return [*self.columns, *(self.wide_columns if wide else ())]

    def cells(self, obj: T, wide: bool) -> list[str]:
        return [*self.row(obj), *(self.wide_row(obj) if wide else ())]


GAP = "  "


def align(rows: Sequence[Sequence[str]], gap: str = GAP) -> list[str]:
    """Rows as kubectl prints them: each column as wide as its widest cell."""
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [gap.join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def dump(data: Any, fmt: str) -> str:
    """One document as ``json`` or ``yaml`` text (yaml keeps json's key order)."""
    if fmt == "yaml":
        return str(yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True))
    return json.dumps(data, indent=2)


def render(listing: Listing[T], objs: Sequence[T], fmt: str, single: bool = False) -> list[str]:
    """``objs`` as ``fmt`` asks; ``single`` (a get of one by name) prints json/yaml as one
    document rather than a list."""
    if fmt in ("json", "yaml"):
        docs = [listing.doc(o) for o in objs]
        return [dump(docs[0] if single and docs else docs, fmt).rstrip("\n")]
    if fmt == "name":
        return [f"{listing.kind}/{listing.name(o)}" for o in objs]
    wide = fmt == "wide"
    return align([listing.header(wide), *(listing.cells(o, wide) for o in objs)])


def emit(listing: Listing[T], objs: Sequence[T], fmt: str, single: bool = False) -> None:
    for line in render(listing, objs, fmt, single):
        print(line)


class Stream(Generic[T]):
    """Rows printed one at a time (``get -w``): the columns keep the widths of the first table
    printed (a longer cell pushes its line only), as ``kubectl get -w`` does."""

    def __init__(self, listing: Listing[T], fmt: str) -> None:
        self.listing, self.fmt = listing, fmt
        self.widths: list[int] = []

    def table(self, objs: Iterable[T]) -> list[str]:
        if self.fmt not in ("table", "wide"):
            return [self.one(o) for o in objs]
        wide = self.fmt == "wide"
        rows = [self.listing.header(wide), *(self.listing.cells(o, wide) for o in objs)]
        self.widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return [self._line(r) for r in rows]

    def one(self, obj: T) -> str:
        if self.fmt in ("json", "yaml"):
            text = json.dumps(self.listing.doc(obj)) if self.fmt == "json" else (
                "---\n" + dump(self.listing.doc(obj), "yaml").rstrip("\n"))
            return text
        if self.fmt == "name":
            return f"{self.listing.kind}/{self.listing.name(obj)}"
        if not self.widths:   # --watch-only: the header comes with the first row
            return "\n".join(self.table([obj]))
        return self._line(self.listing.cells(obj, self.fmt == "wide"))

    def _line(self, cells: Sequence[str]) -> str:
        return GAP.join(c.ljust(w) for c, w in zip(cells, self.widths, strict=False)).rstrip()
