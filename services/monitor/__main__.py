"""riklet-monitor: answers node and pod metric queries over IPC and serves /metrics; under
systemd it also tells systemd how the agent is (services.monitor.notify).

Run as ``riklet-monitor`` or ``python -m services.monitor``. SIGTERM or SIGINT stop it cleanly
(exit 0): the HTTP server is shut down and the socket file removed.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

import zmq

from common import cgroups, config
from common import log as rlog
from common.errors import RikletError
from common.memclient import PodMirror
from common.parentwatch import watch_parent
from common.zmqutil import RequestClient, ipc_path, make_run_dir, prepare_ipc_bind, route_one
from services.monitor import notify
from services.monitor.cgroupfiles import GroupReader, kept_budget, raise_open_files
from services.monitor.httpserver import MetricsServer
from services.monitor.loop import SampleLoop
from services.monitor.podtable import PodTable, kept
from services.monitor.procstats import supervisor_pids
from services.monitor.service import Monitor, proxy_stats_reader
from services.monitor.snapshot import Snapshotter

if TYPE_CHECKING:
    from services.monitor.push import MetricPusher

log = logging.getLogger("riklet.monitor")

POLL_MS = 1000  # how soon a stop request is noticed while the socket is idle


def serve(cfg: config.Config, stop: threading.Event, systemd: Mapping[str, str] | None = None) -> None:
    ctx: zmq.Context[Any] = zmq.Context.instance()
    make_run_dir(cfg.paths_run_dir)
    prepare_ipc_bind(cfg.monitor_endpoint, ctx)
    proxy = RequestClient(cfg.proxy_endpoint, timeout=0.3, retries=0, context=ctx)
    manager = RequestClient(cfg.manager_endpoint, timeout=0.3, retries=0, context=ctx)
    raise_open_files()
    table = PodTable()
    # The table keeps each record as the mirror holds it (only what the monitor reads) and never
    # changes it: it shares the mirror's.
    mirror = PodMirror(cfg, on_change=table.on_change, context=ctx, shared=True, keep=kept)
    table.is_synced = mirror.wait_synced
    snapshotter = Snapshotter(cfg.node_id, cfg.paths_state_dir, GroupReader(cgroups.detect(), kept_budget()))
    loop = SampleLoop(snapshotter, table, cfg.monitoring_metric_resolution)
    table.on_new = loop.pods_arrived
    monitor = Monitor(cfg.node_id, table, loop, proxy_stats=proxy_stats_reader(proxy),
                      manager_stats=proxy_stats_reader(manager, "manager"),
                      service_pids=functools.partial(supervisor_pids,
                                                     os.path.join(cfg.paths_run_dir, "supervisor.sock")))
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(cfg.monitor_endpoint)
    path = ipc_path(cfg.monitor_endpoint)
    try:
        if path:
            os.chmod(path, 0o600)
        http = MetricsServer(cfg.metrics_address, monitor.scrape) if cfg.monitoring_metrics_enabled else None
        pusher = start_pusher(cfg, monitor)
        mirror.start()
        loop.start()
        if http is not None:
            http.start()
        notifier = notify.start(cfg, table, ctx, systemd or {})
        log.info("monitor ready", extra={"endpoint": cfg.monitor_endpoint, "metrics": cfg.metrics_address,
                                         "scheduler": cfg.scheduler_address})
        try:
            while not stop.is_set():
                if sock.poll(POLL_MS, zmq.POLLIN):
                    route_one(sock, monitor.handle)
        finally:
            if notifier is not None:
                notifier.stop()
            if http is not None:
                http.stop()
            loop.stop()
            mirror.stop()
            if pusher is not None:
                pusher.stop()
    finally:
        sock.close(linger=0)
        proxy.close()
        manager.close()
        if path and os.path.exists(path):
            os.unlink(path)
        log.info("monitor stopped")


def start_pusher(cfg: config.Config, monitor: Monitor) -> MetricPusher | None:
    """In RIK mode, push each sample to the scheduler (from the sampling thread)."""
    if not cfg.scheduler_address:
        return None
    # Imported in RIK mode only: gRPC and protobuf cost a monitor that pushes nothing ~8 MiB.
    from common.rik import StatusSender
    from services.monitor.push import MetricPusher

    pusher = MetricPusher(monitor, StatusSender(cfg.scheduler_address, cfg.node_id))
    monitor.loop.listeners.append(pusher.on_sample)
    pusher.start()
    return pusher


def main(argv: Sequence[str] | None = None) -> int:
    watch_parent("riklet-monitor")
    systemd = notify.take_environment(os.environ)   # before anything here could pass it on
    cfg, _ = config.parse_args("riklet-monitor", argv)
    rlog.configure("monitor", cfg)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        serve(cfg, stop, systemd)
    # Another monitor live on the endpoint, the metrics port taken, the run dir unwritable.
    except (RikletError, OSError, zmq.ZMQError) as exc:
        log.error("cannot start", extra={"error": str(exc)})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
