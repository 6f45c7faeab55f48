"""The manager's side of the shim protocol: the spec it gives, the status it reads, stopping.

The pod spec is defined here (:class:`PodSpec`, :func:`parse_spec`; ``POD_DIR/spec.json`` when
it is kept in a file); the shim rewrites
``POD_DIR/status.json`` atomically on every change, and :func:`read_status` reads it. A pid alone
names nothing once the process is gone, so liveness always pairs it with its start time.

The compiled shim (``shim.c``) does not read JSON: the manager turns the validated spec, with
the cgroups prepared for it, into the shim's input on its stdin (:mod:`.shimspec`), a sequence of
``KEY LEN:BYTES\n`` records (LEN the decimal byte length of BYTES, which hold no NUL): pod
records (``pod``, ``uid``, ``grace``, ``notify``, ``log_max``, ``log_files``, ``backoff_*``,
``shm_size``, ``pod_cgroup``...), then per container a ``container NAME`` record followed by its
own (``argv``..., ``env``..., ``cwd``, ``user``, ``policy``, ``log``, ``cgroup``,
``cgroup_dir``..., ``freezer``, ``oom_file``, ``oom_key``, ``cgroup_error``). The list with
meanings is at the top of shim.c.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import selectors
import signal
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from common.errors import InvalidArgument, NotFound

# Re-exported: the shim protocol's callers read them here.
from common.jsonfile import read_json as read_json
from common.jsonfile import write_json as write_json
from common.procstat import pid_alive as pid_alive
from common.procstat import proc_start_time as proc_start_time
from common.procstat import proc_stat as proc_stat

SPEC_FILE = "spec.json"
STATUS_FILE = "status.json"
SHIM_LOG = "shim.log"
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes, the last one a NUL
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_MISSING = object()


class RestartPolicy(StrEnum):
    ALWAYS = "Always"
    ON_FAILURE = "OnFailure"
    NEVER = "Never"


@dataclass(frozen=True)
class LogSpec:
    dir: str
    max_size: int = 10 * 1024 * 1024
    max_files: int = 3


@dataclass(frozen=True)
class BackoffSpec:
    initial: float = 1.0
    max: float = 300.0
    reset: float = 600.0  # a run longer than this puts the delay back to initial


@dataclass(frozen=True)
class ContainerSpec:
    name: str
    command: tuple[str, ...]
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    working_dir: str | None = None
    cpu_millis: int | None = None
    memory_bytes: int | None = None
    restart_policy: RestartPolicy = RestartPolicy.ALWAYS
    user: tuple[int, int] | None = None   # (uid, gid) to run as; None: the shim's own
    # (source, target, read-only) bind mounts, in the container's own mount namespace
    mounts: tuple[tuple[str, str, bool], ...] = ()


@dataclass(frozen=True)
class PodSpec:
    pod: str
    uid: str
    cgroup_parent: str
    log: LogSpec
    containers: tuple[ContainerSpec, ...]
    grace_period: float = 30.0
    backoff: BackoffSpec = BackoffSpec()
    notify: str | None = None  # a unix datagram socket told the pod's name after each status write
    # (directory, size or 0) tmpfs mounts in the pod's mount namespace: Memory emptyDirs
    tmpfs: tuple[tuple[str, int], ...] = ()


class Reason(StrEnum):
    """Why a container's run ended, as status.json reports it."""

    COMPLETED = "Completed"
    ERROR = "Error"
    SIGNALED = "Signaled"
    OOM_KILLED = "OOMKilled"
    START_ERROR = "StartError"
    CGROUPS_UNAVAILABLE = "CgroupsUnavailable"


@dataclass(frozen=True)
class Termination:
    exit_code: int | None
    signal: str | None
    reason: Reason
    message: str | None

    def to_json(self, finished_at: float) -> dict[str, Any]:
        return {
            "exitCode": self.exit_code,
            "signal": self.signal,
            "reason": self.reason.value,
            "message": self.message,
            "finishedAt": finished_at,
        }


def classify(wait_status: int, oom_killed: bool) -> Termination:
    """How a container ended, from its waitpid status and whether its cgroup saw an OOM kill."""
    if not os.WIFSIGNALED(wait_status):
        code = os.waitstatus_to_exitcode(wait_status)
        return Termination(code, None, Reason.COMPLETED if code == 0 else Reason.ERROR, None)
    number = os.WTERMSIG(wait_status)
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"SIG{number}"
    if number == signal.SIGKILL and oom_killed:
        return Termination(128 + number, name, Reason.OOM_KILLED, "killed for exceeding its memory limit")
    return Termination(128 + number, name, Reason.SIGNALED, f"killed by {name}")


