"""gpulease-coordinator entry point: wire the store, view, services and gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from types import MappingProxyType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gpulease.common import eventloop, httpserve, logs, transport
from gpulease.common.sdnotify import sd_notify
from gpulease.common.tls import TLSConfig, TlsFiles
from gpulease.coordinator import config as config_mod
from gpulease.coordinator.agents import AgentChannels
from gpulease.coordinator.allocations import AllocationPolicy, AllocationService
from gpulease.coordinator.audit import AuditLog, AuditPolicy
from gpulease.coordinator.committer import EtcdCommitter
from gpulease.coordinator.containers import ContainerForwarder
from gpulease.coordinator.dashboard import Dashboard
from gpulease.coordinator.domain import Allocation
from gpulease.coordinator.endings import Endings
from gpulease.coordinator.fair_share import FairShare
from gpulease.coordinator.guard import Guard, RateLimit
from gpulease.coordinator.http_api import build_app
from gpulease.coordinator.keys import Keys
from gpulease.coordinator.liveness import LivenessPolicy
from gpulease.coordinator.metrics import CoordinatorMetrics, MeteredCommitter, ViewCollector
from gpulease.coordinator.nodes import NodeService
from gpulease.coordinator.policies import Policies
from gpulease.coordinator.preemption import Preemptions
from gpulease.coordinator.servicer import AdminServicer, CoordinatorServicer, NodeServicer
from gpulease.coordinator.store import Get, Store, StoreUnavailable
from gpulease.coordinator.store import TlsFiles as EtcdTls
from gpulease.coordinator.tokens import Tokens
from gpulease.coordinator.view import ClusterView
from gpulease.coordinator.waiting import QueuePolicy, WaitingQueue
from gpulease.errors import GpuLeaseError
from gpulease.v1 import coordinator_pb2, coordinator_pb2_grpc

log = logging.getLogger("gpulease.coordinator")
# Users', agents' and operators' services (see coordinator/servicer.py); health is reported for each.
SERVICE_NAMES = tuple(s.full_name for s in coordinator_pb2.DESCRIPTOR.services_by_name.values())


async def serve(cfg: config_mod.CoordinatorConfig) -> None:
    etcd_tls = EtcdTls(cfg.etcd_ca, cfg.etcd_cert or None, cfg.etcd_key or None) if cfg.etcd_ca else None
    tls = TlsFiles(TLSConfig(cfg.tls_ca, cfg.tls_cert, cfg.tls_key)) if cfg.tls else None
    store = Store(cfg.etcd, tls=etcd_tls, timeout=cfg.etcd_timeout, user=cfg.etcd_user,
                  password=config_mod.etcd_password(cfg))  # fmt: skip
    await store.start()
    keys = Keys(cfg.prefix)
    fatal: list[str] = []
    view = ClusterView(store, keys)
    metrics = CoordinatorMetrics()
    store.on_txn = metrics.etcd_txn_seconds.observe
    allocations = AllocationService(
        store,
        view,
        keys,
        MeteredCommitter(EtcdCommitter(store, keys), metrics),
        AllocationPolicy(
            default_ttl=cfg.default_ttl,
            default_cpus_per_gpu=cfg.default_cpus_per_gpu,
            default_memory_per_gpu=cfg.default_memory_per_gpu,
            max_txn_ops=cfg.etcd_max_txn_ops,
            priority_classes=MappingProxyType(dict(cfg.priority_classes)),
            default_class=cfg.default_priority_class,
        ),
    )
    fair = FairShare(store, keys, view, cfg.fair_share_half_life)
    preemptions = Preemptions(store, keys, view)
    queue = WaitingQueue(store, view, keys, allocations, QueuePolicy(cfg.queue_ttl, cfg.max_wait, cfg.strict_fifo),
                         fair, preemptions)  # fmt: skip
    nodes = NodeService(
        store,
        view,
        keys,
        LivenessPolicy(cfg.heartbeat_interval, cfg.node_ttl, cfg.max_heartbeats_per_second, cfg.node_liveness),
    )
    agents = AgentChannels(tls)
    audit = AuditLog(store, keys, AuditPolicy(cfg.audit_max_age, cfg.audit_max_entries))
    tokens = Tokens(store, keys, view, audit)
    policies = Policies(store, keys, view, audit)
    endings = Endings(store, keys, view, cfg.container_retention)
    _count_expiries(view, metrics)
    allocations.on_admitted = metrics.observe_admitted
    containers = ContainerForwarder(allocations, view, agents, endings, policy=cfg.container_policy)
    preemptions.stop_containers = containers.stop_all
    guard = Guard(tokens, audit, tls=tls is not None, rate=RateLimit(cfg.rate_limit, 2 * cfg.rate_limit))
    guard.observer = metrics.observe_rpc
    collector = ViewCollector(view, lambda: [p.pool for p in queue.pending()])
    collector.liveness_timing = nodes.liveness.timing
    metrics.registry.register(collector)
    http = None
    if cfg.http_listen:
        dashboard = Dashboard(
            view, tokens=tokens, tls=tls is not None, queue=queue, policies=policies, telemetry=nodes.telemetry
        )
        app = build_app(metrics, collector, view, store, token=httpserve.read_token(cfg.metrics_token_file),
                        dashboard=dashboard)  # fmt: skip
        http = httpserve.HttpServer(app, cfg.http_listen)

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(
        CoordinatorServicer(allocations, nodes, view, containers, guard, endings, audit, queue, policies, preemptions),
        server,
    )
    coordinator_pb2_grpc.add_NodeServiceServicer_to_server(
        NodeServicer(allocations, nodes, view, guard, containers), server
    )
    coordinator_pb2_grpc.add_AdminServiceServicer_to_server(
        AdminServicer(allocations, nodes, view, guard, tokens, audit, policies), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    ports = [(cfg.listen, tls.server_credentials(require_client_cert=False) if tls else None)]
    if cfg.mtls_listen and tls:
        ports.append((cfg.mtls_listen, tls.server_credentials(require_client_cert=True)))
    for address, creds in ports:
        try:
            if creds is None:
                server.add_insecure_port(address)
            else:
                server.add_secure_port(address, creds)
        except RuntimeError as exc:
            raise GpuLeaseError(f"cannot listen on {address}: {exc} (is the port in use?)") from exc
    await server.start()
    if http is not None:
        try:
            await http.start()
        except OSError as exc:
            await server.stop(grace=None)
            raise GpuLeaseError(exc.strerror or str(exc)) from exc
        log.info("HTTP on %s: /metrics%s, /healthz, /readyz", cfg.http_listen,
                 " (bearer token)" if cfg.metrics_token_file else "")  # fmt: skip
    log.info(
        "listening on %s (%s)%s, etcd %s, prefix %s, event loop %s",
        cfg.listen, "TLS, tokens" if tls else "clear text, no authentication",
        f" and {cfg.mtls_listen} (mutual TLS)" if cfg.mtls_listen else "",
        ",".join(cfg.etcd), cfg.prefix, eventloop.resolve(cfg.event_loop),
    )  # fmt: skip

    stop = asyncio.Event()
    view_task = asyncio.create_task(view.run(), name="view")
    commit_task = asyncio.create_task(allocations.run(), name="commits")
    background = [
        asyncio.create_task(audit.run(), name="audit-retention"),
        asyncio.create_task(endings.run(), name="container-records"),
        asyncio.create_task(queue.run(), name="queue"),
        asyncio.create_task(nodes.run(), name="node-liveness"),
        asyncio.create_task(fair.run(), name="fair-share"),
        asyncio.create_task(_check_txn_limit(store, keys, cfg.etcd_max_txn_ops, fatal, stop), name="txn-limit"),
    ]
    if tls is None and cfg.insecure and not transport.is_loopback(cfg.listen):
        background.append(asyncio.create_task(transport.warn_while_insecure(log, "the coordinator"), name="warn"))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP (systemctl reload) re-reads the TLS files; without TLS it must still not kill us.
    loop.add_signal_handler(
        signal.SIGHUP, tls.request_reload if tls else lambda: log.info("SIGHUP: no TLS files to reload")
    )
    if cfg.bootstrap_token_file and tls is not None:
        background.append(asyncio.create_task(_bootstrap(view, tokens, cfg.bootstrap_token_file), name="bootstrap"))

    async def track_health() -> None:
        # NOT_SERVING until the view is in sync with etcd, and again whenever it loses sync.
        serving = None
        while True:
            now = view.synced.is_set()
            if now != serving:
                status = health_pb2.HealthCheckResponse.SERVING if now else health_pb2.HealthCheckResponse.NOT_SERVING
                for name in ("", *SERVICE_NAMES):
                    await health_servicer.set(name, status)
                if now and serving is None:
                    sd_notify("READY=1")
                serving = now
            await asyncio.sleep(0.1)

    health_task = asyncio.create_task(track_health(), name="health")
    await stop.wait()
    log.info("shutting down")
    sd_notify("STOPPING=1")
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=5)
    if http is not None:
        await http.stop()
    for task in (commit_task, view_task, health_task, *background):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await allocations.close()  # drains revokes and settles while the store can still carry them
    await endings.close()
    await audit.close()
    await agents.close()
    await store.close()
    if fatal:
        raise GpuLeaseError(fatal[0])


def _count_expiries(view: ClusterView, metrics: CoordinatorMetrics) -> None:
    """Counts lease expiries, then hands each to the view's hook as set before (container records)."""
    before = view.on_expired

    def expired(alloc: Allocation) -> None:
        metrics.observe_expired(alloc)
        if before is not None:
            before(alloc)

    view.on_expired = expired


