"""Shell completion: ``rikletctl completion bash|zsh`` prints a script that asks rikletctl
itself what may come next (``rikletctl __complete WORD... CURRENT``, one candidate a line):
commands, flags, the choices of a flag or argument, and the names the live agent knows (pods,
volumes, images; the config file's contexts). One walker over rikletctl's own argparse parser,
so a command another module adds completes with no change here. An agent that does not answer
within a second or two completes no names (never an error on the terminal)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from cli import connect, ctlconfig
from common.errors import RikletError
from common.pb import node_pb2 as npb
from common.pb import node_pb2_grpc as npb_grpc

FILES = "__files__"   # "complete file names": the scripts hand this over to the shell
TIMEOUT = 2.0
# (command, argument) → the kind of name it takes
NAMES = {**{(c, d): "pods" for c in ("get", "describe", "logs", "stop", "resize", "exec", "watch", "top")
            for d in ("name", "pod")},
         ("delete", "names"): "pods", ("rm", "names"): "pods", ("stop", "names"): "pods",
         ("events", "pod"): "pods", ("volume", "names"): "volumes", ("volumes", "names"): "volumes",
         ("image", "refs"): "images", ("images", "refs"): "images",
         ("use-context", "name"): "contexts", ("delete-context", "name"): "contexts",
         ("set-context", "name"): "contexts"}

BASH = r'''# bash completion for rikletctl: source <(rikletctl completion bash)
_rikletctl() {
    local cur="${COMP_WORDS[COMP_CWORD]}" out IFS=$'\n'
    out=$("${COMP_WORDS[0]}" __complete "${COMP_WORDS[@]:1:COMP_CWORD}" 2>/dev/null) || return 0
    if [[ "$out" == __files__ ]]; then
        COMPREPLY=($(compgen -f -- "$cur"))
    else
        COMPREPLY=($(compgen -W "$out" -- "$cur"))
    fi
}
complete -o default -F _rikletctl rikletctl
'''

ZSH = r'''#compdef rikletctl
# zsh completion for rikletctl: source <(rikletctl completion zsh), or save it as _rikletctl in
# a directory of $fpath
_rikletctl() {
    local -a names
    names=("${(@f)$(${words[1]} __complete "${(@)words[2,CURRENT]}" 2>/dev/null)}")
    if [[ "${names[1]}" == __files__ ]]; then
        _files
    elif (( ${#names} )) && [[ -n "${names[1]}" ]]; then
        compadd -- "${names[@]}"
    fi
}
if [[ "${funcstack[1]}" == _rikletctl ]]; then
    _rikletctl "$@"
else
    compdef _rikletctl rikletctl
fi
'''


def register(add: Callable[..., argparse.ArgumentParser], _sub: Any) -> None:
    sp = add("completion", script, "print the shell completion script: completion bash|zsh")
    sp.add_argument("shell", choices=["bash", "zsh"])
    sp.set_defaults(local=True)


def script(_ctl: Any, args: argparse.Namespace) -> int:
    sys.stdout.write(BASH if args.shell == "bash" else ZSH)
    return 0


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[Any] | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _option(parser: argparse.ArgumentParser, word: str) -> argparse.Action | None:
    return parser._option_string_actions.get(word.split("=", 1)[0])


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def _positional(parser: argparse.ArgumentParser, index: int) -> argparse.Action | None:
    """The positional argument that the ``index``-th positional word fills."""
    for action in (a for a in parser._actions if not a.option_strings):
        if action.nargs in ("*", "+", argparse.REMAINDER):
            return action
        if index == 0:
            return action
        index -= 1
    return None


def candidates(parser: argparse.ArgumentParser, words: Sequence[str],
               names: Callable[[str, dict[str, str]], list[str]]) -> list[str]:
    """What may stand in the last of ``words`` (the one being typed), given those before it.
    ``names(kind, flags)`` lists the live names of a kind, reached with the global ``flags``
    typed so far (``--context``, ``--endpoint``...)."""
    *done, cur = words or [""]
    current, command, index = parser, "", 0
    pending: argparse.Action | None = None
    flags: dict[str, str] = {}
    for word in done:
        if pending is not None:
            flags[pending.dest] = word
            pending = None
        elif word.startswith("-") and word != "-":
            action = _option(current, word) or _option(parser, word)
            if action is not None and _takes_value(action):
                if "=" in word:
                    flags[action.dest] = word.split("=", 1)[1]
                else:
                    pending = action
        else:
            action = _positional(current, index)
            if isinstance(action, argparse._SubParsersAction) and word in action.choices:
                current, command, index = action.choices[word], word, 0
            else:
                index += 1
    if pending is not None:
        if pending.choices:
            return [str(c) for c in pending.choices]
        return names("contexts", flags) if pending.dest == "context" else [FILES]
    if cur.startswith("-"):
        return sorted({s for a in current._actions for s in a.option_strings if a.help != argparse.SUPPRESS}
                      | ({s for a in parser._actions for s in a.option_strings} - {"-h"}))
    action = _positional(current, index)
    if action is None:
        return []
    if isinstance(action, argparse._SubParsersAction):
        return [c for c in action.choices if not c.startswith("_")]
    if action.choices:
        return [str(c) for c in action.choices]
    kind = NAMES.get((command, action.dest))
    return names(kind, flags) if kind else []


def live_names(kind: str, flags: dict[str, str]) -> list[str]:
    """The names of ``kind`` the agent (or, for contexts, the config file) knows; none when it
    cannot be asked."""
    args = argparse.Namespace(**{k: flags.get(k) for k in
                                 ("endpoint", "token_file", "tls_ca", "tls_cert", "tls_key", "context",
                                  "config")})
    try:
        if kind == "contexts":
            return list(ctlconfig.load(connect.config_path(args)).contexts)
        from cli.rikletctl import default_token_file  # at call time: rikletctl imports this module
        target = connect.resolve(args, default_token_file)
        channel = connect.open_channel(target.endpoint, target.token, *target.tls)
        stub = npb_grpc.NodeStub(channel)
        try:
            if kind == "volumes":
                return [v.name for v in stub.ListVolumes(npb.ListVolumesRequest(), timeout=TIMEOUT).volumes]
            if kind == "images":
                return [i.name for i in stub.ListImages(npb.ListImagesRequest(), timeout=TIMEOUT).images]
            return [p.name for p in stub.List(npb.ListRequest(limit=1000), timeout=TIMEOUT).pods]
        finally:
            channel.close()
    except (grpc.RpcError, OSError, RikletError):
        return []


def complete(parser: argparse.ArgumentParser, words: Sequence[str]) -> int:
    """``rikletctl __complete WORD...``: the candidates, one a line."""
    for name in candidates(parser, words, live_names):
        print(name)
    return 0
