"""``riklet run``: start the agent in the foreground under supervisord with embedded defaults.

Sets the environment supervisord.conf reads (RIKLET_RUN_DIR, RIKLET_STATE_DIR, RIKLET_CONFIG)
when the caller has not, makes this process a child subreaper so that shims orphaned by a
manager restart are reaped by supervisord rather than left as zombies, and execs supervisord.
"""

from __future__ import annotations

import argparse
import os
import sys

from common.errors import Unavailable
from services.manager.procs import become_subreaper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def defaults(environ: dict[str, str], root: str = ROOT) -> dict[str, str]:
    env = dict(environ)
    env.setdefault("RIKLET_RUN_DIR", os.path.join(root, ".riklet", "run"))
    env.setdefault("RIKLET_STATE_DIR", os.path.join(root, ".riklet", "state"))
    env.setdefault("RIKLET_CONFIG", "")
    bindir = os.path.dirname(sys.executable)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", os.defpath)
    return env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="riklet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start the four services under supervisord (foreground)")
    run.add_argument("--config", help="YAML configuration file (env RIKLET_CONFIG)")
    run.add_argument("--supervisord-conf", default=os.path.join(ROOT, "supervisord.conf"))
    args = parser.parse_args(argv)

    env = defaults(dict(os.environ))
    if args.config:
        env["RIKLET_CONFIG"] = os.path.abspath(args.config)
    for key in ("RIKLET_RUN_DIR", "RIKLET_STATE_DIR"):
        env[key] = os.path.abspath(env[key])
        os.makedirs(env[key], mode=0o700, exist_ok=True)
    os.makedirs(os.path.join(env["RIKLET_STATE_DIR"], "log"), mode=0o700, exist_ok=True)
    try:
        become_subreaper()
    except Unavailable as exc:
        print(f"riklet: {exc}; orphaned shims may linger as zombies", file=sys.stderr)
    supervisord = os.path.join(os.path.dirname(sys.executable), "supervisord")
    os.execve(supervisord, [supervisord, "-n", "-c", args.supervisord_conf], env)


if __name__ == "__main__":
    main()
