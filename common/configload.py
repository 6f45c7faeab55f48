"""Reading and checking riklet's configuration: defaults < CHaS file < riklet's YAML file <
environment < flags, into a :class:`common.config.Config`.

Each field's type (:mod:`common.configtypes`) carries its constraints, its ``opt(...)`` its
environment variable, flag and help. The CHaS Node Agent's file (``/etc/chas/node-agent.yaml``,
seed 003) is read too, its keys mapped onto the same settings by :data:`CHAS_KEYS`. Each raw
value is validated on its own, so an unknown YAML key or a value that does not parse is an error
naming the file (or variable, or flag) and the key.

``riklet run`` checks the configuration here once and writes it for the services
(:func:`write_checked`); a service imports this module (msgspec, PyYAML) only when that record
no longer holds (:func:`common.config.parse_args`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

import msgspec
import yaml

from common import configtypes
from common.config import CHECKED_VERSION, Config, digest
from common.configtypes import PATTERNS, After, Before
from common.errors import InvalidArgument
from common.jsonfile import write_json


def opt(*, help: str, env: str | None = None, flag: str | None = None) -> msgspec.Meta:
    """A setting's environment variable, flag and help, kept in its type's metadata."""
    return msgspec.Meta(description=help, extra={"env": env, "flag": flag})


@dataclass(frozen=True)
class Setting:
    """One field of :class:`Config` as the sources see it: its key, variable, flag and checks."""
    key: str                      # dotted YAML key; the attribute is the key with '.' -> '_'
    attr: str
    type: Any                     # the field's Annotated type, constraints included
    default: Callable[[], Any]
    env: str | None
    flag: str | None
    help: str
    before: tuple[Callable[[Any], Any], ...]
    after: tuple[Callable[[Any], Any], ...]

    def parse(self, raw: object, where: str) -> Any:
        """``raw`` (YAML, environment or flag text) as this setting's value; an error names ``where``."""
        try:
            value = raw
            for step in self.before:
                value = step(value)
            value = msgspec.convert(value, self.type, strict=False)   # strict=False: "5" is 5
            for step in self.after:
                value = step(value)
            return value
        except InvalidArgument as exc:
            message = exc.message
        except msgspec.ValidationError as exc:
            message = str(exc)
            choices = _choices(self.type)
            if choices and message.startswith("Invalid enum value"):
                message = f"expected one of {', '.join(choices)}, got {raw!r}"
            else:
                message = _plain(message.split(" - at ")[0], raw)
        except (ValueError, TypeError) as exc:
            message = str(exc)
        raise InvalidArgument(message[:1].lower() + message[1:], where)


# msgspec's words for types, as a user reads them
_PLAIN = (("`int`", "an integer"), ("`float`", "a number"), ("`str`", "a string"),
          ("`bool`", "true or false"), ("`array`", "a list"), ("`object`", "a mapping"),
          ("`null`", "nothing"))


def _plain(message: str, raw: object) -> str:
    """msgspec's message in a user's words, with the value that was refused."""
    for pattern, words in PATTERNS.items():
        if f"matching regex {pattern!r}" in message:
            return f"{words}, got {raw!r}"
    for word, plain in _PLAIN:
        message = message.replace(word, plain)
    return f"{message.split(', got ')[0]}, got {raw!r}"


def _choices(tp: Any) -> tuple[str, ...]:
    """The values of the Literal inside a setting's type, if it is one."""
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tuple(str(a) for a in get_args(tp)) if get_origin(tp) is Literal else ()


def _setting(f: dataclasses.Field[Any], tp: Any) -> Setting:
    extras = tp.__metadata__ if get_origin(tp) is Annotated else ()
    meta = next(m for m in reversed(extras) if isinstance(m, msgspec.Meta) and m.extra)
    extra = meta.extra or {}
    default: Callable[[], Any] = (f.default_factory if f.default is dataclasses.MISSING  # type: ignore[assignment]
                                  else (lambda: f.default))
    return Setting(f.name.replace("_", ".", 1), f.name, tp, default, extra["env"], extra["flag"],
                   meta.description or "",
                   tuple(m.step for m in extras if isinstance(m, Before)),
                   tuple(m.step for m in extras if isinstance(m, After)))