def should_restart(policy: RestartPolicy, end: Termination) -> bool:
    if end.reason == Reason.CGROUPS_UNAVAILABLE:
        return False  # a retry would meet the same machine
    if policy == RestartPolicy.ON_FAILURE:
        return end.exit_code != 0
    return policy == RestartPolicy.ALWAYS


def next_delay(previous: float | None, ran_for: float, backoff: BackoffSpec) -> float:
    """Back-off before the next restart: doubling per consecutive restart, reset by a long run."""
    if previous is None or ran_for >= backoff.reset:
        return backoff.initial
    return min(previous * 2, backoff.max)


def parse_spec(data: object) -> PodSpec:
    """A validated PodSpec from decoded JSON; InvalidArgument names the field at fault."""
    obj = _object(data, "", PodSpec)
    containers = _get(obj, "containers", "", list)
    if not containers:
        raise InvalidArgument("at least one container is required", "containers")
    parsed = tuple(_container(c, f"containers[{i}]") for i, c in enumerate(containers))
    names = [c.name for c in parsed]
    if len(set(names)) != len(names):
        raise InvalidArgument("container names must be unique", "containers")
    parent = _get(obj, "cgroup_parent", "", str)
    if not all(_NAME.fullmatch(part) for part in parent.split("/")):
        raise InvalidArgument(f"not a relative cgroup path: {parent!r}", "cgroup_parent")
    return PodSpec(
        pod=_name(obj, "pod", ""),
        uid=_get(obj, "uid", "", str),
        cgroup_parent=parent,
        log=_log(_get(obj, "log", "", dict)),
        containers=parsed,
        grace_period=_number(obj, "grace_period", "", 30.0),
        backoff=_backoff(_get(obj, "backoff", "", dict, {})),
        notify=_notify(_get(obj, "notify", "", (str, type(None)), None)),
        tmpfs=tuple((_abs(d, "tmpfs"), _size(n, "tmpfs")) for d, n in _pairs(obj, "tmpfs", "", 2)),
    )


def _notify(path: str | None) -> str | None:
    if path is not None and (not os.path.isabs(path) or len(path.encode()) > _SUN_PATH_MAX):
        raise InvalidArgument(f"must be an absolute path of at most {_SUN_PATH_MAX} bytes", "notify")
    return path


def spec_to_json(spec: PodSpec) -> dict[str, Any]:
    """The spec as plain JSON types (lists, strings), as spec.json holds it."""
    data: dict[str, Any] = json.loads(json.dumps(dataclasses.asdict(spec)))
    return data


def load_spec(pod_dir: str) -> PodSpec:
    path = os.path.join(pod_dir, SPEC_FILE)
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError as exc:
        raise NotFound(f"{path} does not exist", "spec") from exc
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"{path}: {exc}", "spec") from exc
    return parse_spec(data)


def read_status(pod_dir: str) -> dict[str, Any] | None:
    """The shim's last status, or None when it is missing or unreadable."""
    try:
        with open(os.path.join(pod_dir, STATUS_FILE), "rb") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("shim_pid"), int):
        return None
    return data


def stop(pod_dir: str, wait: float) -> bool:
    """SIGTERM the pod's shim and wait up to `wait` seconds; whether it has exited."""
    status = read_status(pod_dir)
    if status is None:
        return True
    pid, start = status["shim_pid"], status.get("shim_start")
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        # checked after pidfd_open, so the pidfd is known to refer to the shim, not to a reuse
        if not isinstance(start, int) or not pid_alive(pid, start):
            return True
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        with selectors.DefaultSelector() as sel:
            sel.register(pidfd, selectors.EVENT_READ)
            return bool(sel.select(wait)) or not pid_alive(pid, start)
    finally:
        os.close(pidfd)


