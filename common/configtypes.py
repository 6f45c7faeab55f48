"""The value types of riklet's settings, as msgspec types that carry their own constraints.

A setting's type is ``Annotated[T, ...]``: msgspec checks ``T`` and its ``Meta`` constraints
(``ge``, ``pattern``, ``min_length``...) after :class:`Before` steps have turned the raw text of
a file, variable or flag into something of that shape (``"5s"`` -> ``5.0``, ``"a,b"`` ->
``["a", "b"]``), and :class:`After` steps normalise or check what msgspec cannot (a subnet, an
IP literal). A step raises ``ValueError`` (or ``InvalidArgument``); :mod:`common.config` turns
that into an error naming where the value came from.
"""

from __future__ import annotations

import functools
import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from msgspec import Meta

from common.units import parse_cpu, parse_duration, parse_memory


@dataclass(frozen=True)
class Before:
    """Shapes a raw value before msgspec checks it."""
    step: Callable[[Any], Any]


@dataclass(frozen=True)
class After:
    """Normalises or checks a value msgspec has accepted."""
    step: Callable[[Any], Any]


def _text(value: Any) -> Any:
    """YAML reads ``id: 42`` as a number: a string setting takes it as its text."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def _words(value: Any) -> Any:
    """yes/on/no/off besides the true/false/1/0 msgspec takes."""
    if isinstance(value, str):
        return {"yes": True, "on": True, "no": False, "off": False}.get(value.strip().lower(), value.strip())
    return value


def _tristate(value: Any) -> Any:
    return str(value).lower() if isinstance(value, bool) else _lower(value)


def _empty_is_none(value: Any) -> Any:
    return None if value == "" else value


def _list(value: Any) -> Any:
    """A comma-separated string (environment) or a YAML list; blank items dropped."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        return items
    items = [i.strip() if isinstance(i, str) else i for i in items]
    return [i for i in items if i != ""]


def _split(sep: str, value: Any) -> Any:
    return value.split(sep, 1) if isinstance(value, str) and sep in value else value


def _uid_gid(value: Any) -> Any:
    text = _text(value)
    if not isinstance(text, str):
        return text
    uid, _, gid = text.partition(":")
    return [uid, gid or uid]


def _ordered(pair: tuple[int, int]) -> tuple[int, int]:
    if pair[0] > pair[1]:
        raise ValueError(f"expected LOW-HIGH with LOW <= HIGH, got {pair[0]}-{pair[1]}")
    return pair


def _subnet(text: str) -> str:
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise ValueError(f"expected an IPv4 subnet like 10.88.0.0/16: {exc}") from exc
    if net.version != 4 or net.prefixlen > 28:
        raise ValueError("expected an IPv4 subnet of at least 16 addresses")
    return str(net)


def _ip(text: str) -> str:
    # An IP literal only: the proxy opens listeners on its data path, which must never resolve.
    try:
        return str(ipaddress.ip_address(text))
    except ValueError as exc:
        raise ValueError(f"expected an IP address, got {text!r}") from exc


def _abspath(text: str | None) -> str | None:
    return None if text is None else os.path.abspath(text)


def _quantity(parse: Callable[[object, str], Any]) -> Before:
    """A unit parser of common.units (5s, 64Mi, 500m); empty or null stays None."""
    return Before(lambda v: None if v in (None, "") else parse(v, ""))


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError(f"must be a positive duration (like 30s), got {value:g}s")
    return value


_PORT = r"(6553[0-5]|655[0-2]\d|65[0-4]\d\d|6[0-4]\d{3}|[1-5]\d{4}|[1-9]\d{0,3})"

_ADDRESS = rf"^.+:{_PORT}$"
_NAME = r"^[A-Za-z0-9._-]{1,15}$"
_HOST = r"^[^/\s]+$"
# What a value failing a pattern was expected to be, in words (msgspec would print the regex).
PATTERNS = {
    _ADDRESS: "expected HOST:PORT with a port from 1 to 65535",
    _NAME: "expected a name of 1 to 15 letters, digits, '.', '_' or '-'",
    _HOST: "expected HOST or HOST:PORT",
    r"^https?://\S+$": "expected an http:// or https:// URL",
    "^/": "expected an absolute path",
    "^/[^\x00]*$": "expected an absolute path",
}

Text = Annotated[str, Before(_text), Meta(min_length=1)]
Path = Annotated[str, Before(_text), Meta(min_length=1), After(os.path.abspath)]
OptionalPath = Annotated[Annotated[str, Meta(min_length=1)] | None, Before(_empty_is_none), Before(_text),
                         After(_abspath)]
Address = Annotated[str, Meta(pattern=_ADDRESS)]        # HOST:PORT
OptionalAddress = Annotated[Address | None, Before(_empty_is_none)]
Url = Annotated[Annotated[str, Meta(pattern=r"^https?://\S+$")] | None,
                Before(lambda v: _empty_is_none(v.rstrip("/")) if isinstance(v, str) else v)]
SocketPath = Annotated[str, Before(lambda v: v.removeprefix("unix://") if isinstance(v, str) else v),
                       Meta(pattern="^/")]
# an interface or snapshotter name
Name = Annotated[str, Before(_text), Meta(pattern=_NAME)]
Subnet = Annotated[str, After(_subnet)]
IP = Annotated[str, After(_ip)]
Hosts = Annotated[tuple[Annotated[str, Meta(pattern=_HOST)], ...], Before(_list)]   # HOST[:PORT]
PathPrefixes = Annotated[tuple[Annotated[str, Meta(pattern="^/[^\x00]*$")], ...], Before(_list),
                         After(lambda ps: tuple(os.path.normpath(p) for p in ps))]
Port = Annotated[int, Meta(ge=0, le=65535)]
PortRange = Annotated[tuple[Annotated[int, Meta(ge=1, le=65535)], Annotated[int, Meta(ge=1, le=65535)]],
                      Before(functools.partial(_split, "-")), After(_ordered)]            # LOW-HIGH
User = Annotated[tuple[Annotated[int, Meta(ge=0)], Annotated[int, Meta(ge=0)]], Before(_uid_gid)]  # UID[:GID]
Bool = Annotated[bool, Before(_words)]
Count = Annotated[int, Meta(ge=1)]
CountOrZero = Annotated[int, Meta(ge=0)]
Duration = Annotated[float, _quantity(parse_duration), Meta(ge=0)]
PositiveDuration = Annotated[float, _quantity(parse_duration), After(_positive)]
Resolution = Annotated[float, _quantity(parse_duration), Meta(ge=0.05, le=3600)]
Memory = Annotated[int, _quantity(parse_memory)]
OptionalMemory = Annotated[int | None, _quantity(parse_memory)]
OptionalCpu = Annotated[int | None, _quantity(parse_cpu)]
Level = Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], Before(_upper)]
Runtime = Literal["process", "containerd"]
ProxyMode = Annotated[Literal["auto", "kernel", "userspace"], Before(_lower)]
Tristate = Annotated[Literal["auto", "true", "false"], Before(_tristate)]
