"""Seamless proxy restarts: a worker hands its listening sockets to its successor.

Every serving worker listens on ``<run_dir>/proxy-handoff.sock`` (0600). A starting worker
connects there before it opens any listener; if a predecessor answers (a refused connect or no
file means there is none)::

    new -> old   {"op": "takeover"}
    old -> new   {"routes": [{"protocol", "port", "endpoints": [{"address", "port"}], "balance"}],
                  "stats": <Stats.as_dict()>, "listeners": [["TCP", 8080], ["UDP", 5353]]}
                 with one listening socket per listener attached (SCM_RIGHTS), in that order
    new -> old   {"op": "release"}                  once the new worker serves
    old -> new   {"op": "released", "stats": ...}   its listeners, stats endpoint and hand-off
                                                    socket are closed; it drains and exits

Frames are a 4-byte big-endian length and that many bytes of JSON (an object). Everything
received is validated; a fault raises :class:`HandoffError` naming the field, and the caller
abandons the hand-off (the new worker binds as if it had no predecessor, the old one goes on
serving). Nothing a peer sends can do more than that.

Blocking sockets with timeouts throughout: the new worker runs its side on an executor thread,
the old worker's side is :class:`HandoffServer`'s own thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from services.proxy.balance import Balance
from services.proxy.routes import PROTOCOLS, STREAMS, Endpoint, RouteKey, Routes, is_ip_literal, valid_port
from services.proxy.stats import CONNECT_BUCKETS, Stats

log = logging.getLogger(__name__)

SOCKET_NAME = "proxy-handoff.sock"
MAX_FRAME = 8 * 1024 * 1024       # bytes of JSON; a route table of every port fits easily
MAX_LISTENERS = 2 * 65535         # every TCP and UDP port
FDS_PER_MESSAGE = 250             # Linux takes at most 253 descriptors per sendmsg (SCM_MAX_FD)
READ_SIZE = 256 * 1024            # bytes asked for per read (each read allocates that much)
FRAME_TIMEOUT = 2.0               # for each frame of the exchange, either side
RELEASE_TIMEOUT = 10.0            # the old worker's wait for ``release`` after sending its state
_HEADER = struct.Struct(">I")


class HandoffError(Exception):
    """A hand-off frame or descriptor that cannot be used; ``field`` names what is at fault."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(f"{field}: {message}")
        self.message = message
        self.field = field


def socket_path(run_dir: str) -> str:
    return os.path.join(run_dir, SOCKET_NAME)


# --- frames ------------------------------------------------------------------------------------

def send_frame(sock: socket.socket, obj: Mapping[str, Any], fds: Sequence[int] = ()) -> None:
    """One frame; ``fds`` ride along with its first bytes, at most FDS_PER_MESSAGE per message."""
    body = json.dumps(obj, separators=(",", ":")).encode()
    data = _HEADER.pack(len(body)) + body
    batches = [list(fds[i:i + FDS_PER_MESSAGE]) for i in range(0, len(fds), FDS_PER_MESSAGE)]
    if len(batches) > len(data):   # one byte at least per batch (never with MAX_LISTENERS)
        raise HandoffError(f"{len(fds)} descriptors do not fit in one frame", "listeners")
    pos = 0
    for i, batch in enumerate(batches):
        # Every batch but the last carries one byte; the last carries the rest of the frame.
        chunk = data[pos:pos + 1] if i < len(batches) - 1 else data[pos:]
        pos += socket.send_fds(sock, [chunk], batch)
    if pos < len(data):
        sock.sendall(data[pos:])


def recv_frame(sock: socket.socket, max_fds: int = 0) -> tuple[dict[str, Any], list[int]]:
    """One frame and the descriptors that came with it (the caller owns them). Descriptors
    beyond ``max_fds``, or any when ``max_fds`` is 0, are refused: all are closed and
    HandoffError raised. So is a frame that is too long, not JSON, not an object, or cut short."""
    fds: list[int] = []
    try:
        header = _recv_exact(sock, _HEADER.size, fds, max_fds)
        (length,) = _HEADER.unpack(header)
        if length > MAX_FRAME:
            raise HandoffError(f"{length} bytes is over the limit of {MAX_FRAME}", "frame.length")
        body = _recv_exact(sock, length, fds, max_fds)
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError) as exc:    # RecursionError: nested too deep
            raise HandoffError(f"not JSON: {exc}", "frame") from None
        if not isinstance(obj, dict):
            raise HandoffError(f"expected an object, got {type(obj).__name__}", "frame")
    except BaseException:
        close_fds(fds)
        raise
    return obj, fds


