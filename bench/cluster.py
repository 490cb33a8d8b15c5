"""A benchmark cluster: real etcd and coordinator processes (a LocalCluster), nodes registered
through the agent-facing RPCs (RegisterNode / Heartbeat), exactly as agents would."""

from __future__ import annotations

import asyncio
import time

import grpc

from gpulease.dev.cluster import LocalCluster
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import coordinator_pb2_grpc as pb_grpc
from gpulease.v1 import types_pb2 as tpb

GiB = 2**30


def start_cluster() -> LocalCluster:
    """The bench's LocalCluster, etcd started and no coordinator yet: its data on tmpfs when there is
    one (the bench measures the software, not this machine's fsync); coordinators that log warnings
    only, batch up to etcd's --max-txn-ops as the cluster's etcd sets it, and by default keep nodes up
    an hour without heartbeats (the bench registers nodes through the RPCs, with no agent behind)."""
    cluster = LocalCluster(
        tmpfs=True,
        temp_prefix="gpulease-bench-",
        node_ttl=3600,
        heartbeat_interval=10,
        coordinator_args=["--log-level", "WARNING", "--etcd-max-txn-ops", "1024"],
        startup_timeout=120,
    )
    return cluster.start(coordinators=0)


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


async def register_nodes(address: str, names: list[str], concurrency: int = 64) -> dict[str, int]:
    """RegisterNode for every name; returns name -> lease id (for heartbeats)."""
    leases: dict[str, int] = {}
    sem = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.NodeServiceStub(channel)

        async def one(name: str) -> None:
            async with sem:
                resp = await stub.RegisterNode(
                    pb.RegisterNodeRequest(node=name, address="127.0.0.1:1", inventory=inventory(name)), timeout=60
                )
                leases[name] = resp.lease_id

        await asyncio.gather(*(one(n) for n in names))
    return leases


async def wait_nodes(address: str, count: int, timeout: float) -> float:
    """Seconds until the coordinator lists `count` nodes (how long its view takes to sync)."""
    start = time.perf_counter()
    deadline = start + timeout
    async with grpc.aio.insecure_channel(address) as channel:
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
