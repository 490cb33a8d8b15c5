"""gpulease-coordinator entry point: wire the store, view, services and gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gpulease.common import eventloop
from gpulease.common.sdnotify import sd_notify
from gpulease.coordinator import config as config_mod
from gpulease.coordinator.agents import AgentChannels
from gpulease.coordinator.allocations import AllocationPolicy, AllocationService
from gpulease.coordinator.committer import EtcdCommitter
from gpulease.coordinator.containers import ContainerForwarder
from gpulease.coordinator.keys import Keys
from gpulease.coordinator.nodes import NodePolicy, NodeService
from gpulease.coordinator.servicer import AdminServicer, CoordinatorServicer, NodeServicer
from gpulease.coordinator.store import Store, TlsFiles
from gpulease.coordinator.view import ClusterView
from gpulease.errors import GpuLeaseError
from gpulease.v1 import coordinator_pb2, coordinator_pb2_grpc

log = logging.getLogger("gpulease.coordinator")
# Users', agents' and operators' services (see coordinator/servicer.py); health is reported for each.
SERVICE_NAMES = tuple(s.full_name for s in coordinator_pb2.DESCRIPTOR.services_by_name.values())


async def serve(cfg: config_mod.CoordinatorConfig) -> None:
    tls = TlsFiles(cfg.etcd_ca, cfg.etcd_cert or None, cfg.etcd_key or None) if cfg.etcd_ca else None
    store = Store(cfg.etcd, tls=tls, timeout=cfg.etcd_timeout)
    await store.start()
    keys = Keys(cfg.prefix)
    view = ClusterView(store, keys)
    allocations = AllocationService(
        store,
        view,
        keys,
        EtcdCommitter(store, keys),
        AllocationPolicy(
            default_ttl=cfg.default_ttl,
            default_cpus_per_gpu=cfg.default_cpus_per_gpu,
            default_memory_per_gpu=cfg.default_memory_per_gpu,
            max_txn_ops=cfg.etcd_max_txn_ops,
        ),
    )
    nodes = NodeService(store, view, keys, NodePolicy(cfg.node_ttl, cfg.heartbeat_interval))
    agents = AgentChannels()
    containers = ContainerForwarder(allocations, view, agents)

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(
        CoordinatorServicer(allocations, nodes, view, containers), server
    )
    coordinator_pb2_grpc.add_NodeServiceServicer_to_server(NodeServicer(allocations, nodes, view), server)
    coordinator_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(allocations, nodes, view), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        server.add_insecure_port(cfg.listen)
    except RuntimeError as exc:
        raise GpuLeaseError(f"cannot listen on {cfg.listen}: {exc} (is the port in use?)") from exc
    await server.start()
    log.info(
        "listening on %s, etcd %s, prefix %s, event loop %s",
        cfg.listen, ",".join(cfg.etcd), cfg.prefix, eventloop.resolve(cfg.event_loop),
    )  # fmt: skip

    view_task = asyncio.create_task(view.run(), name="view")
    commit_task = asyncio.create_task(allocations.run(), name="commits")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

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
    for task in (commit_task, view_task, health_task):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await allocations.close()  # drains revokes and settles while the store can still carry them
    await agents.close()
    await store.close()


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config_mod.load(argv)
    except GpuLeaseError as exc:
        print(f"gpulease-coordinator: error: {exc.message}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=cfg.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        eventloop.run(serve(cfg), cfg.event_loop)
    except GpuLeaseError as exc:
        log.error("%s", exc.message)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