def _recv_exact(sock: socket.socket, n: int, fds: list[int], max_fds: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            data, got, flags, _ = socket.recv_fds(sock, min(n - len(buf), READ_SIZE), FDS_PER_MESSAGE + 3)
        except TimeoutError:
            raise HandoffError(f"no data within {sock.gettimeout()} s", "frame") from None
        except OSError as exc:
            raise HandoffError(f"cannot receive: {exc}", "frame") from None
        fds.extend(got)
        for fd in got:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)
        if flags & socket.MSG_CTRUNC:
            raise HandoffError("descriptors were cut short (too many in one message)", "listeners")
        if len(fds) > max_fds:
            raise HandoffError(f"{len(fds)} descriptors sent, at most {max_fds} expected", "listeners")
        if not data:
            raise HandoffError(f"connection closed after {len(buf)} of {n} bytes", "frame")
        buf += data
    return bytes(buf)


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def expect_op(frame: Mapping[str, Any], op: str) -> None:
    if frame.get("op") != op:
        raise HandoffError(f"expected {op!r}, got {frame.get('op')!r}", "op")


# --- counters ----------------------------------------------------------------------------------

def _is_counter(name: str) -> bool:
    """Every plain integer of Stats but the gauges (``*_active``): those continue."""
    return not name.endswith("_active")


COUNTERS = tuple(f.name for f in fields(Stats) if f.type in ("int", int) and _is_counter(f.name))


@dataclass
class Counters:
    """The counters of a Stats snapshot: what a successor carries on from."""

    values: dict[str, int] = field(default_factory=dict)
    buckets: list[int] | None = None          # per-bucket connect latency counts, +Inf last
    seconds: float = 0.0                      # their sum

    def add_to(self, stats: Stats) -> None:
        for name, value in self.values.items():
            setattr(stats, name, getattr(stats, name) + value)
        if self.buckets is not None:
            stats.connect_buckets = [a + b for a, b in zip(stats.connect_buckets, self.buckets,
                                                           strict=True)]
            stats.connect_seconds_sum += self.seconds

    def since(self, earlier: Counters) -> Counters:
        """What was counted after ``earlier`` (never negative)."""
        values = {k: max(0, v - earlier.values.get(k, 0)) for k, v in self.values.items()}
        buckets = None
        if self.buckets is not None and earlier.buckets is not None:
            buckets = [max(0, a - b) for a, b in zip(self.buckets, earlier.buckets, strict=True)]
        elif self.buckets is not None:
            buckets = list(self.buckets)
        return Counters(values, buckets, max(0.0, self.seconds - earlier.seconds))


def parse_counters(raw: object, where: str = "stats") -> Counters:
    """The counters of a ``Stats.as_dict()`` snapshot. Unknown keys and gauges are ignored (a
    newer or older predecessor may count other things); a known counter must be an integer
    >= 0, and ``connect_latency`` a histogram with this version's buckets."""
    if not isinstance(raw, Mapping):
        raise HandoffError("expected an object", where)
    out = Counters()
    for name in COUNTERS:
        if name in raw:
            out.values[name] = _count(raw[name], f"{where}.{name}")
    hist = raw.get("connect_latency")
    if hist is not None and (carried := _histogram(hist, f"{where}.connect_latency")) is not None:
        out.buckets, out.seconds = carried
    return out


