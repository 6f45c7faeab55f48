"""riklet-proxy's worker: the data path, started and restarted by the keeper (services.proxy.keeper).

Two data paths, by ``proxy.mode`` (services.proxy.kernel.mode): in kernel mode the worker binds
no host port; it programs the agent's nftables table (services.proxy.kernel.forwarder) and the
kernel DNATs the traffic, so the rules outlive any worker, keeper or agent restart. In
userspace mode (and where the kernel path cannot work) it forwards the bytes itself
(services.proxy.server). The life below is the same in both; in kernel mode a hand-off passes
no socket and a worker handed over has no connection to drain.

The data path runs on a uvloop event loop in the main thread; the pod feed (blocking ZeroMQ)
runs on a thread of its own and hands each new route table to the loop, where only the newest
one waiting is applied.

A worker's life, around restarts (services.proxy.handoff has the protocol):

- Starting, it asks a predecessor on ``proxy-handoff.sock`` for its listening sockets, serves
  them with the predecessor's routes at once, starts its pod feed, then tells the predecessor to
  let go. Only then does it bind its stats endpoint and its own hand-off socket. With no
  predecessor (or a failed hand-off) it binds its ports as the routes from memory arrive.
- Handed over to a successor, it stops listening and drains: its TCP connections go on until
  they end, at most ``drain_timeout`` (30 s), then it exits 0.
- On SIGTERM or SIGINT (the keeper stopping) it serves on for ``linger`` (3 s), waiting for a
  successor; if none comes it closes everything and exits 0. A second signal stops it at once.
- Orphaned (the keeper killed: its parent pid changed), it serves on until a successor takes
  over, at most ``orphan_timeout`` (60 s), then closes and exits 0.
- The pod feed failing (a bug) closes everything and exits 1: the keeper starts another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvloop
import zmq

from common import blocked_ports, config
from common.errors import RikletError
from common.stats_server import StatsServer
from common.zmqutil import ipc_path
from services.proxy import handoff
from services.proxy.balance import balances
from services.proxy.feed import SNAPSHOT_TIMEOUT, watch_pods
from services.proxy.kernel import mode as proxy_mode
from services.proxy.kernel.forwarder import KernelForwarder
from services.proxy.kernel.forwarder import retire as retire_kernel_table
from services.proxy.kernel.health import HealthChecker
from services.proxy.kernel.ruleset import table_name
from services.proxy.routes import balance_from_pods, listed_endpoints, routes_from_pods
from services.proxy.server import ProxyServer, ProxySettings

# The data path: the kernel's (nftables DNAT) or the user-space forwarder's; the same role.
Forwarder = ProxyServer | KernelForwarder

log = logging.getLogger("services.proxy")


@dataclass(frozen=True)
class Lifetimes:
    """How long a worker waits at each turn of its life (seconds)."""

    linger: float = 3.0             # after SIGTERM, for a successor to take over
    orphan_timeout: float = 60.0    # after the keeper vanished, for a successor
    orphan_check: float = 1.0       # how often the parent pid is compared with the keeper's
    drain_timeout: float = 30.0     # after handing over, for established connections to end
    frame_timeout: float = handoff.FRAME_TIMEOUT   # each hand-off frame, and the release


def settings_from(cfg: config.Config) -> ProxySettings:
    return ProxySettings(bind_host=cfg.proxy_bind_address, connect_timeout=cfg.proxy_connect_timeout,
                         udp_max_flows=cfg.proxy_udp_max_flows,
                         udp_idle_timeout=cfg.proxy_udp_idle_timeout,
                         max_connections=cfg.proxy_max_connections,
                         idle_timeout=cfg.proxy_idle_timeout)


def make_forwarder(cfg: config.Config, settings: ProxySettings) -> tuple[Forwarder, str, str]:
    """The forwarder ``proxy.mode`` asks for (auto: the kernel's where it works), the mode in
    use and why."""
    mode, why = proxy_mode.choose(cfg.proxy_mode)
    log.info("proxy mode", extra={"mode": mode, "reason": why})
    if mode == "kernel":
        def health(on_change: Callable[[], None]) -> HealthChecker:
            return HealthChecker(on_change, interval=cfg.proxy_health_interval,
                                 timeout=cfg.proxy_health_timeout, fall=cfg.proxy_health_fall,
                                 rise=cfg.proxy_health_rise)
        return KernelForwarder(settings, table_name(cfg.agent_id), health=health), mode, why
    return ProxyServer(settings), mode, why


def snapshot(server: Forwarder, mode: str, why: str) -> dict[str, Any]:
    """The ``stats`` answer: the forwarder's counters and the mode in use."""
    out = server.snapshot() if isinstance(server, KernelForwarder) else server.stats.as_dict()
    out.update(mode=mode, mode_reason=why)
    return out


def start_stats(cfg: config.Config, server: Forwarder, force: bool = False,
                mode: tuple[str, str] = ("userspace", "")) -> StatsServer | None:
    """The ``stats`` endpoint for the monitor. Forwarding matters more than being measured:
    if it cannot bind (a live twin, an unwritable run dir), log and forward without it.
    ``force``: a predecessor did not confirm it let go of the endpoint; take it regardless."""
    path = ipc_path(cfg.proxy_endpoint)
    if force and path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    stats = StatsServer(cfg.proxy_endpoint, lambda: snapshot(server, *mode))
    try:
        stats.start()
    except (RikletError, OSError, zmq.ZMQError) as exc:
        log.error("no stats endpoint", extra={"endpoint": cfg.proxy_endpoint, "error": str(exc)})
        return None
    return stats


class Worker:
    def __init__(self, cfg: config.Config, settings: ProxySettings, *, keeper_pid: int | None = None,
                 times: Lifetimes | None = None, handoff_path: str | None = None) -> None:
        self.cfg = cfg
        self.times = times or Lifetimes()
        self.keeper_pid = keeper_pid
        self.handoff_path = handoff_path or handoff.socket_path(cfg.paths_run_dir)
        self.server, self.mode, self.mode_reason = make_forwarder(cfg, settings)
        self.stats: StatsServer | None = None
        self.handoff: handoff.HandoffServer | None = None
        self.feed_failed = False
        self.took_over = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_feed = threading.Event()
        self._feed: threading.Thread | None = None
        self._wake = asyncio.Event()          # any of the states below changed
        self._handed_over = False
        self._draining = False
        self._cut_drain = False
        self._term_deadline: float | None = None
        self._orphan_deadline: float | None = None
        self._orphan_timer: asyncio.TimerHandle | None = None
        self._kernel_table_checked = self.mode == "kernel"

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    # --- the life of a worker ------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until handed over and drained, stopped or orphaned (0), or the feed fails (1)."""
        self._loop = loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self._report_blocked()
        takeover = await loop.run_in_executor(None, handoff.request_takeover, self.handoff_path,
                                              self.times.frame_timeout)
        if takeover is not None:
            self.took_over = True
            state = takeover.state
            state.counters.add_to(self.server.stats)
            self.server.adopt(state.sockets)
            state.sockets = {}
            await self.server.apply(state.routes, state.balance)
            log.info("serving the predecessor's routes", extra={
                "listening": [f"{p}/{n}" for p, n in sorted(self.server.listening())],
                "failed": [f"{p}/{n}" for p, n in sorted(self.server.failed())]})
        self._start_feed()
        confirmed = True
        if takeover is not None:
            since = await loop.run_in_executor(None, takeover.release, self.times.frame_timeout)
            confirmed = since is not None
            if since is not None:
                since.add_to(self.server.stats)
        # Off the loop: a stale endpoint file costs a probe of 0.3 s, while routes arrive.
        self.stats = await loop.run_in_executor(None, start_stats, self.cfg, self.server, not confirmed,
                                                (self.mode, self.mode_reason))
        self._start_handoff_server()
        if self.keeper_pid is not None:
            self._orphan_timer = loop.call_later(self.times.orphan_check, self._check_orphan)
        log.info("proxy started", extra={"bind": self.server.settings.bind_host, "mode": self.mode,
                                         "took_over": takeover is not None,
                                         "keeper": self.keeper_pid})
        return await self._lifecycle()

    async def _lifecycle(self) -> int:
        loop = self.loop
        while True:
            self._wake.clear()
            if self.feed_failed:
                await self._shutdown()
                return 1
            if self._handed_over:
                return await self._drain()
            deadlines = [d for d in (self._term_deadline, self._orphan_deadline) if d is not None]
            timeout: float | None = None
            if deadlines:
                timeout = min(deadlines) - loop.time()
                busy = self.handoff is not None and self.handoff.busy.is_set()
                if timeout <= 0 and not busy:
                    # A successor that connected a moment ago is served before the end.
                    if self.handoff is not None:
                        await loop.run_in_executor(None, self.handoff.close)
                    if self._handed_over:
                        return await self._drain()
                    log.info("no successor took over; stopping", extra={
                        "reason": "signal" if self._term_deadline is not None else "orphaned"})
                    await self._shutdown()
                    log.info("proxy stopped")
                    return 0
                if timeout <= 0:
                    timeout = 0.05   # a hand-off in progress finishes (bounded by its timeouts)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _drain(self) -> int:
        self._draining = True
        loop = self.loop
        deadline = loop.time() + self.times.drain_timeout
        log.info("handed over; draining", extra={"connections": len(self.server.connections),
                                                 "timeout": self.times.drain_timeout})
        while self.server.connections and not self._cut_drain and loop.time() < deadline:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.1)
        left = len(self.server.connections)
        await self._shutdown()
        log.info("drained; proxy stopped", extra={"connections_cut": left})
        return 0

    async def _shutdown(self) -> None:
        """Close everything still open: hand-off socket, feed, listeners, connections, stats."""
        loop = self.loop
        if self._orphan_timer is not None:
            self._orphan_timer.cancel()
        if self.handoff is not None:
            await loop.run_in_executor(None, self.handoff.close)
        self._stop_feed.set()
        if self._feed is not None:
            # Join before closing the loop: the feed may still call on_pods until it sees the stop.
            await loop.run_in_executor(None, self._feed.join, SNAPSHOT_TIMEOUT + 1.0)
        await self.server.close()
        if self.stats is not None:
            await loop.run_in_executor(None, self.stats.stop)
            self.stats = None

    def _wakeup(self) -> None:
        self._wake.set()

    def _on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self._draining:
            log.info("signal while draining: closing the remaining connections", extra={"signal": name})
            self._cut_drain = True
        elif self._term_deadline is None:
            log.info("stopping: serving on while a successor may take over",
                     extra={"signal": name, "linger": self.times.linger})
            self._term_deadline = self.loop.time() + self.times.linger
        else:
            log.info("second signal: stopping now", extra={"signal": name})
            self._term_deadline = self.loop.time()
        self._wakeup()

    def _check_orphan(self) -> None:
        self._orphan_timer = None
        if os.getppid() != self.keeper_pid:
            log.warning("keeper gone: serving on until a successor takes over", extra={
                "keeper": self.keeper_pid, "timeout": self.times.orphan_timeout})
            self._orphan_deadline = self.loop.time() + self.times.orphan_timeout
            self._wakeup()
            return
        self._orphan_timer = self.loop.call_later(self.times.orphan_check, self._check_orphan)

    def _report_blocked(self) -> None:
        """Blocked ports go to a file the manager reads; those a predecessor left there stay
        blocked until bound or found free."""
        path = blocked_ports.path_in(self.cfg.paths_state_dir)
        self.server.seed_blocked(blocked_ports.read(path))
        self.server.on_blocked = lambda blocked: blocked_ports.write(path, blocked)

    # --- the pod feed --------------------------------------------------------------------------

    def _start_feed(self) -> None:
        loop, server = self.loop, self.server

        def on_pods(pods: list[dict[str, Any]]) -> None:
            # Routes are computed here, on the feed thread, to keep the data path's loop free.
            routes, balance = routes_from_pods(pods), balances(balance_from_pods(pods))
            if isinstance(server, KernelForwarder):
                loop.call_soon_threadsafe(server.update, routes, balance, listed_endpoints(pods))
            else:
                loop.call_soon_threadsafe(server.update, routes, balance)
                loop.call_soon_threadsafe(self._retire_kernel_table)

        def run_feed() -> None:
            try:
                watch_pods(self.cfg, on_pods, self._stop_feed)
            except Exception:  # a feed bug would freeze the routes silently: exit, be restarted
                log.exception("pod feed failed")
                loop.call_soon_threadsafe(self._on_feed_failed)

        self._feed = threading.Thread(target=run_feed, name="pod-feed", daemon=True)
        self._feed.start()

    def _retire_kernel_table(self) -> None:
        """User space, after a kernel-mode run (the mode changed): the old table would go on
        DNATing past our listeners to endpoints it no longer follows. Emptied once, after the
        listeners for memory's routes are up, so the ports never go unanswered."""
        if self._kernel_table_checked:
            return
        self._kernel_table_checked = True
        self.loop.create_task(self._empty_kernel_table())

    async def _empty_kernel_table(self) -> None:
        await self.server.settled()
        table = table_name(self.cfg.agent_id)
        try:
            emptied = await self.loop.run_in_executor(None, retire_kernel_table, table,
                                                      self.server.settings.bind_host)
        except RikletError as exc:
            log.debug("no kernel table to retire", extra={"table": table, "error": str(exc)})
            return
        if emptied:
            log.info("user-space mode: the kernel mode's rules removed", extra={"table": table})

    def _on_feed_failed(self) -> None:
        self.feed_failed = True
        self._wakeup()

    # --- the old worker's side of a hand-off (called on the hand-off thread) --------------------

    def _start_handoff_server(self) -> None:
        hs = handoff.HandoffServer(self.handoff_path, self._handoff_state, self._release,
                                   self._released, frame_timeout=self.times.frame_timeout)
        try:
            hs.start()
        except OSError as exc:
            log.error("no hand-off socket: a restart will not be seamless",
                      extra={"path": self.handoff_path, "error": str(exc)})
            return
        self.handoff = hs

    def _handoff_state(self) -> tuple[dict[str, Any], list[int]]:
        return asyncio.run_coroutine_threadsafe(self._snapshot(), self.loop).result(timeout=10)

    async def _snapshot(self) -> tuple[dict[str, Any], list[int]]:
        server = self.server
        await server.settled()     # listeners and routes agree between two reconciles
        listeners = server.listener_fds()
        fds: list[int] = []
        try:
            for _, fd in listeners:
                fds.append(os.dup(fd))   # sent from another thread: a copy the loop cannot close
        except OSError:
            handoff.close_fds(fds)
            raise
        frame = handoff.encode_state(server.routes, server.balance, server.stats.as_dict(),
                                     [key for key, _ in listeners])
        return frame, fds

    def _release(self) -> dict[str, Any]:
        final = asyncio.run_coroutine_threadsafe(self._stop_listening(), self.loop).result(timeout=10)
        if self.stats is not None:
            # Before ``released``: the successor binds the same path once it has the answer.
            self.stats.stop()
            self.stats = None
        return final

    async def _stop_listening(self) -> dict[str, Any]:
        self._stop_feed.set()
        await self.server.close(abort_connections=False)   # the successor holds the sockets
        log.info("listeners closed for the successor")
        return self.server.stats.as_dict()

    def _released(self) -> None:
        def handed_over() -> None:
            self._handed_over = True
            self._wakeup()
        self.loop.call_soon_threadsafe(handed_over)


