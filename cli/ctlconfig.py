"""rikletctl's own config file, as kubectl's kubeconfig: named contexts (how to reach one
agent: endpoint, token file, TLS files) and the current one.

Found at ``--config``, else ``$RIKLETCONFIG``, else ``$XDG_CONFIG_HOME/riklet/config.yaml``
(``~/.config/riklet/config.yaml``). A missing file is an empty one. The file::

    current-context: lab
    contexts:
    - name: lab
      endpoint: 10.0.0.7:9091
      token-file: ~/.config/riklet/lab.token
      tls-ca: ~/.config/riklet/lab-ca.pem      # TLS when set; tls-cert/tls-key for mutual TLS

A bad file is refused whole, with an error naming the key at fault (``contexts[1].endpoint``).
Paths may start with ``~``; relative ones are relative to the file. Written mode 0600 (it
names token files, and may sit beside them), atomically.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from common.errors import InvalidArgument

KEYS = ("endpoint", "token-file", "tls-ca", "tls-cert", "tls-key")
_ENDPOINT = re.compile(r"^(unix:.+|(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+):(\d{1,5}))$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:/-]{0,252}$")


@dataclass(frozen=True)
class Context:
    name: str
    endpoint: str | None = None
    token_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def get(self, key: str) -> str | None:
        value: str | None = getattr(self, key.replace("-", "_"))
        return value

    def doc(self) -> dict[str, Any]:
        return {"name": self.name, **{k: self.get(k) for k in KEYS if self.get(k) is not None}}


@dataclass(frozen=True)
class CtlConfig:
    path: str
    current: str | None = None
    contexts: dict[str, Context] = field(default_factory=dict)

    def doc(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.current:
            out["current-context"] = self.current
        out["contexts"] = [c.doc() for c in self.contexts.values()]
        return out

    def context(self, name: str | None) -> Context | None:
        """The context ``name`` (an error naming it if there is none), else the current one."""
        name = name or self.current
        if not name:
            return None
        if name not in self.contexts:
            known = ", ".join(self.contexts) or "none"
            raise InvalidArgument(f"{self.path}: no context {name!r} (contexts: {known})",
                                  "--context" if name != self.current else "current-context")
        return self.contexts[name]


def default_path(env: dict[str, str] | os._Environ[str] = os.environ) -> str:
    if env.get("RIKLETCONFIG"):
        return env["RIKLETCONFIG"]
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "riklet", "config.yaml")


def _endpoint(value: str, where: str) -> str:
    m = _ENDPOINT.match(value)
    if not m or (m.group(3) and not 0 < int(m.group(3)) < 65536):
        raise InvalidArgument(f"expected HOST:PORT (or unix:PATH), got {value!r}", where)
    return value


def _path(value: str, base: str) -> str:
    value = os.path.expanduser(value)
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(base, value))


def parse(text: str, path: str) -> CtlConfig:
    """The file's text as a :class:`CtlConfig`; :class:`InvalidArgument` naming the key at fault."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"{path}: not YAML: {exc}", "config") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidArgument(f"{path}: must be a mapping", "config")
    for key in data:
        if key not in ("current-context", "contexts", "apiVersion", "kind"):
            raise InvalidArgument(f"{path}: unknown key (known: current-context, contexts)", str(key))
    current = data.get("current-context")
    if current is not None and not isinstance(current, str):
        raise InvalidArgument(f"{path}: must be a context name", "current-context")
    raw = [] if data.get("contexts") is None else data["contexts"]
    if not isinstance(raw, list):
        raise InvalidArgument(f"{path}: must be a list of contexts", "contexts")
    base = os.path.dirname(os.path.abspath(path))
    contexts: dict[str, Context] = {}
    for i, entry in enumerate(raw):
        where = f"contexts[{i}]"
        if not isinstance(entry, dict):
            raise InvalidArgument(f"{path}: must be a mapping with a name", where)
        values: dict[str, str] = {}
        for key, value in entry.items():
            if key != "name" and key not in KEYS:
                raise InvalidArgument(f"{path}: unknown key (known: name, {', '.join(KEYS)})",
                                      f"{where}.{key}")
            if not isinstance(value, str) or not value:
                raise InvalidArgument(f"{path}: must be a non-empty string", f"{where}.{key}")
            values[key] = value
        name = values.get("name")
        if not name or not _NAME.match(name):
            raise InvalidArgument(f"{path}: a context needs a name (letters, digits, . _ - @ : /)",
                                  f"{where}.name")
        if name in contexts:
            raise InvalidArgument(f"{path}: context {name!r} is defined twice", f"{where}.name")
        if "endpoint" in values:
            _endpoint(values["endpoint"], f"{path}: {where}.endpoint")
        files = {k.replace("-", "_"): _path(values[k], base) for k in KEYS[1:] if k in values}
        contexts[name] = Context(name, values.get("endpoint"), **files)
    if current and current not in contexts:
        raise InvalidArgument(f"{path}: names no context of the file ({current!r})", "current-context")
    return CtlConfig(path, current or None, contexts)


def _visible(path: str) -> bool:
    try:
        os.stat(path)
    except OSError:
        return False
    return True


def load(path: str) -> CtlConfig:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read(1 << 20)
    except FileNotFoundError:
        return CtlConfig(path)
    except PermissionError as exc:
        # A directory on the way that this user may not search (sudo -u nobody keeps HOME=/root):
        # nothing can be known of the file, so it is treated as absent. A file that is there but
        # not readable is an error.
        if not _visible(path):
            return CtlConfig(path)
        raise InvalidArgument(f"{path}: cannot read it: {exc}", "config") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{path}: cannot read it: {exc}", "config") from None
    return parse(text, path)


def save(cfg: CtlConfig) -> None:
    """The file, replaced whole (0600) so a reader never sees half of it."""
    folder = os.path.dirname(os.path.abspath(cfg.path))
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".config-", dir=folder)   # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            yaml.safe_dump(cfg.doc(), fh, sort_keys=False, default_flow_style=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, cfg.path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def set_context(cfg: CtlConfig, name: str, values: dict[str, str | None]) -> CtlConfig:
    """``cfg`` with context ``name`` made or updated: the keys in ``values`` that are not None
    replace the context's (an empty string removes one)."""
    if not _NAME.match(name):
        raise InvalidArgument("a context name is letters, digits, . _ - @ : /", "NAME")
    ctx = cfg.contexts.get(name) or Context(name)
    changes: dict[str, str | None] = {}
    for key, value in values.items():
        if value is None:
            continue
        if value and key == "endpoint":
            _endpoint(value, "--endpoint")
        changes[key.replace("-", "_")] = (_path(value, os.getcwd()) if value and key != "endpoint"
                                          else value or None)
    return replace(cfg, contexts={**cfg.contexts, name: replace(ctx, **changes)})  # type: ignore[arg-type]
