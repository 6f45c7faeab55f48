"""memory's I/O shell: a ROUTER socket that answers requests against the store, and a PUB
socket that publishes every committed change plus a heartbeat carrying the current sequence
number, so that subscribers notice the events they missed (PUB/SUB drops silently).

The requests waiting at once are answered with one commit (group commit): one fsync makes all
their writes durable, each write still succeeds or fails alone, and no reply or event leaves
before that commit.

Ops (each declares its arguments; an unknown one is rejected naming ``args.<key>``)::

    pod.apply       {name, spec, uid?, generation?}      -> {"pod": record, "changed": bool}
    workload.apply  {workload, pods: [[name, spec]]}      -> {"pods": [{"pod", "changed"}]}; the
                    workload's other pods wanted deleted; all or nothing
    pod.set_status  {name, uid, status, expect_version?, generation?} -> record
    pod.set_desired {name, desired, uid?, generation?}   -> record
    pod.remove      {name, uid, generation}              -> null

``uid`` and ``generation`` fence a write to the record the caller read (see the store).
    pod.get         {name}                               -> record
    pod.list        {after?, limit?, workload?, encoded?, names?} -> [record] by name (a page)
    pod.stamps      {after?, limit?, workload?}          -> [[name, uid, version]] (a page)
    pod.query       {names, workload?, ports?}           -> [record] named, of workload, claiming a port
    pod.claimed     {low, high}                          -> [[protocol, port]] claimed in the range
    pod.find        {uid}                                -> record
    snapshot        {}                                   -> {"seq", "epoch", "pods"}
    events.add      {events: [event]}                    -> {"seqs": [int]} (common.podevent)
    events.list     {pod?, after?, limit?}               -> {"events": [event], "last": seq}
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from common import ipc
from common.config import Config
from common.errors import InvalidArgument, Unavailable, excerpt
from common.zmqutil import ipc_path, make_run_dir, prepare_ipc_bind, serve_request
from services.memory.store import Change, Store

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 2.0
HB_TOPIC = "hb"
# Frames are checked against ipc.MAX_FRAME_BYTES after receipt (with an error reply naming the
# frame); this cap only stops a runaway peer from making us buffer without bound.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Requests answered with one commit at most: bounds the replies and events held back meanwhile.
MAX_BATCH = 64

Run = Callable[[Store, dict[str, Any], str], Any]


@dataclass(frozen=True)
class Op:
    required: tuple[str, ...]
    optional: tuple[str, ...]
    run: Run


OPS: dict[str, Op] = {
    "pod.apply": Op(("name", "spec"), ("uid", "generation"),
                    lambda s, a, rid: s.apply(a["name"], a["spec"], a.get("uid"), request_id=rid,
                                              generation=a.get("generation"))),
    "workload.apply": Op(("workload", "pods"), (),
                         lambda s, a, rid: s.apply_workload(a["workload"], a["pods"], request_id=rid)),
    "pod.set_status": Op(("name", "uid", "status"), ("expect_version", "generation"),
                         lambda s, a, rid: s.set_status(a["name"], a["uid"], a["status"],
                                                        a.get("expect_version"), request_id=rid,
                                                        generation=a.get("generation"))),
    "pod.set_desired": Op(("name", "desired"), ("uid", "generation"),
                          lambda s, a, rid: s.set_desired(a["name"], a["desired"], request_id=rid,
                                                          uid=a.get("uid"), generation=a.get("generation"))),
    "pods.delete": Op((), ("workload",),
                      lambda s, a, rid: s.delete_many(a.get("workload"), request_id=rid)),
    "pod.remove": Op(("name", "uid", "generation"), (),
                     lambda s, a, rid: s.remove(a["name"], a["uid"], a["generation"], request_id=rid)),
    "pod.get": Op(("name",), (), lambda s, a, rid: s.get(a["name"])),
    "pod.list": Op((), ("after", "limit", "workload", "encoded", "names"),
                   lambda s, a, rid: s.list(a.get("after"), a.get("limit"), a.get("workload"),
                                            a.get("encoded", False), a.get("names"))),
    "pod.stamps": Op((), ("after", "limit", "workload"),
                     lambda s, a, rid: s.stamps(a.get("after"), a.get("limit"), a.get("workload"))),
    "pod.query": Op(("names",), ("workload", "ports"),
                    lambda s, a, rid: s.query(a["names"], a.get("workload"), a.get("ports", []))),
    "pod.claimed": Op(("low", "high"), (), lambda s, a, rid: s.claimed(a["low"], a["high"])),
    "pod.find": Op(("uid",), (), lambda s, a, rid: s.find(a["uid"])),
    "snapshot": Op((), (), lambda s, a, rid: s.snapshot()),
    "events.add": Op(("events",), (), lambda s, a, rid: s.add_events(a["events"], request_id=rid)),
    "events.list": Op((), ("pod", "after", "limit"),
                      lambda s, a, rid: s.events.list(a.get("pod"), a.get("after"), a.get("limit"))),
}


def check_args(op: str, args: dict[str, Any]) -> Op:
    spec = OPS.get(op)
    if spec is None:
        raise InvalidArgument(f"unknown op {excerpt(op)} (known: ping, {', '.join(sorted(OPS))})", "body.op")
    for key in args:
        if key not in spec.required and key not in spec.optional:
            raise InvalidArgument(f"unknown argument for {op}", f"args.{key}")
    for key in spec.required:
        if key not in args:
            raise InvalidArgument(f"required by {op}", f"args.{key}")
    return spec


def request_key(req: ipc.Request) -> str:
    """What makes a write a retry of an earlier one: the same id with the same op and args.
    The digest keeps a client that reuses ids for different writes from being "deduplicated"."""
    body = json.dumps([req.op, req.args], sort_keys=True, separators=(",", ":"), default=str)
    return f"{req.id}/{hashlib.sha256(body.encode()).hexdigest()[:32]}"


def _lock(path: str) -> int:
    """Hold an exclusive lock on ``path`` for the life of the process: a live twin is refused
    even when its socket is too busy to answer prepare_ipc_bind's probe in time."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise Unavailable(f"another memory service holds {path}", "lock") from exc
    return fd