# --- logging that outlives the keeper ----------------------------------------------------------

class _OutlivingHandler(logging.StreamHandler):
    """stderr is the keeper's pipe from supervisord, which closes it once the keeper is gone:
    a worker that lingers or drains after that would log into a broken pipe. On the first
    EPIPE, stdout and stderr are pointed at ``fallback`` (the program's log file) instead."""

    def __init__(self, fallback: str | None) -> None:
        super().__init__(sys.stderr)
        self.fallback = fallback
        self.moved = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.moved and isinstance(sys.exc_info()[1], BrokenPipeError):
            self.moved = True
            redirect_output(self.fallback)
            with contextlib.suppress(Exception):
                self.emit(record)
            return
        super().handleError(record)


def redirect_output(path: str | None) -> None:
    """Point file descriptors 1 and 2 at ``path`` (appended; /dev/null if it cannot be opened)."""
    fd = -1
    if path and os.path.isdir(os.path.dirname(path)):
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    if fd < 0:
        fd = os.open(os.devnull, os.O_WRONLY)
    for target in (1, 2):
        os.dup2(fd, target)
    os.close(fd)
    with contextlib.suppress(Exception):
        sys.stderr.flush()


def program_log(cfg: config.Config) -> str:
    """The file supervisord.conf gives the proxy program's output."""
    return os.path.join(cfg.paths_state_dir, "log", "proxy.log")


def guard_logging(fallback: str | None) -> None:
    root = logging.getLogger()
    for i, handler in enumerate(root.handlers):
        if type(handler) is logging.StreamHandler and handler.stream is sys.stderr:
            guarded = _OutlivingHandler(fallback)
            guarded.setFormatter(handler.formatter)
            for flt in handler.filters:
                guarded.addFilter(flt)
            root.handlers[i] = guarded


def raise_open_files_limit() -> int:
    """Lift the soft limit on open descriptors to the hard one: every TCP client takes two and
    a UDP flow up to two, and a login shell's soft 1024 would cap the proxy far below
    ``proxy.max_connections`` per port. Returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        with open("/proc/sys/fs/nr_open") as f:
            hard = int(f.read())
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:
            log.warning("cannot raise the open files limit", extra={"soft": soft, "hard": hard,
                                                                      "error": str(exc)})
            return soft
        return hard
    return soft


def main(cfg: config.Config, keeper_pid: int | None) -> int:
    guard_logging(program_log(cfg))
    limit = raise_open_files_limit()
    log.info("open files limit", extra={"limit": limit})
    return uvloop.run(Worker(cfg, settings_from(cfg), keeper_pid=keeper_pid).run())