async def _check_txn_limit(store: Store, keys: Keys, ops: int, fatal: list[str], stop: asyncio.Event) -> None:
    """The configured etcd_max_txn_ops, checked against etcd at start: one transaction of that many
    harmless reads. A coordinator that believed etcd allows more than it does would send gangs (and
    large batches) that etcd refuses every time; it stops instead, saying which setting to fix.
    Retried while etcd cannot be reached (the view waits for it too)."""
    delay = 0.5
    while True:
        try:
            await store.txn([], [Get(keys.marker())] * ops)
            return
        except grpc.aio.AioRpcError as exc:
            if "too many operations" not in (exc.details() or ""):
                raise
            fatal.append(
                f"configuration error: etcd_max_txn_ops is {ops}, which exceeds etcd's --max-txn-ops (etcd refused "
                f"one transaction of {ops} reads: {exc.details()}); set etcd_max_txn_ops (--etcd-max-txn-ops) to at "
                "most etcd's --max-txn-ops (128 unless etcd was started with another value), or raise etcd's"
            )
            log.error("%s", fatal[0])
            stop.set()
            return
        except StoreUnavailable as exc:
            log.debug("etcd_max_txn_ops not checked yet: %s", exc)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)


async def _bootstrap(view: ClusterView, tokens: Tokens, path: str) -> None:
    """The first admin token, once the view is in sync (so a replica does not race a marker it
    has not seen); retried while etcd is unreachable."""
    while True:
        await view.synced.wait()
        try:
            await tokens.bootstrap(path)
            return
        except GpuLeaseError as exc:
            log.warning("bootstrap token not written yet: %s", exc.message)
            await asyncio.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config_mod.load(argv)
    except GpuLeaseError as exc:
        print(f"gpulease-coordinator: error: {exc.message}", file=sys.stderr)
        return 2
    logs.setup(cfg.log_level, cfg.log_format)
    try:
        eventloop.run(serve(cfg), cfg.event_loop)
    except GpuLeaseError as exc:
        log.error("%s", exc.message)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
