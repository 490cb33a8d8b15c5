"""Scale: 10,000 nodes / 80,000 GPUs. Memory, resync time, throughput vs a small cluster, and
the cost of 10,000 nodes heartbeating every 10 s while allocations run."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import grpc

from bench.cluster import BenchCluster, register_nodes, wait_nodes
from bench.load import run_load
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import coordinator_pb2_grpc as pb_grpc
from gpulease.v1 import types_pb2 as tpb


@dataclass
class ScaleResult:
    nodes: int
    gpus: int
    register_s: float
    coordinator_rss_mb: float
    resync_s: float
    small_nodes: int
    alloc_per_s_small: float
    alloc_per_s_large: float
    throughput_ratio: float
    heartbeat_interval_s: int
    alloc_per_s_with_heartbeats: float
    heartbeat_cost: float
    heartbeats_sent: int
    heartbeat_errors: int
    false_down: int
    double_allocations: int


async def _heartbeats(address: str, leases: dict[str, int], interval: float, stop: asyncio.Event) -> tuple[int, int]:
    """Every node heartbeats once per interval, spread evenly, as real agents would."""
    sent = errors = 0
    names = sorted(leases)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.CoordinatorServiceStub(channel)
        sem = asyncio.Semaphore(256)

        async def beat(name: str) -> None:
            nonlocal sent, errors
            async with sem:
                try:
                    resp = await stub.Heartbeat(pb.HeartbeatRequest(node=name, lease_id=leases[name]), timeout=30)
                    leases[name] = resp.lease_id
                    sent += 1
                except grpc.aio.AioRpcError:
                    errors += 1

        tasks: set[asyncio.Task[None]] = set()
        while not stop.is_set():
            start = time.perf_counter()
            for i, name in enumerate(names):
                if stop.is_set():
                    break
                delay = start + interval * i / len(names) - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(beat(name))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks, return_exceptions=True)
    return sent, errors


async def _down_nodes(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        summary = await pb_grpc.CoordinatorServiceStub(channel).GetClusterSummary(pb.GetClusterSummaryRequest())
    return sum(1 for n in summary.nodes if n.state == tpb.NODE_STATE_DOWN)


async def run_scale(cluster: BenchCluster, nodes: int, small: int, concurrency: int, duration: float,
                    heartbeat_interval: int = 10) -> ScaleResult:  # fmt: skip
    # Small cluster first, on its own prefix.
    small_addr = cluster.start_coordinator("/bench-small/")
    await register_nodes(small_addr, [f"s{i:05d}" for i in range(small)])
    await wait_nodes(small_addr, small, 60)
    small_load = await run_load(small_addr, concurrency, duration)
    cluster.stop_coordinator(small_addr)

    # The large cluster. node_ttl 3 heartbeat intervals, as agents are told by default.
    node_ttl = 3 * heartbeat_interval
    prefix = "/bench-large/"
    addr = cluster.start_coordinator(prefix, node_ttl=node_ttl, heartbeat=heartbeat_interval)
    t0 = time.perf_counter()
    leases = await register_nodes(addr, [f"n{i:05d}" for i in range(nodes)], concurrency=128)
    register_s = time.perf_counter() - t0
    await wait_nodes(addr, nodes, 120)

    stop = asyncio.Event()
    beats = asyncio.create_task(_heartbeats(addr, leases, heartbeat_interval, stop))
    # Without the heartbeats' help the nodes would lapse: measure "without" as the throughput
    # right after registration is impossible to isolate, so run load with heartbeats first...
    await asyncio.sleep(min(heartbeat_interval, 2))
    with_hb = await run_load(addr, concurrency, duration)
    false_down = await _down_nodes(addr)
    stop.set()
    sent, hb_errors = await beats
    # ...and then without (all leases were just renewed; node_ttl leaves time for this run).
    quiet = await run_load(addr, concurrency, duration)
    rss = cluster.coordinator_rss(addr) / 2**20

    # A fresh replica: how long until its view holds all nodes.
    t1 = time.perf_counter()
    fresh = cluster.start_coordinator(prefix, node_ttl=node_ttl, heartbeat=heartbeat_interval)
    await wait_nodes(fresh, nodes, 120)
    resync_s = time.perf_counter() - t1
    cluster.stop_coordinator(fresh)
    cluster.stop_coordinator(addr)

    return ScaleResult(
        nodes=nodes,
        gpus=nodes * 8,
        register_s=round(register_s, 2),
        coordinator_rss_mb=round(rss, 1),
        resync_s=round(resync_s, 2),
        small_nodes=small,
        alloc_per_s_small=round(small_load.alloc_per_s, 1),
        alloc_per_s_large=round(quiet.alloc_per_s, 1),
        throughput_ratio=round(quiet.alloc_per_s / small_load.alloc_per_s, 3) if small_load.alloc_per_s else 0.0,
        heartbeat_interval_s=heartbeat_interval,
        alloc_per_s_with_heartbeats=round(with_hb.alloc_per_s, 1),
        heartbeat_cost=round(1 - with_hb.alloc_per_s / quiet.alloc_per_s, 3) if quiet.alloc_per_s else 0.0,
        heartbeats_sent=sent,
        heartbeat_errors=hb_errors,
        false_down=false_down,
        double_allocations=small_load.double_allocations + with_hb.double_allocations + quiet.double_allocations,
    )
