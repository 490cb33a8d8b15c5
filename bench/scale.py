"""Scale: 10,000 nodes / 80,000 GPUs. Memory, resync time, throughput vs a small cluster, and
the cost of 10,000 nodes heartbeating every 10 s while allocations run."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil

from bench.cluster import GPUS_PER_NODE, register_nodes, wait_nodes
from bench.load import run_cycles
from gpulease.dev import procs
from gpulease.dev.cluster import LocalCluster
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
    # allocate+release cycles/s at the same concurrency
    cycles_per_s_small: float
    cycles_per_s_large: float
    throughput_ratio: float
    heartbeat_interval_s: int
    cycles_per_s_with_heartbeats: float
    heartbeat_cost: float
    # coordinator CPU per Heartbeat RPC (gRPC handling plus one etcd lease renewal)
    coordinator_cpu_ms_per_heartbeat: float
    # the same for an empty unary call (health check) at the same pace: the floor under the above
    coordinator_cpu_ms_per_noop_rpc: float
    heartbeats_sent: int
    heartbeat_errors: int
    false_down: int
    double_allocations: int


def _start_heartbeats(
    address: str, leases: dict[str, int], interval: int, tmp: Path, noop: bool = False
) -> subprocess.Popen[str]:
    path = tmp / "leases.json"
    path.write_text(json.dumps(leases))
    return subprocess.Popen([sys.executable, "-m", "bench.heartbeats", address, str(path), "--interval", str(interval),
                             "--parent-pid", str(os.getpid()), *(["--noop"] if noop else [])],
                            stdout=subprocess.PIPE, text=True, env=procs.python_child_env())  # fmt: skip


def _stop_heartbeats(proc: subprocess.Popen[str]) -> tuple[int, int]:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    doc = json.loads(out.strip().splitlines()[-1])
    return int(doc["sent"]), int(doc["errors"])


async def _cpu_seconds(proc: psutil.Process, seconds: float) -> float:
    """CPU seconds (user + system) `proc` uses over the next `seconds`."""
    before = proc.cpu_times()
    await asyncio.sleep(seconds)
    after = proc.cpu_times()
    return float(after.user + after.system - before.user - before.system)


async def _cpu_ms_per_call(proc: psutil.Process, idle_cpu_s: float, window: float, calls_per_s: float) -> float:
    """CPU ms `proc` spends per call of a load just started at `calls_per_s`: its CPU over
    `window` (after 2 s to settle), less an idle window's, divided by the calls paced into it."""
    await asyncio.sleep(2)
    busy_cpu_s = await _cpu_seconds(proc, window)
    return (busy_cpu_s - idle_cpu_s) * 1000 / (calls_per_s * window)


async def _down_nodes(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        summary = await pb_grpc.CoordinatorServiceStub(channel).GetClusterSummary(pb.GetClusterSummaryRequest())
    return sum(1 for n in summary.nodes if n.state == tpb.NODE_STATE_DOWN)


async def run_scale(cluster: LocalCluster, nodes: int, small: int, concurrency: int, duration: float,
                    heartbeat_interval: int = 10) -> ScaleResult:  # fmt: skip
    # Small cluster first, on its own prefix.
    small_addr = cluster.add_coordinator(prefix="/bench-small/").address
    await register_nodes(small_addr, [f"s{i:05d}" for i in range(small)])
    await wait_nodes(small_addr, small, 60)
    # Allocate+release cycles: an allocate-only run would fill 100 nodes' 800 GPUs in a second.
    await run_cycles(small_addr, concurrency, min(duration, 2))  # warm-up, as for the large cluster
    small_rate, small_doubles = await run_cycles(small_addr, concurrency, duration)
    cluster.stop_coordinator(small_addr)

    # The large cluster. node_ttl 3 heartbeat intervals, as agents are told by default.
    node_ttl = 3 * heartbeat_interval
    prefix = "/bench-large/"
    addr = cluster.add_coordinator(prefix=prefix, node_ttl=node_ttl, heartbeat_interval=heartbeat_interval).address
    t0 = time.perf_counter()
    leases = await register_nodes(addr, [f"n{i:05d}" for i in range(nodes)], concurrency=128)
    register_s = time.perf_counter() - t0
    await wait_nodes(addr, nodes, 120)

    # Agents heartbeat from registration on (from their own process here); measure with them,
    # then right after stopping them, while every lease is at most one interval old.
    # What one heartbeat costs the coordinator with nothing else running (see _cpu_ms_per_call).
    coordinator = psutil.Process(cluster.coordinator(addr).process.pid)
    window = min(duration, 5)
    idle_cpu_s = await _cpu_seconds(coordinator, window)
    beats = _start_heartbeats(addr, leases, heartbeat_interval, cluster.data_dir)
    try:
        hb_cpu_ms = await _cpu_ms_per_call(coordinator, idle_cpu_s, window, nodes / heartbeat_interval)
        await run_cycles(addr, concurrency, min(duration, 2))  # warm-up
        hb_rate, hb_doubles = await run_cycles(addr, concurrency, duration)
        false_down = await _down_nodes(addr)
    finally:
        sent, hb_errors = _stop_heartbeats(beats)
    quiet_rate, quiet_doubles = await run_cycles(addr, concurrency, duration)
    false_down = max(false_down, await _down_nodes(addr))
    rss = cluster.coordinator(addr).process.rss() / 2**20

    # Empty unary calls at the heartbeats' pace, after the last down check: within the node TTL
    # (3 intervals) of the last heartbeat, so no lease expiry adds work to this window.
    noops = _start_heartbeats(addr, leases, heartbeat_interval, cluster.data_dir, noop=True)
    try:
        noop_cpu_ms = await _cpu_ms_per_call(coordinator, idle_cpu_s, window, nodes / heartbeat_interval)
    finally:
        _stop_heartbeats(noops)

    # A fresh replica: how long until its view holds all nodes.
    t1 = time.perf_counter()
    fresh = cluster.add_coordinator(prefix=prefix, node_ttl=node_ttl, heartbeat_interval=heartbeat_interval).address
    await wait_nodes(fresh, nodes, 120)
    resync_s = time.perf_counter() - t1
    cluster.stop_coordinator(fresh)
    cluster.stop_coordinator(addr)

    return ScaleResult(
        nodes=nodes,
        gpus=nodes * GPUS_PER_NODE,
        register_s=round(register_s, 2),
        coordinator_rss_mb=round(rss, 1),
        resync_s=round(resync_s, 2),
        small_nodes=small,
        cycles_per_s_small=round(small_rate, 1),
        cycles_per_s_large=round(quiet_rate, 1),
        throughput_ratio=round(quiet_rate / small_rate, 3) if small_rate else 0.0,
        heartbeat_interval_s=heartbeat_interval,
        cycles_per_s_with_heartbeats=round(hb_rate, 1),
        heartbeat_cost=round(1 - hb_rate / quiet_rate, 3) if quiet_rate else 0.0,
        coordinator_cpu_ms_per_heartbeat=round(hb_cpu_ms, 3),
        coordinator_cpu_ms_per_noop_rpc=round(noop_cpu_ms, 3),
        heartbeats_sent=sent,
        heartbeat_errors=hb_errors,
        false_down=false_down,
        double_allocations=small_doubles + hb_doubles + quiet_doubles,
    )
