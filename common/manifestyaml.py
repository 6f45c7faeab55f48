"""Untrusted YAML manifests: PyYAML's safe loader without aliases, with bounded nesting and
bounded integers (:func:`load_yaml`, reached through :func:`common.model.load_yaml`)."""

from __future__ import annotations

from typing import Any

import yaml

from common.errors import InvalidArgument
from common.model import MAX_DEPTH, too_deep


class _ManifestLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases and with bounded nesting.

    Aliases are refused outright: a pod manifest has no need of them, and nine nested aliases in
    a few hundred bytes expand to gigabytes wherever the document is walked (a repr, a JSON dump
    of the stored spec). The composer is the one recursive part of PyYAML: counting its depth
    refuses ``[[[[...`` long before Python's recursion limit."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise InvalidArgument(f"YAML aliases (*name) are not accepted (line {mark.line + 1}, "
                                  f"column {mark.column + 1})", "manifest")
        if not self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent):
            return super().compose_node(parent, index)
        self._depth += 1      # counts collections only, as json_depth_exceeds counts brackets
        try:
            if self._depth > MAX_DEPTH:
                raise too_deep("manifest")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _bounded_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    # YAML 1.1's base-60 integers (1:2:3:...) cost quadratic time to build: a 256 KiB one takes
    # seconds. No field takes an integer anywhere near this long.
    if len(node.value) > _MAX_INT_CHARS:
        raise InvalidArgument(f"an integer of more than {_MAX_INT_CHARS} characters (line "
                              f"{node.start_mark.line + 1})", "manifest")
    value: int = yaml.SafeLoader.construct_yaml_int(loader, node)
    return value


_MAX_INT_CHARS = 64
_ManifestLoader.add_constructor("tag:yaml.org,2002:int", _bounded_int)


def load_yaml(text: str, field: str = "manifest") -> Any:
    """Decode untrusted YAML with :class:`_ManifestLoader`; failures name ``field``."""
    loader = _ManifestLoader(text)
    try:
        return loader.get_single_data()
    except InvalidArgument as exc:
        exc.field = field
        raise
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"not valid YAML: {exc}", field) from exc
    except (ValueError, OverflowError) as exc:  # a constructor's: 2020-13-45, a 5000-digit int
        raise InvalidArgument(f"not valid YAML: {exc}", field) from exc
    finally:
        loader.dispose()