def _container(data: object, where: str) -> ContainerSpec:
    obj = _object(data, where, ContainerSpec)
    command = _get(obj, "command", where, list)
    if not command or not all(isinstance(a, str) for a in command) or not command[0]:
        raise InvalidArgument("expected a non-empty list of strings", f"{where}.command")
    env = _get(obj, "env", where, dict, {})
    if not all(isinstance(k, str) and k and "=" not in k and isinstance(v, str) for k, v in env.items()):
        raise InvalidArgument("expected an object of strings, names without '='", f"{where}.env")
    policy = _get(obj, "restart_policy", where, str, RestartPolicy.ALWAYS.value)
    if policy not in {p.value for p in RestartPolicy}:
        choices = ", ".join(p.value for p in RestartPolicy)
        raise InvalidArgument(f"unknown policy {policy!r} ({choices})", f"{where}.restart_policy")
    user = obj.get("user")
    if user is not None and not (isinstance(user, list) and len(user) == 2 and all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**32 for i in user)):
        raise InvalidArgument("expected [uid, gid] or null", f"{where}.user")
    return ContainerSpec(
        user=(int(user[0]), int(user[1])) if user is not None else None,
        name=_name(obj, "name", where),
        command=tuple(command),
        env=dict(env),
        working_dir=_get(obj, "working_dir", where, (str, type(None)), None),
        cpu_millis=_positive_int(obj, "cpu_millis", where, None),
        memory_bytes=_positive_int(obj, "memory_bytes", where, None),
        restart_policy=RestartPolicy(policy),
        mounts=tuple((_abs(src, f"{where}.mounts"), _abs(dst, f"{where}.mounts"), bool(ro))
                     for src, dst, ro in _pairs(obj, "mounts", where, 3)),
    )


def _pairs(obj: dict[str, Any], key: str, where: str, n: int) -> list[list[Any]]:
    """A list of n-item lists (``mounts``, ``tmpfs``)."""
    items = _get(obj, key, where, list, [])
    if not all(isinstance(i, (list, tuple)) and len(i) == n for i in items):
        raise InvalidArgument(f"expected a list of {n}-item lists", _field(where, key))
    return [list(i) for i in items]


def _abs(value: object, field: str) -> str:
    if not isinstance(value, str) or not os.path.isabs(value):
        raise InvalidArgument(f"expected an absolute path, got {value!r}", field)
    return value


def _size(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument("expected a size in bytes (0: the kernel's default)", field)
    return value


def _log(obj: dict[str, Any]) -> LogSpec:
    _object(obj, "log", LogSpec)
    directory = _get(obj, "dir", "log", str)
    if not os.path.isabs(directory):
        raise InvalidArgument("must be an absolute path", "log.dir")
    defaults = LogSpec(directory)
    max_size = _positive_int(obj, "max_size", "log", None) or defaults.max_size
    max_files = _positive_int(obj, "max_files", "log", None) or defaults.max_files
    return LogSpec(directory, max_size, max_files)


def _backoff(obj: dict[str, Any]) -> BackoffSpec:
    _object(obj, "backoff", BackoffSpec)
    defaults = BackoffSpec()
    spec = BackoffSpec(
        _number(obj, "initial", "backoff", defaults.initial),
        _number(obj, "max", "backoff", defaults.max),
        _number(obj, "reset", "backoff", defaults.reset),
    )
    if spec.initial <= 0 or spec.max < spec.initial:
        raise InvalidArgument("need 0 < initial <= max", "backoff")
    return spec


def _object(data: object, where: str, cls: type) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise InvalidArgument("expected an object", where or "spec")
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise InvalidArgument(f"unknown key {unknown[0]!r}", where or "spec")
    return data


def _field(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _get(
    obj: dict[str, Any], key: str, where: str, kind: type | tuple[type, ...], default: Any = _MISSING
) -> Any:
    field = _field(where, key)
    if key not in obj:
        if default is _MISSING:
            raise InvalidArgument("is required", field)
        return default
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise InvalidArgument(f"wrong type {type(value).__name__}", field)
    return value


def _name(obj: dict[str, Any], key: str, where: str) -> str:
    value: str = _get(obj, key, where, str)
    if not _NAME.fullmatch(value):
        raise InvalidArgument(f"{value!r} is not a name (letters, digits, '-', '_', '.')", _field(where, key))
    return value


def _number(obj: dict[str, Any], key: str, where: str, default: float) -> float:
    value = float(_get(obj, key, where, (int, float), default))
    if not 0 <= value < math.inf:
        raise InvalidArgument("must be a finite number, not negative", _field(where, key))
    return value


def _positive_int(obj: dict[str, Any], key: str, where: str, default: int | None) -> int | None:
    value: int | None = _get(obj, key, where, (int, type(None)), default)
    if value is not None and value <= 0:
        raise InvalidArgument("must be positive", _field(where, key))
    return value