def _settings() -> tuple[Setting, ...]:
    # Config's annotations are text (common.config imports none of their names): they are
    # evaluated here, among the value types and opt().
    names = {**vars(configtypes), "opt": opt, "Annotated": Annotated, "Mapping": Mapping}
    hints = get_type_hints(Config, localns=names, include_extras=True)
    return tuple(_setting(f, hints[f.name]) for f in dataclasses.fields(Config) if f.name != "sources")


SETTINGS: tuple[Setting, ...] = _settings()
_BY_KEY = {s.key: s for s in SETTINGS}


# The CHaS Node Agent's configuration file (seed 003, "Configuration"): read alongside riklet's
# own, its keys mapped onto riklet's settings. Precedence: defaults < CHaS file < riklet's file
# < environment < flags.
CHAS_CONFIG_PATH = "/etc/chas/node-agent.yaml"   # read when it exists; CHAS_CONFIG / --chas-config
CHAS_KEYS: Mapping[str, str] = {                  # CHaS key -> riklet setting
    "api.chas_url": "chas.api_url",
    "api.port": "chas.port",
    "node.id": "node.id",
    "node.hostname": "node.hostname",
    "containerd.socket": "containerd.address",
    "containerd.namespace": "containerd.namespace",
    "monitoring.health_interval": "chas.health_interval",
    "monitoring.metrics_enabled": "monitoring.metrics_enabled",
    "logging.level": "logging.level",
    "logging.file": "logging.file",
}
if not set(CHAS_KEYS.values()) <= set(_BY_KEY):
    raise RuntimeError(f"CHAS_KEYS names settings SETTINGS lacks: {set(CHAS_KEYS.values()) - set(_BY_KEY)}")
_CHAS_BY_SETTING = {v: k for k, v in CHAS_KEYS.items()}

# Settings whose value `riklet config show` never prints (none yet: the token *file* is a path).
SECRET_KEYS: frozenset[str] = frozenset()


def _flatten(data: Mapping[str, Any], prefix: str, source: str,
             known: Mapping[str, Any] = _BY_KEY) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, key + ".", source, known))
        elif key in known:
            out[key] = value
        else:
            raise InvalidArgument(f"unknown configuration key in {source}", key)
    return out


def _read_mapping(path: str, field: str) -> Mapping[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise InvalidArgument(f"cannot read configuration file {path}: {exc.strerror}", field) from exc
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"{path} is not valid YAML: {exc}", field) from exc
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise InvalidArgument(f"{path} must hold a mapping at the top level", field)
    return data


def read_yaml(path: str) -> dict[str, Any]:
    """riklet's own file: setting key -> raw value."""
    return _flatten(_read_mapping(path, "config"), "", path)


def read_chas_yaml(path: str, field: str = "chas-config") -> dict[str, Any]:
    """The CHaS file: CHaS key (``api.port``) -> raw value; an unknown key is an error."""
    return _flatten(_read_mapping(path, field), "", path, CHAS_KEYS)


def chas_config_path(flags: argparse.Namespace | None, environ: Mapping[str, str]) -> str | None:
    """The CHaS file to read: --chas-config, else CHAS_CONFIG (both must exist; /dev/null reads
    as empty, so it turns the default off), else the default path when it exists, else none."""
    for path, field in ((getattr(flags, "chas_config", None), "--chas-config"),
                        (environ.get("CHAS_CONFIG"), "CHAS_CONFIG")):
        if path:
            if not os.path.exists(path):
                raise InvalidArgument(f"CHaS configuration file {path} does not exist", field)
            if os.path.isdir(path):
                raise InvalidArgument(f"CHaS configuration file {path} is a directory", field)
            return path
    return CHAS_CONFIG_PATH if os.path.exists(CHAS_CONFIG_PATH) else None


