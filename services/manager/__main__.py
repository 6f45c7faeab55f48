"""riklet-manager: the Node API and the reconciler that runs pods."""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common import auth, blocked_ports, config, pb
from common import log as logsetup
from common.errors import RikletError
from common.memclient import MemoryClient, PodMirror
from common.parentwatch import watch_parent
from common.policy import Policy
from common.zmqutil import RequestClient, make_run_dir

log = logging.getLogger("riklet.manager")

SERVICE_NAME = "riklet.v1.Node"
MEMORY_CONCURRENCY = 8   # memory requests the manager may have in flight at once


def main(argv: list[str] | None = None) -> None:
    watch_parent("riklet-manager")
    cfg, _ = config.parse_args("riklet-manager", argv)
    logsetup.configure("manager", cfg)
    pb.ensure()
    from common.pb import node_pb2  # generated: import after ensure()
    from common.stats_server import StatsServer
    from services.manager.api.execstream import Execs
    from services.manager.api.listing import add_to_server
    from services.manager.api.node import NodeService
    from services.manager.api.streams import StreamLimits
    from services.manager.chas.api import start_from_config
    from services.manager.chas.stats import ChasStats
    from services.manager.containerd.client import Containerd
    from services.manager.containerd.cni import PodNetworks
    from services.manager.containerd.runtime import ContainerdRuntime
    from services.manager.podevents import Recorder
    from services.manager.process import ProcessRuntime
    from services.manager.reconcile.events import ShimEvents
    from services.manager.reconcile.events import path_in as events_path
    from services.manager.reconcile.pidwatch import raise_fd_limit
    from services.manager.reconcile.reconciler import Reconciler
    from services.manager.rik.link import SchedulerLink
    from services.manager.telemetry import Telemetry
    from services.manager.volumes.sizewatch import SizeWatch
    from services.manager.volumes.store import VolumeStore

    make_run_dir(cfg.paths_run_dir)
    raise_fd_limit()  # the reconciler holds a pidfd per live pod
    # The API's calls and the reconciler's sync workers write at once: their requests share
    # memory's commits instead of queueing behind one socket.
    memory = MemoryClient(cfg, concurrency=MEMORY_CONCURRENCY)
    runtime = ProcessRuntime(
        cfg.paths_state_dir, cfg.runtime_stop_grace_period, cfg.logs_max_size, cfg.logs_max_files,
        {"initial": cfg.restart_backoff_initial, "max": cfg.restart_backoff_max,
         "reset": cfg.restart_backoff_reset}, user=cfg.runtime_user,
        notify_socket=events_path(cfg.paths_run_dir))
    # The containerd runtime is always there: without containerd, its pods fail with the reason
    # while process pods run on.
    backoff = {"initial": cfg.restart_backoff_initial, "max": cfg.restart_backoff_max,
               "reset": cfg.restart_backoff_reset}
    containers = ContainerdRuntime(
        cfg.paths_state_dir,
        Containerd(cfg.containerd_address, cfg.containerd_namespace, cfg.containerd_snapshotter),
        PodNetworks(cfg.paths_state_dir, runtime.agent_id, bridge=cfg.network_bridge,
                    subnet=cfg.network_subnet, cni_path=cfg.network_cni_path),
        grace_default=cfg.runtime_stop_grace_period, log_max_size=cfg.logs_max_size,
        log_max_files=cfg.logs_max_files, backoff=backoff,
        insecure_registries=cfg.containerd_insecure_registries, user=cfg.runtime_user)
    service: NodeService | None = None
    sizes = SizeWatch(memory, runtime.pod_dir, cfg.volumes_size_check_interval)
    reconciler: Reconciler | None = None
    link: SchedulerLink | None = None

    def on_change(name: str, record: dict[str, Any] | None, before: dict[str, Any] | None) -> None:
        if service is not None:
            service.on_change(name, record, before)
        if reconciler is not None:
            reconciler.changed(name, record, before)
        sizes.changed(name, record, before)
        if link is not None:
            link.on_change(name, record, before)

    mirror = PodMirror(cfg, on_transition=on_change)   # the mirror says what each change replaced
    mirror.start()
    if not mirror.wait_synced(30):
        log.warning("memory not reachable yet; serving and retrying")
    # One reader of the proxy's blocked ports for both drivers, refreshed by the reconciler.
    blocked = blocked_ports.Reader(blocked_ports.path_in(cfg.paths_state_dir), refreshed_elsewhere=True)
    runtime.blocked_ports = containers.blocked_ports = blocked
    recorder = Recorder(memory.add_events)   # pod events, written to memory in batches
    recorder.start()
    sizes.recorder = recorder
    containers.recorder = recorder
    reconciler = Reconciler(memory, {"process": runtime, "containerd": containers}, mirror,
                            resync_interval=cfg.reconcile_resync_interval, blocked=blocked,
                            recorder=recorder, probes=True)
    telemetry = Telemetry()   # Node API, pod start and probe metrics, read by the monitor
    reconciler.telemetry = telemetry
    if reconciler.prober is not None:
        reconciler.prober.telemetry = telemetry
    shim_events = ShimEvents(events_path(cfg.paths_run_dir), reconciler.shim_said)
    containers.on_progress = reconciler.progress
    service = NodeService(memory, mirror, RequestClient(cfg.monitor_endpoint, timeout=2.0, retries=1),
                          runtime.log_path, cfg.runtime_stop_grace_period, reconciler.poke,
                          images=containers, policy=Policy.from_config(cfg), offer=reconciler.offer,
                          recorder=recorder, volumes=VolumeStore(cfg.paths_state_dir))
    service.usage_of = runtime.memory_usage   # both drivers' groups are <pod group>/<container>
    service.execs = Execs(memory, runtime, containers)
    service.execs.clean_leftovers()

    token = auth.load_or_create_token(cfg.token_path)
    tls = bool(cfg.tls_cert_file and cfg.tls_key_file)
    try:
        auth.check_exposure(cfg.api_address.rsplit(":", 1)[0], tls, cfg.security_insecure, "the Node API",
                            "api.address")
    except RikletError as exc:
        raise SystemExit(f"riklet-manager: {exc}") from None
    # Streams get their own share of the pool (services/manager/api/streams.py): open watches and
    # log follows can never take the workers unary calls need.
    streams = StreamLimits(cfg.api_max_streams, cfg.api_max_streams_per_client)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=streams.workers, thread_name_prefix="grpc"),
                         interceptors=[telemetry.interceptor(), auth.grpc_token_interceptor(lambda: token),
                                       streams.interceptor()],
                         options=[("grpc.max_receive_message_length", 1024 * 1024)])
    add_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (node_pb2.DESCRIPTOR.services_by_name["Node"].full_name, reflection.SERVICE_NAME,
         health.SERVICE_NAME), server)
    if tls:
        assert cfg.tls_cert_file and cfg.tls_key_file
        bound = server.add_secure_port(cfg.api_address, auth.grpc_server_credentials(
            cfg.tls_cert_file, cfg.tls_key_file, cfg.tls_ca_file))
    else:
        bound = server.add_insecure_port(cfg.api_address)
    if bound == 0:
        raise SystemExit(f"riklet-manager: cannot listen on {cfg.api_address}")
    server.start()
    shim_events.start()  # bound before the first sync: a shim started from now on is heard
    reconciler.start()
    chas_stats = ChasStats()
    stats_server = StatsServer(cfg.manager_endpoint,
                               lambda: {**chas_stats.snapshot(), "manager": telemetry.snapshot()},
                               name="manager-stats")
    stats_server.start()
    try:
        chas_api = start_from_config(cfg, service, chas_stats)
    except RikletError as exc:
        raise SystemExit(f"riklet-manager: {exc}") from None
    reporter = start_reporter(cfg, service, chas_stats, chas_api)
    threading.Thread(target=report_orphans, args=(containers, mirror), name="orphans", daemon=True).start()
    if cfg.scheduler_address:
        link = SchedulerLink(cfg.scheduler_address, cfg.node_id, memory, mirror, reconciler.poke,
                             service.apply_locks, cfg.runtime_stop_grace_period, Policy.from_config(cfg),
                             offer=reconciler.offer, volumes=service.volumes)
        link.recorder = recorder
        link.start()
        log.info("RIK mode", extra={"scheduler": cfg.scheduler_address, "node": cfg.node_id})
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("manager serving", extra={"address": cfg.api_address})

    done = threading.Event()
    threading.Thread(target=sizes.run, args=(done,), name="emptydir-sizes", daemon=True).start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    log.info("manager stopping")
    health_servicer.enter_graceful_shutdown()
    if link is not None:
        link.stop()
    if reporter is not None:
        reporter.stop()
    if chas_api is not None:
        chas_api.stop()
    server.stop(grace=2).wait()
    stats_server.stop()
    shim_events.stop()
    reconciler.stop()
    recorder.stop()
    mirror.stop()
    # Workloads are left running on purpose: their shims do not depend on this process. Their
    # cgroups stay with them; the agent's empty groups (no pod, or pods gone) are removed, so a
    # stopped agent leaves nothing a restart does not need.
    _prune_cgroups(runtime.agent_cgroup())