class MemoryServer:
    """Owns the store and both sockets; everything runs on the thread calling :meth:`serve`."""

    def __init__(self, cfg: Config, context: zmq.Context[Any] | None = None) -> None:
        self._ctx = context or zmq.Context.instance()
        make_run_dir(cfg.paths_run_dir)
        make_run_dir(cfg.paths_state_dir)  # same rule: private to the agent's user
        # One lock per distinct directory: the same file locked twice would refuse ourselves.
        lock_dirs = dict.fromkeys(os.path.realpath(d) for d in (cfg.paths_run_dir, cfg.paths_state_dir))
        self._locks = [_lock(os.path.join(d, "memory.lock")) for d in lock_dirs]
        try:
            prepare_ipc_bind(cfg.memory_endpoint, self._ctx)
            prepare_ipc_bind(cfg.memory_events_endpoint, self._ctx)
            self.store = Store.open(cfg.paths_state_dir)
        except BaseException:
            self._unlock()
            raise
        # Bind only once the store is open, so no client is accepted before we can answer it.
        self._router = self._bind(zmq.ROUTER, cfg.memory_endpoint)
        self._pub = self._bind(zmq.PUB, cfg.memory_events_endpoint)
        self._router.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        # A signal handler or another thread wakes the poll loop through this pair.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stopping = False
        self._outbox: list[ipc.Event] = []
        log.info("memory serving", extra={"endpoint": cfg.memory_endpoint, "db": self.store.path,
                                          "seq": self.store.seq, "epoch": self.store.epoch})

    def _bind(self, kind: int, endpoint: str) -> zmq.Socket[Any]:
        sock = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(endpoint)
        path = ipc_path(endpoint)
        if path:
            os.chmod(path, 0o600)
        return sock

    def handle(self, req: ipc.Request) -> Any:
        op = check_args(req.op, req.args)
        out = op.run(self.store, req.args, request_key(req))
        if not isinstance(out, Change):
            return out
        self._outbox.extend(out.events)  # published once the batch has committed
        return out.result

    def heartbeat(self) -> None:
        seq = self.store.seq
        self._pub.send_multipart(ipc.encode_event(
            ipc.Event(HB_TOPIC, seq, {"seq": seq, "epoch": self.store.epoch})))

    def request_stop(self) -> None:
        """Safe from a signal handler and from other threads."""
        self._stopping = True
        with contextlib.suppress(BlockingIOError):  # full: the loop is already due to wake up
            self._wake_w.send(b"x")

    def serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_r.fileno(), zmq.POLLIN)
        next_hb = time.monotonic()
        while not self._stopping:
            now = time.monotonic()
            if now >= next_hb:
                self.heartbeat()
                next_hb = now + HEARTBEAT_INTERVAL
            ready = dict(poller.poll(max(0, int((next_hb - now) * 1000)) + 1))
            if self._router in ready:
                self._route()
            if self._wake_r.fileno() in ready:
                self._drain_wake()

    def _route(self) -> None:
        """Answer every request waiting now (up to MAX_BATCH) with one commit: their writes
        share one fsync (group commit). Replies and events go out only once it has committed;
        if it fails, nothing is answered and the clients' retries (same ids) write again."""
        messages: list[list[bytes]] = []
        while len(messages) < MAX_BATCH:
            try:
                messages.append(self._router.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
        self._outbox = []
        try:
            with self.store.batch():
                replies = [self._answer(msg) for msg in messages]
        except Exception:
            log.exception("a commit failed: its requests stay unanswered", extra={"requests": len(messages)})
            return
        for ev in self._outbox:  # committed: now the world may know
            self._pub.send_multipart(ipc.encode_event(ev))
        for reply in replies:
            if reply is not None:
                self._router.send_multipart(reply)

    def _answer(self, msg: list[bytes]) -> list[bytes] | None:
        """The reply frames to one routed message (None: no answer)."""
        if len(msg) < 2:
            return None  # nothing but an identity: not even worth an answer
        ident, frames = msg[0], msg[1:]
        try:
            if frames[0] == b"":  # REQ peers put an empty delimiter first
                return [ident, b"", *serve_request(self.handle, frames[1:])]
            return [ident, *serve_request(self.handle, frames)]
        except RecursionError:
            # ipc's JSON decoding lets a deeply nested frame escape as RecursionError; the
            # sender gets no answer but the service lives on.
            log.warning("dropped a request nested too deeply to decode")
            return None

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass

    def _unlock(self) -> None:
        for fd in self._locks:
            os.close(fd)
        self._locks = []

    def close(self) -> None:
        self._router.close(linger=0)
        self._pub.close(linger=0)
        self.store.close()
        self._wake_r.close()
        self._wake_w.close()
        self._unlock()
        log.info("memory stopped")