def describe_source(key: str, source: str) -> str:
    """``Config.sources[key]`` for people: default, FILE: KEY, environment VAR or flag --FLAG."""
    s = _BY_KEY[key]
    if source == "environment":
        return f"environment {s.env}"
    if source == "flags":
        return f"flag {s.flag}"
    chas_key = _CHAS_BY_SETTING.get(key)
    if source == "default" or (chas_key and source.endswith(f": {chas_key}")):
        return source               # the CHaS file's entry already names its key
    return f"{source}: {key}"       # riklet's file: the key is the setting's


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML configuration file (env RIKLET_CONFIG)")
    parser.add_argument("--chas-config", help="CHaS node-agent YAML file (env CHAS_CONFIG; "
                        f"default {CHAS_CONFIG_PATH} when it exists)")
    for s in SETTINGS:
        if s.flag:
            parser.add_argument(s.flag, dest=s.attr, help=s.help)


def load(flags: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Defaults < CHaS file < riklet's file < environment < flags.

    ``Config.sources[key]`` says where each value came from: ``default``, ``<CHaS file>:
    <CHaS key>``, ``<riklet file>``, ``environment`` or ``flags`` (:func:`describe_source`
    spells out the key, variable or flag)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    # (setting key, raw value, where: named in errors, source: recorded in Config.sources)
    layers: list[list[tuple[str, Any, str, str]]] = []
    chas_path = chas_config_path(flags, env)
    if chas_path:
        layers.append([(CHAS_KEYS[k], raw, f"{chas_path}: {k}", f"{chas_path}: {k}")
                       for k, raw in read_chas_yaml(chas_path).items()])
    path = getattr(flags, "config", None) or env.get("RIKLET_CONFIG")
    if path:
        layers.append([(k, raw, f"{path}: {k}", path) for k, raw in read_yaml(path).items()])
    layers.append([(s.key, env[s.env], s.env, "environment") for s in SETTINGS if s.env and env.get(s.env)])
    if flags is not None:
        layers.append([(s.key, getattr(flags, s.attr), s.flag, "flags") for s in SETTINGS
                       if s.flag and getattr(flags, s.attr, None) is not None])
    for layer in layers:
        for key, raw, where, source in layer:
            values[key] = _BY_KEY[key].parse(raw, where)
            sources[key] = source
    for s in SETTINGS:
        if s.key not in values:
            values[s.key] = s.parse(s.default(), s.key)
            sources[s.key] = "default"
    # Unix socket paths are limited to 107 bytes; the longest one riklet makes is this one.
    longest = os.path.join(values["paths.run_dir"], "memory-events.sock")
    if len(longest.encode()) > 107:
        raise InvalidArgument(f"too long for unix sockets ({len(longest)} > 107 bytes with "
                              "'/memory-events.sock'): pick a shorter directory", "paths.run_dir")
    return Config(**{_BY_KEY[k].attr: v for k, v in values.items()}, sources=sources)


def parse_args(prog: str, argv: Sequence[str] | None = None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None,
               ) -> tuple[Config, argparse.Namespace]:
    """The command line every service shares; exits with a clear message on a bad setting."""
    parser = argparse.ArgumentParser(prog=prog)
    add_flags(parser)
    if extra:
        extra(parser)
    ns = parser.parse_args(argv)
    try:
        return load(ns), ns
    except InvalidArgument as exc:
        parser.exit(2, f"{prog}: configuration error: {exc}\n")


# -- the checked configuration riklet run hands the services ---------------------------------

def inputs(environ: Mapping[str, str]) -> dict[str, Any]:
    """What :func:`load` reads, given no flags: every variable it looks at (unset as None) and
    every file (its digest; None when absent, as the CHaS file's default path may be)."""
    names = ["RIKLET_CONFIG", "CHAS_CONFIG", *(s.env for s in SETTINGS if s.env)]
    chas = chas_config_path(None, environ) or CHAS_CONFIG_PATH   # the default: its absence counts
    files = [p for p in (environ.get("RIKLET_CONFIG"), chas) if p]
    return {"env": {n: environ.get(n) or None for n in names}, "files": {p: digest(p) for p in files}}


def write_checked(cfg: Config, environ: Mapping[str, str], path: str) -> None:
    """``cfg``, loaded from ``environ`` with no flags, for :func:`common.config.read_checked`:
    written whole or not at all, readable by root alone (it holds the settings' variables)."""
    values = {s.attr: getattr(cfg, s.attr) for s in SETTINGS}
    record = {"version": CHECKED_VERSION, "inputs": inputs(environ), "values": values,
              "sources": dict(cfg.sources)}
    write_json(path, record, mode=0o600)

