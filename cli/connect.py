"""How rikletctl reaches an agent: the global flags (``--endpoint``, ``--token-file``,
``--tls-*``, ``--context``, ``--config``, accepted before or after the command), and their
precedence: a flag, else its environment variable, else the context (``--context`` or the
config file's current one), else the built-in default. Plus ``rikletctl config ...``, which
reads and edits the config file (:mod:`cli.ctlconfig`) without talking to any agent."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from cli import ctlconfig, output
from common import auth

DEFAULT_ENDPOINT = "127.0.0.1:9091"
# flag, its environment variable, the context's key
FLAGS = (("--endpoint", "RIKLET_ENDPOINT", "endpoint", "Node API address (default 127.0.0.1:9091)"),
         ("--token-file", "RIKLET_TOKEN_FILE", "token-file",
          "the agent's API token file (default: the agent's <state_dir>/api-token); env RIKLET_TOKEN "
          "gives the token itself"),
         ("--tls-ca", "RIKLET_CLIENT_CA", "tls-ca", "CA certificate (PEM) of an agent serving TLS"),
         ("--tls-cert", "RIKLET_CLIENT_CERT", "tls-cert", "client certificate (PEM) for mutual TLS"),
         ("--tls-key", "RIKLET_CLIENT_KEY", "tls-key", "its key"))


def add_flags(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    """The global flags; ``suppress``: on a command's parser, where a flag left out must not
    hide the one given before the command."""
    default = argparse.SUPPRESS if suppress else None
    for flag, env, _key, helptext in FLAGS:
        parser.add_argument(flag, default=default, help=argparse.SUPPRESS if suppress else
                            f"{helptext} (env {env})")
    parser.add_argument("--context", default=default,
                        help=argparse.SUPPRESS if suppress else "the config file's context to use")
    parser.add_argument("--config", default=default, help=argparse.SUPPRESS if suppress else
                        "rikletctl's config file (env RIKLETCONFIG, default ~/.config/riklet/config.yaml)")


def add_to_commands(sub: Any) -> None:
    """The global flags on every command too (``rikletctl get pods --context lab``)."""
    for parser in {id(p): p for p in sub.choices.values()}.values():
        add_flags(parser, suppress=True)


@dataclass(frozen=True)
class Target:
    endpoint: str
    token: str | None
    token_file: str            # where the token came from (for the "wants its token" hint)
    tls: tuple[str | None, str | None, str | None]


def config_path(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> str:
    return str(args.config) if args.config else ctlconfig.default_path(dict(env))


def resolve(args: argparse.Namespace, default_token_file: Callable[[], str],
            env: Mapping[str, str] = os.environ) -> Target:
    ctx = ctlconfig.load(config_path(args, env)).context(args.context)

    def pick(flag: str, var: str, key: str) -> str | None:
        value = getattr(args, flag[2:].replace("-", "_"), None) or env.get(var)
        return value or (ctx.get(key) if ctx else None)

    endpoint = pick("--endpoint", "RIKLET_ENDPOINT", "endpoint") or DEFAULT_ENDPOINT
    tls = (pick("--tls-ca", "RIKLET_CLIENT_CA", "tls-ca"),
           pick("--tls-cert", "RIKLET_CLIENT_CERT", "tls-cert"),
           pick("--tls-key", "RIKLET_CLIENT_KEY", "tls-key"))
    if args.token_file:
        return Target(endpoint, auth.read_token(args.token_file), args.token_file, tls)
    if env.get("RIKLET_TOKEN"):
        return Target(endpoint, env["RIKLET_TOKEN"], "RIKLET_TOKEN", tls)
    path = pick("--token-file", "RIKLET_TOKEN_FILE", "token-file") or default_token_file()
    return Target(endpoint, auth.read_token(path), path, tls)


def open_channel(endpoint: str, token: str | None, ca: str | None = None, cert: str | None = None,
                 key: str | None = None) -> grpc.Channel:
    if ca or cert:
        def read(path: str | None) -> bytes | None:
            if not path:
                return None
            with open(path, "rb") as fh:
                return fh.read()
        creds = grpc.ssl_channel_credentials(read(ca), read(key), read(cert))
        channel = grpc.secure_channel(endpoint, creds)
    else:
        channel = grpc.insecure_channel(endpoint)
    return grpc.intercept_channel(channel, *auth.grpc_client_interceptors(token))


# -- rikletctl config ... --------------------------------------------------------------------

def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    sp = add("config", config_cmd, "rikletctl's config file: view, get-contexts, current-context, "
             "use-context NAME, set-context NAME [--endpoint ...], delete-context NAME")
    sp.set_defaults(local=True)
    acts = sp.add_subparsers(dest="action", required=True)
    view = acts.add_parser("view", help="print the config file")
    view.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    gc = acts.add_parser("get-contexts", help="list the contexts (* marks the current one)")
    gc.add_argument("-o", "--output", choices=["table", "name"], default="table")
    acts.add_parser("current-context", help="print the current context's name")
    for name, helptext in (("use-context", "make NAME the current context"),
                           ("delete-context", "remove context NAME")):
        acts.add_parser(name, help=helptext).add_argument("name", metavar="NAME")
    sc = acts.add_parser("set-context", help="make or update context NAME ('' removes a key)")
    sc.add_argument("name", metavar="NAME")
    for flag, _env, key, helptext in FLAGS:
        sc.add_argument(flag, dest=f"set_{key.replace('-', '_')}", help=helptext)
    sc.add_argument("--use", action="store_true", help="and make it the current context")
    for parser in acts.choices.values():   # `config view --config FILE` too
        parser.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def config_cmd(_ctl: Any, args: argparse.Namespace) -> int:
    path = config_path(args)
    cfg = ctlconfig.load(path)
    if args.action == "view":
        print(output.dump(cfg.doc(), args.output).rstrip("\n"))
    elif args.action == "get-contexts":
        if args.output == "name":
            for name in cfg.contexts:
                print(name)
            return 0
        rows = [("CURRENT", "NAME", "ENDPOINT", "TOKEN-FILE", "TLS")]
        rows += [("*" if c.name == cfg.current else "", c.name, c.endpoint or "-", c.token_file or "-",
                  "mutual" if c.tls_cert else "yes" if c.tls_ca else "no") for c in cfg.contexts.values()]
        for line in output.align(rows):
            print(line)
    elif args.action == "current-context":
        if not cfg.current:
            print(f"rikletctl: {path} sets no current context", file=sys.stderr)
            return 1
        print(cfg.current)
    elif args.action == "use-context":
        cfg.context(args.name)   # refused when there is no such context
        ctlconfig.save(ctlconfig.replace(cfg, current=args.name))
        print(f'Switched to context "{args.name}".')
    elif args.action == "delete-context":
        cfg.context(args.name)
        rest = {k: v for k, v in cfg.contexts.items() if k != args.name}
        ctlconfig.save(ctlconfig.replace(cfg, contexts=rest,
                                         current=None if cfg.current == args.name else cfg.current))
        print(f'Deleted context "{args.name}".')
    else:
        values = {key: getattr(args, f"set_{key.replace('-', '_')}") for key in ctlconfig.KEYS}
        existed = args.name in cfg.contexts
        cfg = ctlconfig.set_context(cfg, args.name, values)
        ctlconfig.save(ctlconfig.replace(cfg, current=args.name) if args.use else cfg)
        print(f'Context "{args.name}" {"modified" if existed else "created"}.')
    return 0