def _prune_cgroups(relpath: str) -> None:
    from common import cgroups
    try:
        left = cgroups.prune(relpath)
    except RikletError as exc:
        log.warning("agent cgroups not removed", extra={"cgroup": relpath, "error": str(exc)})
        return
    if left:
        log.info("cgroups of running pods kept", extra={"cgroup": relpath, "kept": len(left)})


def start_reporter(cfg: Any, service: Any, stats: Any, api: Any) -> Any:
    """Registration and health reports to the CHaS API server, when one is configured; the
    health body is the node's own ``GET /health`` (even with the HTTP API turned off)."""
    if not cfg.chas_api_url:
        return None
    import shutil

    from common.auth import read_token
    from services.manager.chas.api import ChasApi
    from services.manager.chas.client import ChasReporter, resources_from_monitor

    if api is None:  # the HTTP API is off: the health figures still come from the same code
        api = ChasApi(service, stats, host=cfg.chas_bind_address, port=0, token=lambda: "",
                      host_ports=cfg.chas_host_ports, ssl_context=None, started_at=time.time(),
                      disk_path=cfg.paths_state_dir)

    def resources() -> dict[str, Any]:
        return dict(resources_from_monitor(service.monitor.call("node.resources"),
                                           shutil.disk_usage(cfg.paths_state_dir).total))

    def health() -> dict[str, Any]:
        """Exactly the seed's health body (the node's own /health adds detail fields)."""
        body = api.health()
        res = body["resources"]
        return {"status": body["status"], "uptime": body["uptime"], "resources": {
            k: res[k] for k in ("cpu_usage", "memory_usage", "disk_available", "container_count")}}

    reporter = ChasReporter(cfg.chas_api_url, cfg.node_id, cfg.node_hostname, cfg.node_ip_address,
                            cfg.chas_port, resources, health, cfg.chas_health_interval, stats,
                            token=read_token(cfg.chas_token_file) if cfg.chas_token_file else None)
    reporter.start()
    log.info("reporting to CHaS", extra={"chas_url": cfg.chas_api_url, "node": cfg.node_id,
                                         "interval": cfg.chas_health_interval})
    return reporter


def report_orphans(containers: Any, mirror: Any) -> None:
    """Containers of this agent that no pod in memory owns are logged, never killed: they may be
    an operator's to inspect (the policy for what memory does not know)."""
    from common.errors import RikletError
    if not mirror.wait_synced(60):
        return
    try:
        orphans = containers.orphans(set(mirror.names()))
    except RikletError as exc:
        log.info("containerd not checked for orphan containers", extra={"error": exc.message})
        return
    for o in orphans:
        log.warning("container of no known pod left running (remove it with ctr if unwanted)", extra=o)


if __name__ == "__main__":
    main()
