"""Runtime Memory's store: every pod's desired spec and observed status, in SQLite.

The store is the only owner of state. Each write is one transaction that also advances the
event sequence number (``meta.seq``), so the events a write returns carry exactly the numbers
that a later snapshot reports. ``synchronous=FULL`` with WAL: once a write has returned, a
``kill -9`` (or a power cut) loses nothing. The server may run the requests waiting at once in
one :meth:`Store.batch` (group commit: one fsync for them all, each write still on its own).

Writes may carry a request key (the server derives it from the IPC request id, op and args).
It is remembered, in the same transaction, together with the result, so that a client retrying
after a lost reply (memory restarted between commit and reply) gets the original answer instead
of a spurious Conflict or NotFound.

Writes are fenced. Every record carries its ``uid`` and a ``generation`` that advances each time
what is wanted of the pod changes (its spec or its desired state), never for a status. A write
that acts on what an actor read (a status derived from a record, the removal of a deleted pod,
a delete of the instance a scheduler named) names the uid and generation it read, and the store
refuses it with Conflict when the record has moved on: an actor holding a stale copy can never
undo a newer write (the design's "fenced writes"; Kubernetes' ``metadata.generation``).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from common.errors import Conflict, Internal, InvalidArgument, NotFound
from common.ipc import Event
from common.pod import Phase, instance_id_of
from services.memory.eventlog import TABLES as EVENT_TABLES
from services.memory.eventlog import EventLog

DB_NAME = "riklet.db"
SCHEMA_VERSION = 3
MAX_DOC_BYTES = 256 * 1024
DESIRED = ("running", "stopped", "deleted")
# Longer than any client's total patience (MemoryClient gives up after ~10 s).
DEDUPE_WINDOW = 120.0

_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")

# Documents are stored as canonical JSON TEXT: a column declared JSON would get NUMERIC affinity.
# ``workload`` and ``host_ports`` are indexes of the spec, written in the same transaction as
# the pod row, so that an apply asks for the few records it needs instead of reading them all.
_TABLES = """
CREATE TABLE IF NOT EXISTS pods (
    name TEXT PRIMARY KEY, uid TEXT NOT NULL, version INTEGER NOT NULL, desired TEXT NOT NULL,
    spec TEXT NOT NULL, status TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL,
    generation INTEGER NOT NULL DEFAULT 1, workload TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS host_ports (
    protocol TEXT NOT NULL, port INTEGER NOT NULL, name TEXT NOT NULL,
    PRIMARY KEY (protocol, port, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY, op TEXT NOT NULL, result TEXT NOT NULL, at REAL NOT NULL);
"""
# After the migrations: an index cannot name a column an old table does not have yet.
_INDEXES = """
CREATE INDEX IF NOT EXISTS requests_at ON requests (at);
CREATE INDEX IF NOT EXISTS pods_workload ON pods (workload, name);
CREATE INDEX IF NOT EXISTS pods_uid ON pods (uid);
CREATE INDEX IF NOT EXISTS host_ports_name ON host_ports (name);
CREATE INDEX IF NOT EXISTS host_ports_port ON host_ports (port);
"""
_COLUMNS = "name, uid, version, desired, spec, status, created_at, updated_at, generation"
# Bounds on one query's arguments (an apply names at most its replicas and its ports).
MAX_QUERY_ITEMS = 4096
MAX_PAGE = 5000

Emit = list[tuple[str, dict[str, Any]]]


@dataclass(frozen=True)
class Change:
    """What a write returns: the client's result and the events to publish after commit."""
    result: Any
    events: tuple[Event, ...] = ()


# -- validation at the boundary: every rejection names the field ------------------------------

def check_name(value: object, field: str = "args.name") -> str:
    if not isinstance(value, str) or len(value) > 63 or not _NAME_RE.fullmatch(value):
        raise InvalidArgument("must be a DNS label: 1-63 of [a-z0-9-], alphanumeric at both ends", field)
    return value


def canonical(value: object, field: str) -> str:
    """A JSON object as canonical text (so identical specs compare equal), size-limited."""
    if not isinstance(value, dict):
        raise InvalidArgument("must be a JSON object", field)
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidArgument(f"not representable as JSON: {exc}", field) from exc
    if len(text.encode()) > MAX_DOC_BYTES:
        raise InvalidArgument(f"larger than {MAX_DOC_BYTES} bytes encoded", field)
    return text


def check_uid(value: object, field: str = "args.uid") -> str:
    if not isinstance(value, str) or not value or len(value) > 128:
        raise InvalidArgument("must be a non-empty string of at most 128 characters", field)
    return value


def check_desired(value: object, field: str = "args.desired") -> str:
    if value not in DESIRED:
        raise InvalidArgument(f"must be one of {', '.join(DESIRED)}", field)
    return str(value)


def check_version(value: object, field: str = "args.expect_version") -> int:
    """A positive integer (a version or a generation); a JSON ``true`` is not one."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgument("must be a positive integer", field)
    return value


def check_items(value: object, field: str) -> list[Any]:
    if not isinstance(value, list | tuple) or len(value) > MAX_QUERY_ITEMS:
        raise InvalidArgument(f"must be a list of at most {MAX_QUERY_ITEMS} items", field)
    return list(value)


def check_workload(value: object, field: str = "args.workload") -> str:
    if not isinstance(value, str) or len(value) > 253:
        raise InvalidArgument("must be a string of at most 253 characters", field)
    return value


def check_port_key(value: object, field: str) -> tuple[str, int]:
    """A host port as ``[protocol, port]``."""
    if (not isinstance(value, list | tuple) or len(value) != 2 or not isinstance(value[0], str)
            or len(value[0]) > 16 or isinstance(value[1], bool) or not isinstance(value[1], int)
            or not 0 < value[1] < 65536):
        raise InvalidArgument("must be [protocol, port] with a port in 1-65535", field)
    return value[0], value[1]


def claims(spec: dict[str, Any]) -> set[tuple[str, int]]:
    """The host ports a stored spec claims: model.host_ports, tolerant of any JSON object
    (memory stores what it is given; the manager validated it)."""
    ports = spec.get("ports")
    out: set[tuple[str, int]] = set()
    for p in ports if isinstance(ports, list) else ():
        if isinstance(p, dict) and isinstance(p.get("protocol"), str) and p.get("port") \
                and isinstance(p["port"], int) and not isinstance(p["port"], bool):
            out.add((p["protocol"], p["port"]))
    return out


def workload_of(spec: dict[str, Any]) -> str:
    value = spec.get("workload")
    return value if isinstance(value, str) else ""


def _record(row: tuple[Any, ...]) -> dict[str, Any]:
    name, uid, version, desired, spec, status, created_at, updated_at, generation = row
    return {"name": name, "uid": uid, "version": version, "generation": generation,
            "desired": desired, "spec": json.loads(spec), "status": json.loads(status),
            "created_at": created_at, "updated_at": updated_at}


def _encoded(row: tuple[Any, ...]) -> dict[str, Any]:
    name, uid, version, desired, spec, status, created_at, updated_at, generation, workload = row
    return {"name": name, "uid": uid, "version": version, "generation": generation,
            "desired": desired, "spec_json": spec, "status_json": status, "workload": workload,
            "created_at": created_at, "updated_at": updated_at}


def _fence(cur: dict[str, Any], uid: str | None, generation: int | None) -> None:
    """Refuse a write based on a copy of the record that is no longer current."""
    if uid is not None and cur["uid"] != uid:
        raise Conflict(f"pod {cur['name']!r} has uid {cur['uid']}, not {uid}", "uid")
    if generation is not None and cur["generation"] != generation:
        raise Conflict(f"pod {cur['name']!r} is at generation {cur['generation']}, not {generation}: "
                       "it changed since it was read", "generation")


def _check_owner(existing: dict[str, Any] | None, name: str, workload: str) -> None:
    """A pod name already used by the RIK scheduler or by another workload stays theirs."""
    if existing is None:
        return
    instance = instance_id_of(existing)
    if instance:
        raise Conflict(f"pod {name} is instance {instance} of the RIK scheduler", "name")
    if workload_of(existing["spec"]) != workload:
        raise Conflict(f"pod {name} belongs to workload {workload_of(existing['spec'])}", "name")


PAGE_CACHE_KIB = 512


class Store:
    """One SQLite connection; use it from one thread only (the service thread)."""

    def __init__(self, path: str, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE ... COMMIT) below.
        self._db = sqlite3.connect(path, isolation_level=None)
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise Internal(f"{path}: SQLite refused WAL mode (got {mode!r})")
        self._db.execute("PRAGMA synchronous=FULL")
        # SQLite's own page cache (2 MiB by default) copies what the kernel's page cache holds
        # anyway: a page it no longer has is one pread away. 512 KiB keeps an apply's B-tree
        # paths; the rest of a 1000-pod database stays the kernel's, not this process's.
        self._db.execute(f"PRAGMA cache_size=-{PAGE_CACHE_KIB}")
        with self._tx():
            have = self._db.execute("PRAGMA user_version").fetchone()[0]
            if have > SCHEMA_VERSION:
                raise Internal(f"{path}: schema {have} is newer than this riklet ({SCHEMA_VERSION})")
            self._script(_TABLES)
            if have == 1:  # schema 1 had no generation: every record starts at 1
                self._db.execute("ALTER TABLE pods ADD COLUMN generation INTEGER NOT NULL DEFAULT 1")
            if 0 < have < 3:  # schemas 1 and 2 had no indexes of the spec: build them
                self._db.execute("ALTER TABLE pods ADD COLUMN workload TEXT NOT NULL DEFAULT ''")
                self._reindex()
            self._script(_INDEXES)
            self._script(EVENT_TABLES)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('seq', '0'), ('epoch', ?)",
                             (uuid.uuid4().hex,))
        self.events = EventLog(self._db, clock)

    def _script(self, script: str) -> None:
        for statement in script.split(";"):
            if statement.strip():
                self._db.execute(statement)

    def _reindex(self) -> None:
        for name, spec_text in self._db.execute("SELECT name, spec FROM pods").fetchall():
            self._index(name, json.loads(spec_text))

    def _index(self, name: str, spec: dict[str, Any]) -> None:
        """The spec's index entries, rewritten with it."""
        self._db.execute("UPDATE pods SET workload = ? WHERE name = ?", (workload_of(spec), name))
        self._db.execute("DELETE FROM host_ports WHERE name = ?", (name,))
        self._db.executemany("INSERT INTO host_ports VALUES (?, ?, ?)",
                             [(proto, port, name) for proto, port in claims(spec)])

    @classmethod
    def open(cls, state_dir: str) -> Store:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        path = os.path.join(state_dir, DB_NAME)
        # SQLite gives its -wal and -shm files the database's mode: make that private first.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        return cls(path)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[None]:
        if self._db.in_transaction:  # inside batch(): this write still succeeds or fails alone
            self._db.execute("SAVEPOINT one")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK TO one")
                self._db.execute("RELEASE one")
                raise
            self._db.execute("RELEASE one")
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group commit: the writes made inside share one transaction, so that one commit (one
        fsync) makes them all durable, while each still succeeds or fails alone (a savepoint).
        The caller acknowledges none of them, nor publishes their events, before this returns;
        if it raises, none of them happened."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def _meta(self, key: str) -> str:
        return str(self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    @property
    def seq(self) -> int:
        return int(self._meta("seq"))

    @property
    def epoch(self) -> str:
        return self._meta("epoch")

    def _row(self, name: str) -> dict[str, Any] | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM pods WHERE name = ?", (name,)).fetchone()
        return _record(row) if row else None

    def _existing(self, name: str) -> dict[str, Any]:
        rec = self._row(name)
        if rec is None:
            raise NotFound(f"no pod named {name!r}", "name")
        return rec

    def _put(self, rec: dict[str, Any], new_spec: bool = True) -> None:
        self._db.execute(
            f"INSERT OR REPLACE INTO pods ({_COLUMNS}, workload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (rec["name"], rec["uid"], rec["version"], rec["desired"], canonical(rec["spec"], "spec"),
             canonical(rec["status"], "status"), rec["created_at"], rec["updated_at"], rec["generation"],
             workload_of(rec["spec"])))
        if new_spec:  # a status or desired-state write leaves the spec's ports as they were
            self._index(rec["name"], rec["spec"])

    def _bumped(self, rec: dict[str, Any], wanted: bool = False, **changes: Any) -> dict[str, Any]:
        """Write ``changes``; ``wanted``: they change what is wanted of the pod (a new generation)."""
        new = {**rec, **changes, "version": rec["version"] + 1, "updated_at": self._clock(),
               "generation": rec["generation"] + (1 if wanted else 0)}
        self._put(new, new_spec="spec" in changes)
        return new

    def _write(self, op: str, request_id: str | None, body: Callable[[], tuple[Any, Emit]]) -> Change:
        """Run ``body`` in one transaction with its sequence numbers and its request record."""
        with self._tx():
            if request_id is not None:
                row = self._db.execute("SELECT result FROM requests WHERE id = ? AND op = ?",
                                       (request_id, op)).fetchone()
                if row:
                    return Change(json.loads(row[0]))  # a retry: its events went out the first time
            result, emits = body()
            first = self.seq + 1
            events = tuple(Event(topic, first + i, data) for i, (topic, data) in enumerate(emits))
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'seq'", (str(first - 1 + len(events)),))
            if request_id is not None:
                now = self._clock()
                self._db.execute("DELETE FROM requests WHERE at < ?", (now - DEDUPE_WINDOW,))
                self._db.execute("INSERT OR REPLACE INTO requests VALUES (?, ?, ?, ?)",
                                 (request_id, op, json.dumps(result), now))
        return Change(result, events)

    # -- writes ---------------------------------------------------------------------------------

    def apply(self, name: str, spec: dict[str, Any], uid: str | None = None,
              request_id: str | None = None, generation: int | None = None) -> Change:
        """Create or replace a pod's spec and want it running. Idempotent by name. With
        ``generation`` (and ``uid``), only over the pod as it was read (a resize)."""
        name, spec_text = check_name(name), canonical(spec, "args.spec")
        uid = None if uid is None else check_uid(uid)
        generation = None if generation is None else check_version(generation, "args.generation")

        def body() -> tuple[Any, Emit]:
            if generation is not None:
                _fence(self._existing(name), uid, generation)
            return self._apply_one(name, spec, spec_text, uid)

        return self._write("pod.apply", request_id, body)

    def apply_workload(self, workload: object, pods: object, request_id: str | None = None) -> Change:
        """Apply a workload's pods in one transaction: every pod named is created or replaced
        and wanted running, and the workload's other pods are wanted deleted (fewer replicas),
        or nothing at all changes. A pod name that belongs to another workload, or to the RIK
        scheduler, is refused with Conflict naming it. Result: ``{"pods": [{"pod", "changed"}]}``
        in the order given."""
        workload = check_workload(workload)
        items = [self._pod_item(item, f"args.pods[{i}]")
                 for i, item in enumerate(check_items(pods, "args.pods"))]
        if not workload or not items:
            raise InvalidArgument("a workload applies at least one pod, and has a name",
                                  "args.workload" if not workload else "args.pods")
        for i, (_, spec, _) in enumerate(items):
            if workload_of(spec) != workload:
                raise InvalidArgument(f"spec.workload must be {workload!r}", f"args.pods[{i}]")

        def body() -> tuple[Any, Emit]:
            results, emits = [], []
            for name, spec, spec_text in items:
                _check_owner(self._row(name), name, workload)
                result, more = self._apply_one(name, spec, spec_text, None)
                results.append(result)
                emits.extend(more)
            wanted = {name for name, _, _ in items}
            for old in self.list(workload=workload):
                if old["name"] in wanted or old["desired"] == "deleted" or instance_id_of(old):
                    continue
                rec = self._bumped(old, wanted=True, desired="deleted")
                emits.append((f"pod.{old['name']}.desired", {"kind": "desired", "pod": rec}))
            return {"pods": results}, emits

        return self._write("workload.apply", request_id, body)

    @staticmethod
    def _pod_item(item: object, field: str) -> tuple[str, dict[str, Any], str]:
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise InvalidArgument("must be [name, spec]", field)
        name = check_name(item[0], f"{field}[0]")
        return name, item[1], canonical(item[1], f"{field}[1]")

    def _apply_one(self, name: str, spec: dict[str, Any], spec_text: str,
                   uid: str | None) -> tuple[Any, Emit]:
        cur = self._row(name)
        if cur is None:
            now = self._clock()
            rec = {"name": name, "uid": uid or uuid.uuid4().hex, "version": 1, "generation": 1,
                   "desired": "running", "spec": spec, "status": {"phase": Phase.PENDING.value},
                   "created_at": now, "updated_at": now}
            self._put(rec)
        elif uid is not None and uid != cur["uid"]:
            # The old instance may still need cleaning up under its own uid: never overwrite it.
            raise Conflict(f"pod {name!r} exists with uid {cur['uid']}", "uid")
        elif canonical(cur["spec"], "spec") == spec_text and cur["desired"] == "running":
            return {"pod": cur, "changed": False}, []
        else:
            # Also over a pod being deleted: the new generation fences off the old delete.
            rec = self._bumped(cur, wanted=True, spec=spec, desired="running")
        rec = self._existing(name)  # as stored: canonical key order, what a snapshot returns
        return {"pod": rec, "changed": True}, [(f"pod.{name}.applied", {"kind": "applied", "pod": rec})]

    def set_status(self, name: str, uid: str, status: dict[str, Any], expect_version: int | None = None,
                   request_id: str | None = None, generation: int | None = None) -> Change:
        """Replace the observed status. ``generation`` fences a status derived from an older
        record; ``expect_version`` guards against any lost update."""
        name, uid = check_name(name), check_uid(uid)
        canonical(status, "args.status")
        expect = None if expect_version is None else check_version(expect_version)
        generation = None if generation is None else check_version(generation, "args.generation")

        def body() -> tuple[Any, Emit]:
            cur = self._existing(name)
            _fence(cur, uid, generation)
            if expect is not None and cur["version"] != expect:
                raise Conflict(f"pod {name!r} is at version {cur['version']}, not {expect}",
                               "expect_version")
            self._bumped(cur, status=status)
            rec = self._existing(name)
            return rec, [(f"pod.{name}.status", {"kind": "status", "pod": rec})]

        return self._write("pod.set_status", request_id, body)

    def set_desired(self, name: str, desired: str, request_id: str | None = None,
                    uid: str | None = None, generation: int | None = None) -> Change:
        """Want a pod running, stopped or deleted; ``uid`` and ``generation``, when given, fence
        the change to the record the caller read (a scheduler deleting the instance it named)."""
        name, desired = check_name(name), check_desired(desired)
        uid = None if uid is None else check_uid(uid)
        generation = None if generation is None else check_version(generation, "args.generation")

        def body() -> tuple[Any, Emit]:
            cur = self._existing(name)
            _fence(cur, uid, generation)
            if cur["desired"] == desired:
                return cur, []
            rec = self._bumped(cur, wanted=True, desired=desired)
            return rec, [(f"pod.{name}.desired", {"kind": "desired", "pod": rec})]

        return self._write("pod.set_desired", request_id, body)

    def delete_many(self, workload: object = None, request_id: str | None = None) -> Change:
        """Want every pod deleted, or every pod of ``workload``, in one transaction (one commit,
        however many pods). Result: ``{"pods": [name, ...]}``, the pods newly wanted deleted."""
        workload = None if workload is None else check_workload(workload)
        if workload == "":
            raise InvalidArgument("a workload has a name", "args.workload")

        def body() -> tuple[Any, Emit]:
            names, emits = [], []
            for old in self.list(workload=workload):
                if old["desired"] == "deleted":
                    continue
                rec = self._bumped(old, wanted=True, desired="deleted")
                names.append(rec["name"])
                emits.append((f"pod.{rec['name']}.desired", {"kind": "desired", "pod": rec}))
            return {"pods": names}, emits

        return self._write("pods.delete", request_id, body)

    def remove(self, name: str, uid: str, generation: int, request_id: str | None = None) -> Change:
        """Forget a deleted pod; the manager calls this once the pod is cleaned up. Only the
        generation that wanted it deleted can be removed: a pod applied again since is kept."""
        name, uid = check_name(name), check_uid(uid)
        generation = check_version(generation, "args.generation")

        def body() -> tuple[Any, Emit]:
            cur = self._existing(name)
            _fence(cur, uid, generation)
            if cur["desired"] != "deleted":
                raise Conflict(f"pod {name!r} is wanted {cur['desired']}, not deleted", "desired")
            self._db.execute("DELETE FROM pods WHERE name = ?", (name,))
            self._db.execute("DELETE FROM host_ports WHERE name = ?", (name,))
            return None, [(f"pod.{name}.removed", {"kind": "removed", "name": name, "uid": uid})]

        return self._write("pod.remove", request_id, body)

    def add_events(self, events: object, request_id: str | None = None) -> Change:
        """Keep pod events (a bounded history, see :mod:`.eventlog`); their sequence numbers."""
        checked = EventLog.check(events)
        return self._write("events.add", request_id, lambda: ({"seqs": self.events.add(checked)}, []))

    # -- reads ----------------------------------------------------------------------------------

    def get(self, name: str) -> dict[str, Any]:
        return self._existing(check_name(name))

    def query(self, names: object, workload: object = None, ports: object = ()) -> list[dict[str, Any]]:
        """What an apply needs to see, by index: the pods named, the pods of ``workload``, and
        the pods claiming any of ``ports`` (``[protocol, port]``, whatever their desired state),
        each once, in name order."""
        wanted = {check_name(n, f"args.names[{i}]") for i, n in enumerate(check_items(names, "args.names"))}
        keys = [check_port_key(p, f"args.ports[{i}]") for i, p in enumerate(check_items(ports, "args.ports"))]
        workload = None if workload is None else check_workload(workload)
        for proto, port in keys:
            wanted.update(n for (n,) in self._db.execute(
                "SELECT name FROM host_ports WHERE protocol = ? AND port = ?", (proto, port)))
        found: dict[str, dict[str, Any]] = {}
        if workload:
            found.update((r["name"], r) for r in self.list(workload=workload))
        for name in sorted(wanted - found.keys()):
            rec = self._row(name)
            if rec is not None:
                found[name] = rec
        return [found[n] for n in sorted(found)]

    def claimed(self, low: object, high: object) -> list[tuple[str, int]]:
        """Every (protocol, port) some pod claims between ``low`` and ``high`` inclusive."""
        for value, field in ((low, "args.low"), (high, "args.high")):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
                raise InvalidArgument("must be a port number in 1-65535", field)
        return [(p, n) for p, n in self._db.execute(
            "SELECT DISTINCT protocol, port FROM host_ports WHERE port BETWEEN ? AND ? "
            "ORDER BY port, protocol", (low, high))]

    def find(self, uid: object) -> dict[str, Any]:
        """A pod by its uid."""
        uid = check_uid(uid, "args.uid")
        row = self._db.execute(f"SELECT {_COLUMNS} FROM pods WHERE uid = ?", (uid,)).fetchone()
        if row is None:
            raise NotFound(f"no pod with uid {uid[:64]!r}", "uid")
        return _record(row)

    def _page(self, columns: str, after: object, limit: object, workload: object,
              names: object = None) -> sqlite3.Cursor:
        """Rows in name order: after ``after``, at most ``limit``, of ``workload``, among ``names``."""
        where, params = [], []
        if after is not None:
            where.append("name > ?")
            params.append(check_name(after, "args.after"))
        if workload is not None:
            where.append("workload = ?")
            params.append(check_workload(workload))
        if names is not None:
            wanted = [check_name(n, f"args.names[{i}]")
                      for i, n in enumerate(check_items(names, "args.names"))]
            where.append(f"name IN ({', '.join('?' * len(wanted))})")
            params.extend(wanted)
        sql = f"SELECT {columns} FROM pods"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY name"
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= MAX_PAGE:
                raise InvalidArgument(f"must be an integer in 1-{MAX_PAGE}", "args.limit")
            sql += f" LIMIT {limit}"
        return self._db.execute(sql, params)

    def stamps(self, after: object = None, limit: object = None,
               workload: object = None) -> list[tuple[str, str, int]]:
        """A page of pods as (name, uid, version) only: a reader holding the records it saw
        fetches just those that changed (``list(names=...)``)."""
        return [tuple(row) for row in self._page("name, uid, version", after, limit, workload)]

    def list(self, after: object = None, limit: object = None, workload: object = None,
             encoded: object = False, names: object = None) -> list[dict[str, Any]]:
        """Pods in name order: all of them, or a page (names after ``after``, at most ``limit``),
        optionally only ``workload``'s, or only those of ``names``. ``encoded``: each record
        carries its spec and status as the stored JSON text (``spec_json``, ``status_json``) and
        its ``workload``, the form the Node API's List sends on: no document is decoded and
        encoded again on the way."""
        if not isinstance(encoded, bool):
            raise InvalidArgument("must be true or false", "args.encoded")
        rows = self._page(f"{_COLUMNS}, workload", after, limit, workload, names)
        return [_encoded(row) for row in rows] if encoded else [_record(row[:-1]) for row in rows]

    def snapshot(self) -> dict[str, Any]:
        with self._tx():  # one consistent read: seq matches the pods exactly
            return {"seq": self.seq, "epoch": self.epoch, "pods": self.list()}
