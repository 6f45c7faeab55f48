"""Pod events in memory's SQLite database: a bounded history, kept across restarts.

What is kept: for each pod name, its newest :data:`PER_POD` events; on the node, only events
among the last :data:`NODE_CAP` recorded and younger than :data:`MAX_AGE`. A deleted pod's
events stay under the same rules (so ``rikletctl events POD`` still shows its ``Deleted``).

Adding costs the same whatever the table holds: an insert by the primary key, a look at the
pod's own (at most ``PER_POD + 1``) index entries, a delete by primary-key range for the node
cap, and, at most once a minute, the oldest few hundred rows looked at for age. No scan.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Any

from common.errors import InvalidArgument
from common.podevent import PodEvent, check_pod, parse

PER_POD = 50
NODE_CAP = 20000
MAX_AGE = 7 * 86400.0
MAX_BATCH = 1000          # events in one events.add
MAX_LIST = 1000           # events in one events.list answer
AGE_PRUNE_EVERY = 60.0    # seconds between looks for events past MAX_AGE
AGE_PRUNE_ROWS = 512

TABLES = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, pod TEXT NOT NULL, uid TEXT NOT NULL, time REAL NOT NULL,
    type TEXT NOT NULL, reason TEXT NOT NULL, message TEXT NOT NULL, container TEXT NOT NULL,
    count INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS events_pod ON events (pod, seq);
"""
_COLUMNS = "seq, pod, uid, time, type, reason, message, container, count"


def _event(row: tuple[Any, ...]) -> dict[str, Any]:
    seq, pod, uid, at, kind, reason, message, container, count = row
    return {"seq": seq, "pod": pod, "uid": uid, "time": at, "type": kind, "reason": reason,
            "message": message, "container": container, "count": count}


def _int(value: object, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgument(f"must be an integer in {low}-{high}", field)
    return value


class EventLog:
    """The events table of a store's connection; every call runs inside the store's transaction."""

    def __init__(self, db: sqlite3.Connection, clock: Callable[[], float] = time.time,
                 per_pod: int = PER_POD, node_cap: int = NODE_CAP, max_age: float = MAX_AGE) -> None:
        self._db, self._clock = db, clock
        self.per_pod, self.node_cap, self.max_age = per_pod, node_cap, max_age
        self._aged_at = 0.0

    @staticmethod
    def check(events: object) -> list[PodEvent]:
        if not isinstance(events, list) or not 0 < len(events) <= MAX_BATCH:
            raise InvalidArgument(f"must be a list of 1-{MAX_BATCH} events", "args.events")
        return [parse(e, f"args.events[{i}]") for i, e in enumerate(events)]

    def add(self, events: list[PodEvent]) -> list[int]:
        """Store ``events`` (checked by :meth:`check`); their sequence numbers, in order."""
        seqs = []
        for e in events:
            cur = self._db.execute(
                "INSERT INTO events (pod, uid, time, type, reason, message, container, count) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (e.pod, e.uid, e.time, e.type, e.reason, e.message, e.container, e.count))
            seq = int(cur.lastrowid or 0)
            seqs.append(seq)
            self._trim_pod(e.pod)
        if seqs:
            self._db.execute("DELETE FROM events WHERE seq <= ?", (seqs[-1] - self.node_cap,))
        self._trim_age()
        return seqs

    def _trim_pod(self, pod: str) -> None:
        row = self._db.execute("SELECT seq FROM events WHERE pod = ? ORDER BY seq DESC LIMIT 1 OFFSET ?",
                               (pod, self.per_pod)).fetchone()
        if row is not None:
            self._db.execute("DELETE FROM events WHERE pod = ? AND seq <= ?", (pod, row[0]))

    def _trim_age(self) -> None:
        now = self._clock()
        if now - self._aged_at < AGE_PRUNE_EVERY:
            return
        self._aged_at = now
        # Events are recorded in about time order: the oldest are the first rows by seq.
        rows = self._db.execute("SELECT seq, time FROM events ORDER BY seq LIMIT ?",
                                (AGE_PRUNE_ROWS,)).fetchall()
        old = [seq for seq, at in rows if at < now - self.max_age]
        if old:
            self._db.execute("DELETE FROM events WHERE seq <= ?", (max(old),))

    def list(self, pod: object = None, after: object = None, limit: object = None) -> dict[str, Any]:
        """The newest ``limit`` events (of ``pod``, numbered above ``after``), oldest first,
        with ``last``, the newest sequence number ever given (a follower's starting point)."""
        where: list[str] = []
        params: list[Any] = []
        if pod is not None:
            where.append("pod = ?")
            params.append(check_pod(pod, "args.pod"))
        if after is not None:
            where.append("seq > ?")
            params.append(_int(after, "args.after", 0, 2**63 - 1))
        count = MAX_LIST if limit is None else _int(limit, "args.limit", 1, MAX_LIST)
        sql = f"SELECT {_COLUMNS} FROM events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._db.execute(sql + f" ORDER BY seq DESC LIMIT {count}", params).fetchall()
        last = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        return {"events": [_event(r) for r in reversed(rows)], "last": int(last[0]) if last else 0}
