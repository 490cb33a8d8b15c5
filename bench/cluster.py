"""A benchmark cluster: real etcd and coordinator processes (a LocalCluster), nodes registered
through the agent-facing RPCs (RegisterNode / Heartbeat), exactly as agents would."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from gpulease.common.identity import Kind
from gpulease.dev.cluster import LocalCluster
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import coordinator_pb2_grpc as pb_grpc
from gpulease.v1 import types_pb2 as tpb

GiB = 2**30


def start_cluster(**overrides: object) -> LocalCluster:
    """The bench's LocalCluster, etcd started and no coordinator yet: its data on tmpfs when there is
    one (the bench measures the software, not this machine's fsync); coordinators that log warnings
    only, batch up to etcd's --max-txn-ops as the cluster's etcd sets it, and by default keep nodes up
    an hour without heartbeats (the bench registers nodes through the RPCs, with no agent behind)."""
    settings: dict[str, Any] = {
        "tmpfs": True,
        "temp_prefix": "gpulease-bench-",
        "node_ttl": 3600,
        "heartbeat_interval": 10,
        "coordinator_args": ["--log-level", "WARNING", "--etcd-max-txn-ops", "1024"],
        "startup_timeout": 120,
    }
    settings.update(overrides)
    return LocalCluster(**settings).start(coordinators=0)


# Every simulated node of the bench has this many GPUs.
GPUS_PER_NODE = 8


def inventory(name: str, gpus: int = GPUS_PER_NODE) -> tpb.NodeInventory:
    return tpb.NodeInventory(
        gpus=[
            tpb.Gpu(
                index=i,
                uuid=f"GPU-SIM-{name}-{i}",
                model="Simulated GPU 80GB",
                memory_total_bytes=80 * GiB,
                healthy=True,
                simulated=True,
                health_detail="simulated",
            )
            for i in range(gpus)
        ],
        cpus_total=224,
        memory_total_bytes=2048 * GiB,
        labels={"gpulease.dev/simulated": "true"},
        hostname=name,
        source="simulated",
    )


async def register_nodes(
    address: str, names: list[str], concurrency: int = 64, *, cluster: LocalCluster | None = None
) -> dict[str, int]:
    """RegisterNode for every name; returns name -> lease id (for heartbeats). In a secure cluster
    each node registers with its own agent certificate on the coordinator's mutual-TLS port, as
    its agent would (a node may speak only for itself)."""
    leases: dict[str, int] = {}
    sem = asyncio.Semaphore(concurrency)
    secure = cluster is not None and cluster.secure
    shared = None if secure else grpc.aio.insecure_channel(address)

    async def one(name: str) -> None:
        async with sem:
            channel = shared
            if channel is None:
                assert cluster is not None
                channel = cluster.aio_channel(cluster.coordinator(address).mtls_address,
                                              cluster.issue(Kind.AGENT, name))  # fmt: skip
            try:
                resp = await pb_grpc.NodeServiceStub(channel).RegisterNode(
                    pb.RegisterNodeRequest(node=name, address="127.0.0.1:1", inventory=inventory(name)), timeout=60
                )
            finally:
                if channel is not shared:
                    await channel.close()
            leases[name] = resp.lease_id

    try:
        await asyncio.gather(*(one(n) for n in names))
    finally:
        if shared is not None:
            await shared.close()
    return leases


async def wait_nodes(address: str, count: int, timeout: float, *, cluster: LocalCluster | None = None) -> float:
    """Seconds until the coordinator lists `count` nodes (how long its view takes to sync)."""
    start = time.perf_counter()
    deadline = start + timeout
    connect = cluster.aio_channel if cluster is not None else grpc.aio.insecure_channel
    async with connect(address) as channel:
        stub = pb_grpc.CoordinatorServiceStub(channel)
        while time.perf_counter() < deadline:
            try:
                summary = await stub.GetClusterSummary(pb.GetClusterSummaryRequest(), timeout=10)
                if len(summary.nodes) >= count:
                    return time.perf_counter() - start
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.02)
    raise TimeoutError(f"coordinator at {address} did not list {count} nodes within {timeout}s")