def _count(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise HandoffError(f"expected an integer >= 0, got {value!r}", where)
    return value


def _histogram(raw: object, where: str) -> tuple[list[int], float] | None:
    """Per-bucket counts and sum of a connect latency snapshot; None (not carried, logged) when
    it is well formed but has other bucket bounds than this version's."""
    if not isinstance(raw, Mapping):
        raise HandoffError("expected an object", where)
    buckets, total, count = raw.get("buckets"), raw.get("sum"), raw.get("count")
    if not isinstance(buckets, list):
        raise HandoffError("expected a list of [le, count] pairs", f"{where}.buckets")
    bounds: list[float] = []
    per_bucket: list[int] = []
    running = 0
    for i, entry in enumerate(buckets):
        at = f"{where}.buckets[{i}]"
        if not isinstance(entry, list) or len(entry) != 2 or isinstance(entry[0], bool) \
                or not isinstance(entry[0], (int, float)):
            raise HandoffError(f"expected [le, count], got {entry!r}", at)
        cumulative = _count(entry[1], at)
        if cumulative < running:
            raise HandoffError("cumulative counts must not decrease", at)
        bounds.append(float(entry[0]))
        per_bucket.append(cumulative - running)
        running = cumulative
    total_count = _count(count, f"{where}.count")
    if total_count < running:
        raise HandoffError("smaller than the last bucket", f"{where}.count")
    per_bucket.append(total_count - running)
    if isinstance(total, bool) or not isinstance(total, (int, float)) or not 0 <= total < float("inf"):
        raise HandoffError(f"expected a number >= 0, got {total!r}", f"{where}.sum")
    if bounds != list(CONNECT_BUCKETS):
        log.info("predecessor's connect latency buckets differ; histogram starts again",
                 extra={"buckets": bounds})
        return None
    return per_bucket, float(total)


# --- the state frame ---------------------------------------------------------------------------

@dataclass
class State:
    """What a predecessor hands over, validated. The sockets are the new worker's to close."""

    routes: Routes
    balance: dict[RouteKey, Balance]
    counters: Counters
    sockets: dict[RouteKey, socket.socket]

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()


def encode_state(routes: Routes, balance: Mapping[RouteKey, Balance], stats: Mapping[str, Any],
                 listeners: Sequence[RouteKey]) -> dict[str, Any]:
    return {
        "routes": [{"protocol": proto, "port": port,
                    "endpoints": [{"address": ep.address, "port": ep.port} for ep in endpoints],
                    "balance": balance.get((proto, port), Balance.ROUND_ROBIN).value}
                   for (proto, port), endpoints in sorted(routes.items())],
        "stats": dict(stats),
        "listeners": [[proto, port] for proto, port in listeners],
    }


def parse_state(frame: Mapping[str, Any], fds: list[int]) -> State:
    """Validate the old worker's state frame and wrap its descriptors as sockets. On any fault
    every descriptor is closed and HandoffError raised."""
    sockets: dict[RouteKey, socket.socket] = {}
    try:
        routes, balance = _routes(frame.get("routes"))
        counters = parse_counters(frame.get("stats"))
        listeners = _listeners(frame.get("listeners"), routes)
        if len(fds) != len(listeners):
            raise HandoffError(f"{len(listeners)} listeners but {len(fds)} descriptors attached",
                               "listeners")
        for i, (key, fd) in enumerate(zip(listeners, fds, strict=True)):
            sockets[key] = _listening_socket(fd, key, f"listeners[{i}]")
    except BaseException:
        for sock in sockets.values():
            sock.close()
        close_fds(fds[len(sockets):])
        raise
    return State(routes, balance, counters, sockets)


def _port(value: object, where: str) -> int:
    port = valid_port(value)
    if port is None:
        raise HandoffError(f"expected a port 1-65535, got {value!r}", where)
    return port


def _routes(raw: object) -> tuple[Routes, dict[RouteKey, Balance]]:
    if not isinstance(raw, list):
        raise HandoffError("expected a list", "routes")
    routes: Routes = {}
    balance: dict[RouteKey, Balance] = {}
    policies = {b.value: b for b in Balance}
    for i, entry in enumerate(raw):
        at = f"routes[{i}]"
        if not isinstance(entry, Mapping):
            raise HandoffError("expected an object", at)
        proto = entry.get("protocol")
        if proto not in PROTOCOLS:
            raise HandoffError(f"expected one of {', '.join(PROTOCOLS)}, got {proto!r}", f"{at}.protocol")
        key = (str(proto), _port(entry.get("port"), f"{at}.port"))
        if key in routes:
            raise HandoffError(f"{key[0]} {key[1]} listed twice", at)
        eps = entry.get("endpoints")
        if not isinstance(eps, list):
            raise HandoffError("expected a list", f"{at}.endpoints")
        endpoints = []
        for j, ep in enumerate(eps):
            ep_at = f"{at}.endpoints[{j}]"
            if not isinstance(ep, Mapping):
                raise HandoffError("expected an object", ep_at)
            address = ep.get("address")
            if not is_ip_literal(address):
                raise HandoffError(f"expected an IP address, got {address!r}", f"{ep_at}.address")
            endpoints.append(Endpoint(str(address), _port(ep.get("port"), f"{ep_at}.port")))
        policy = entry.get("balance", Balance.ROUND_ROBIN.value)
        if not isinstance(policy, str) or policy not in policies:
            raise HandoffError(f"expected one of {', '.join(policies)}, got {policy!r}", f"{at}.balance")
        routes[key] = tuple(sorted(endpoints))
        if policies[policy] is not Balance.ROUND_ROBIN:
            balance[key] = policies[policy]
    return routes, balance


def _listeners(raw: object, routes: Routes) -> list[RouteKey]:
    if not isinstance(raw, list):
        raise HandoffError("expected a list", "listeners")
    if len(raw) > MAX_LISTENERS:
        raise HandoffError(f"{len(raw)} is over the limit of {MAX_LISTENERS}", "listeners")
    keys: list[RouteKey] = []
    for i, entry in enumerate(raw):
        at = f"listeners[{i}]"
        if not isinstance(entry, list) or len(entry) != 2 or entry[0] not in PROTOCOLS:
            raise HandoffError(f"expected [protocol, port], got {entry!r}", at)
        key = (str(entry[0]), _port(entry[1], at))
        if key not in routes:
            raise HandoffError(f"{key[0]} {key[1]} has no route", at)
        if key in keys:
            raise HandoffError(f"{key[0]} {key[1]} listed twice", at)
        keys.append(key)
    return keys


def _listening_socket(fd: int, key: RouteKey, where: str) -> socket.socket:
    """``fd`` as a socket, if it is what ``key`` says: an IP socket of the right type, bound to
    that port, and for TCP listening. Otherwise it is closed and HandoffError raised."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        os.close(fd)
        raise HandoffError(f"descriptor is not a socket: {exc}", where) from None
    try:
        want = socket.SOCK_STREAM if key[0] in STREAMS else socket.SOCK_DGRAM
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != want:
            raise HandoffError(f"not a {key[0]} socket ({sock.family.name}, {sock.type.name})", where)
        port = sock.getsockname()[1]
        if port != key[1]:
            raise HandoffError(f"bound to port {port}, not {key[1]}", where)
        if key[0] in STREAMS and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise HandoffError(f"{key[0]} socket is not listening", where)
    except OSError as exc:
        sock.close()
        raise HandoffError(f"cannot inspect the socket: {exc}", where) from None
    except BaseException:
        sock.close()
        raise
    return sock


# --- the new worker's side ---------------------------------------------------------------------

class Takeover:
    """A predecessor that handed over its state; ``release`` tells it to stop serving."""

    def __init__(self, conn: socket.socket, state: State) -> None:
        self.conn = conn
        self.state = state

    def release(self, timeout: float = FRAME_TIMEOUT) -> Counters | None:
        """Send ``release`` and wait for ``released``: returns what the predecessor counted
        since its state frame, or None (logged) when it did not answer properly in time."""
        try:
            self.conn.settimeout(timeout)
            send_frame(self.conn, {"op": "release"})
            frame, _ = recv_frame(self.conn)
            expect_op(frame, "released")
            final = parse_counters(frame["stats"]) if "stats" in frame else None
        except (HandoffError, OSError) as exc:
            log.warning("predecessor did not confirm the release; going on without it",
                        extra={"error": str(exc), "field": getattr(exc, "field", None)})
            return None
        finally:
            self.conn.close()
        log.info("predecessor released its listeners")
        return final.since(self.state.counters) if final is not None else Counters()


def request_takeover(path: str, timeout: float = FRAME_TIMEOUT) -> Takeover | None:
    """Ask the worker listening at ``path`` for its sockets and state. None when there is no
    predecessor (no file, or a stale one nobody listens on) or the hand-off failed (logged):
    the caller then binds its ports itself."""
    if not os.path.exists(path):
        log.info("no predecessor to take over from", extra={"path": path})
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    try:
        conn.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        conn.close()
        log.info("stale hand-off socket ignored: no predecessor listens", extra={"path": path})
        return None
    except OSError as exc:
        conn.close()
        log.warning("cannot reach the predecessor; binding anew", extra={"path": path, "error": str(exc)})
        return None
    try:
        send_frame(conn, {"op": "takeover"})
        frame, fds = recv_frame(conn, max_fds=MAX_LISTENERS)
        state = parse_state(frame, fds)
    except (HandoffError, OSError) as exc:
        conn.close()
        log.warning("hand-off failed; binding anew", extra={"error": str(exc),
                                                            "field": getattr(exc, "field", None)})
        return None
    log.info("took over from the predecessor", extra={
        "routes": len(state.routes), "listeners": [f"{p}/{n}" for p, n in state.sockets]})
    return Takeover(conn, state)


# --- the old worker's side ---------------------------------------------------------------------

class HandoffServer:
    """Listens at ``path`` on a thread of its own and serves one successor at a time.

    ``on_takeover()`` returns the state frame and the descriptors to attach (the server closes
    them once sent); ``on_release()`` stops serving and returns the final ``Stats.as_dict()``.
    After a release the listening socket is closed and its file removed *before* ``released``
    is sent, so the successor can bind the path; then ``on_released()`` is called and the
    thread ends. A failed exchange is logged and the server waits for the next successor."""

    def __init__(self, path: str, on_takeover: Callable[[], tuple[dict[str, Any], list[int]]],
                 on_release: Callable[[], dict[str, Any]], on_released: Callable[[], None],
                 *, frame_timeout: float = FRAME_TIMEOUT, release_timeout: float = RELEASE_TIMEOUT) -> None:
        self.path = path
        self._on_takeover = on_takeover
        self._on_release = on_release
        self._on_released = on_released
        self.frame_timeout = frame_timeout
        self.release_timeout = release_timeout
        self.busy = threading.Event()     # a successor is being served
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._wake_r, self._wake_w = os.pipe()     # close() wakes the accept wait at once
        self._thread = threading.Thread(target=self._serve, name="handoff", daemon=True)

    def start(self) -> None:
        """Bind ``path`` (a file already there is removed first: a stale one, or a predecessor
        that did not release in time) and start serving."""
        path = self.path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old_mask = os.umask(0o177)       # created 0600, no window with a wider mode
            try:
                sock.bind(path)
            finally:
                os.umask(old_mask)
            os.chmod(path, 0o600)
            sock.listen(4)
            st = os.stat(path)
        except BaseException:
            sock.close()
            raise
        self._sock, self._inode = sock, (st.st_dev, st.st_ino)
        self._thread.start()
        log.info("hand-off socket listening", extra={"path": path})

    def close(self) -> None:
        """Stop serving and remove the file, unless it is no longer ours (a successor's)."""
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=self.release_timeout + 2 * self.frame_timeout + 1)
        self._close_listening()
        if not self._thread.is_alive():
            close_fds([self._wake_r, self._wake_w])
            self._wake_r = self._wake_w = -1

    def _close_listening(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        sock.close()
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)

    def _serve(self) -> None:
        while not self._stop.is_set():
            sock = self._sock
            if sock is None:
                return
            try:
                ready, _, _ = select.select([sock.fileno(), self._wake_r], [], [])
                if sock.fileno() not in ready or self._stop.is_set():
                    continue
                conn, _ = sock.accept()
            except (OSError, ValueError):   # closed under us
                return
            self.busy.set()
            try:
                if self._serve_one(conn):
                    return
            except Exception:   # a bug here must not end the worker: it keeps serving
                log.exception("hand-off failed")
            finally:
                conn.close()
                self.busy.clear()

    def _serve_one(self, conn: socket.socket) -> bool:
        """One successor; True once it took everything over."""
        try:
            conn.settimeout(self.frame_timeout)
            frame, _ = recv_frame(conn)
            expect_op(frame, "takeover")
        except (HandoffError, OSError) as exc:
            log.warning("bad hand-off request ignored", extra={"error": str(exc),
                                                               "field": getattr(exc, "field", None)})
            return False
        log.info("successor asks to take over")
        state, fds = self._on_takeover()
        try:
            send_frame(conn, state, fds)
        except (HandoffError, OSError) as exc:
            log.warning("cannot send the hand-off state; still serving", extra={"error": str(exc)})
            return False
        finally:
            close_fds(fds)
        log.info("listeners handed over, waiting for the release",
                 extra={"listeners": [f"{p}/{n}" for p, n in state["listeners"]]})
        try:
            conn.settimeout(self.release_timeout)
            frame, _ = recv_frame(conn)
            expect_op(frame, "release")
        except (HandoffError, OSError) as exc:
            log.warning("successor did not release; still serving", extra={
                "error": str(exc), "field": getattr(exc, "field", None)})
            return False
        final = self._on_release()
        self._close_listening()
        try:
            conn.settimeout(self.frame_timeout)
            send_frame(conn, {"op": "released", "stats": final})
        except OSError as exc:
            log.warning("cannot confirm the release", extra={"error": str(exc)})
        log.info("released to the successor")
        self._on_released()
        return True
