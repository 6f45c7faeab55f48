"""``riklet run``: start the agent in the foreground under supervisord with embedded defaults.

Sets the environment supervisord.conf reads (RIKLET_RUN_DIR, RIKLET_STATE_DIR, RIKLET_CONFIG)
when the caller has not, checks the configuration once (a bad setting exits 2 before anything
is made or started) and writes it for the services (common.config.read_checked), makes sure no
other agent runs from the same run dir and stops what a previous one left running there
(services.takeover), makes this process a child subreaper so that shims orphaned by a manager
restart are reaped by supervisord rather than left as zombies, and execs supervisord.

``riklet config show`` prints the effective configuration and where each value came from,
without any service running.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from common import auth, config, configload, paths, sdnotify
from common.errors import InvalidArgument, Unavailable
from common.parentwatch import SUPERVISOR_PID_ENV
from common.subreaper import become_subreaper
from services import takeover

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# An installed wheel carries supervisord's configuration in the package (made by the build hook,
# setup.py, from the checkout's top-level supervisord.conf, the one source); a checkout uses that.
PACKAGED_CONF = os.path.join(ROOT, "services", "supervisord.conf")


def default_supervisord_conf() -> str:
    return PACKAGED_CONF if paths.installed() else os.path.join(ROOT, "supervisord.conf")


def defaults(environ: dict[str, str], root: str = ROOT) -> dict[str, str]:
    env = dict(environ)
    env.setdefault("RIKLET_RUN_DIR", os.path.normpath(os.path.join(root, paths.default_run_dir())))
    env.setdefault("RIKLET_STATE_DIR", os.path.normpath(os.path.join(root, paths.default_state_dir())))
    env.setdefault("RIKLET_CONFIG", "")
    bindir = os.path.dirname(sys.executable)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", os.defpath)
    return env


def effective(cfg: config.Config) -> dict[str, dict[str, Any]]:
    """Every setting, sorted by key: ``{key: {"value": ..., "source": ...}}``, secrets masked."""
    out: dict[str, dict[str, Any]] = {}
    for s in sorted(configload.SETTINGS, key=lambda s: s.key):
        value = getattr(cfg, s.attr)
        if s.key in configload.SECRET_KEYS and value is not None:
            value = "<redacted>"
        elif isinstance(value, tuple):
            value = list(value)
        out[s.key] = {"value": value, "source": configload.describe_source(s.key, cfg.sources[s.key])}
    return out


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def show_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    try:
        cfg = config.load(args)
    except InvalidArgument as exc:
        parser.exit(2, f"riklet: configuration error: {exc}\n")
    table = effective(cfg)
    if args.output == "json":
        print(json.dumps(table, indent=2))
        return
    rows = [("KEY", "VALUE", "SOURCE")] + [(k, _text(e["value"]), e["source"]) for k, e in table.items()]
    wk, wv = (max(len(r[i]) for r in rows) for i in (0, 1))
    for key, value, source in rows:
        print(f"{key:<{wk}}  {value:<{wv}}  {source}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="riklet", description=(__doc__ or "riklet").splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start the four services under supervisord (foreground)")
    run.add_argument("--config", help="YAML configuration file (env RIKLET_CONFIG)")
    run.add_argument("--chas-config", help="CHaS node-agent YAML file (env CHAS_CONFIG; default "
                     f"{configload.CHAS_CONFIG_PATH} when it exists)")
    run.add_argument("--supervisord-conf", default=default_supervisord_conf(),
                     help="supervisord's configuration (default: the package's, or the checkout's)")
    conf = sub.add_parser("config", help="inspect the configuration").add_subparsers(
        dest="action", metavar="show", required=True)
    show = conf.add_parser("show", help="print every setting, its value and where it came from")
    configload.add_flags(show)
    show.add_argument("-o", "--output", choices=("text", "json"), default="text")
    args = parser.parse_args(argv)
    if args.command == "config":
        show_config(args, show)
        return

    env = defaults(dict(os.environ))
    if args.config:
        env["RIKLET_CONFIG"] = os.path.abspath(args.config)
    if args.chas_config:
        env["CHAS_CONFIG"] = os.path.abspath(args.chas_config)
    for key in ("RIKLET_RUN_DIR", "RIKLET_STATE_DIR"):
        env[key] = os.path.abspath(env[key])
    try:  # checked once, here: a bad setting stops the start before anything is made
        cfg = configload.load(None, env)
    except InvalidArgument as exc:
        parser.exit(2, f"riklet: configuration error: {exc}\n")
    for key in ("RIKLET_RUN_DIR", "RIKLET_STATE_DIR"):
        os.makedirs(env[key], mode=0o700, exist_ok=True)
    os.makedirs(os.path.join(env["RIKLET_STATE_DIR"], "log"), mode=0o700, exist_ok=True)
    auth.open_to_group(env["RIKLET_STATE_DIR"])  # rikletctl of the riklet group reaches the token
    prepare(env["RIKLET_RUN_DIR"], env["RIKLET_STATE_DIR"])
    # The services take the checked settings while the files and variables they came from
    # hold (common.config.parse_args): they import neither msgspec nor PyYAML for them.
    checked = os.path.join(env["RIKLET_RUN_DIR"], "config.json")
    configload.write_checked(cfg, env, checked)
    env[config.CHECKED_ENV] = checked
    # exec keeps the pid: the services compare their parent with it (common.parentwatch).
    env[SUPERVISOR_PID_ENV] = str(os.getpid())
    hand_notify_socket(env)
    try:
        become_subreaper()
    except Unavailable as exc:
        print(f"riklet: {exc}; orphaned shims may linger as zombies", file=sys.stderr)
    supervisord = os.path.join(os.path.dirname(sys.executable), "supervisord")
    os.execve(supervisord, [supervisord, "-n", "-c", args.supervisord_conf], env)


def hand_notify_socket(env: dict[str, str]) -> None:
    """systemd's NOTIFY_SOCKET and watchdog variables reach the monitor only (its
    supervisord.conf entry maps them back from RIKLET_*, and it takes them out of its own
    environment): another service, or a helper or shim it starts, that happens to honour
    NOTIFY_SOCKET cannot speak for the agent's unit."""
    for name in sdnotify.ENV:
        env[f"RIKLET_{name}"] = env.pop(name, "")


def prepare(run_dir: str, state_dir: str) -> int:
    """Claim the run dir and stop what a previous agent left there; the fd of the run dir's lock,
    left open so that supervisord holds it after the exec. Exits 1 with the reason when another
    agent is alive."""
    try:
        fd = takeover.claim(run_dir)
        takeover.take_over(run_dir, lambda line: print(f"riklet: {line}", file=sys.stderr, flush=True))
    except Unavailable as exc:
        sys.exit(f"riklet: {exc.message}")
    locks = [os.path.join(d, "memory.lock") for d in (run_dir, state_dir)]
    for path, pid in takeover.lock_holders(locks).items():
        print(f"riklet: {path} is held by pid {pid}, not a service of this run dir: left alone; "
              "memory cannot start until it lets go", file=sys.stderr, flush=True)
    return fd


if __name__ == "__main__":
    main()
