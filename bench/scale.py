"""Scale: 10,000 nodes / 80,000 GPUs. Memory, resync time, throughput vs a small cluster, and node
liveness (issue 18): what 10,000 heartbeating nodes cost allocations under each design of
coordinator/liveness.py at the same heartbeat rate (the default cap's), how many etcd writes they
make, and how long a dead node takes to be marked down at 100, 1,000 and 10,000 nodes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil

from bench.cluster import GPUS_PER_NODE, register_nodes, wait_nodes
from bench.load import run_cycles
from gpulease.coordinator.liveness import LivenessPolicy, Timing, timing
from gpulease.coordinator.store import Store
from gpulease.dev import procs
from gpulease.dev.cluster import LocalCluster
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import coordinator_pb2_grpc as pb_grpc
from gpulease.v1 import types_pb2 as tpb

# Alternating windows with and without heartbeats, per design (see _measure_design).
ROUNDS = 3
# The design the coordinator runs by default (coordinator/liveness.py); measured last.
CHOSEN = "session"
DEFAULT_LIVENESS = LivenessPolicy()


@dataclass
class LivenessFigures:
    """One node-liveness design at 10,000 nodes (coordinator/liveness.py), same heartbeat rate."""

    design: str
    heartbeat_interval_s: int
    node_ttl_s: int
    heartbeats_per_s: float
    # allocate+release cycles/s without heartbeats, then with them; cost = 1 - with / without
    cycles_per_s_quiet: float
    cycles_per_s_with_heartbeats: float
    heartbeat_cost: float
    coordinator_cpu_ms_per_heartbeat: float
    # the bench's heartbeat sender's own CPU per heartbeat: on these 2 shared cores it competes with
    # the coordinator, so part of heartbeat_cost is the sender's, which real agents do not cost
    sender_cpu_ms_per_heartbeat: float
    # etcd's raft proposals (writes) and lease renewals per second with heartbeats only: all of them,
    # the coordinator's background work included (nothing else runs then)
    liveness_etcd_writes_per_s: float
    liveness_lease_renewals_per_s: float
    heartbeats_sent: int
    heartbeat_errors: int
    false_down: int
    double_allocations: int


@dataclass
class ScaleResult:
    nodes: int
    gpus: int
    register_s: float
    coordinator_rss_mb: float
    # a fresh replica's start to a view with every node: right after registration, then at the
    # end, with the history the allocation phases left under the prefix
    resync_s: float
    resync_after_load_s: float
    small_nodes: int
    # allocate+release cycles/s at the same concurrency
    cycles_per_s_small: float
    cycles_per_s_large: float
    throughput_ratio: float
    # The fields below are the chosen design's (liveness_design), at the interval it tells agents.
    heartbeat_interval_s: int
    cycles_per_s_with_heartbeats: float
    heartbeat_cost: float
    # coordinator CPU per Heartbeat RPC
    coordinator_cpu_ms_per_heartbeat: float
    # the same for an empty unary call (health check) at the same pace: the floor under the above
    coordinator_cpu_ms_per_noop_rpc: float
    heartbeats_sent: int
    heartbeat_errors: int
    false_down: int
    double_allocations: int
    # Issue 18: the chosen design, its cost as a share of allocate throughput at `nodes` nodes, its
    # etcd writes and renewals per second for liveness, and the seconds from a node's death (its
    # heartbeats stop) to DOWN, by cluster size; each design measured in this run.
    liveness_design: str = ""
    liveness_cost_share: float = 0.0
    liveness_etcd_writes_per_s: float = 0.0
    liveness_lease_renewals_per_s: float = 0.0
    detection_s: dict[str, float] = field(default_factory=dict)
    detection_false_down: int = 0
    designs: list[LivenessFigures] = field(default_factory=list)


def _start_heartbeats(
    address: str, leases: dict[str, int], interval: int, tmp: Path, noop: bool = False
) -> subprocess.Popen[str]:
    path = tmp / f"leases-{os.getpid()}-{len(leases)}-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(leases))
    proc = subprocess.Popen([sys.executable, "-m", "bench.heartbeats", address, str(path), "--interval", str(interval),
                             "--parent-pid", str(os.getpid()), *(["--noop"] if noop else [])],
                            stdout=subprocess.PIPE, text=True, env=procs.python_child_env())  # fmt: skip
    # Until its signal handlers are in place, SIGUSR1 (pause) would kill it.
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError(f"the heartbeat sender exited with {proc.wait()} before it was ready")
    return proc


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


async def _revoke(etcd_url: str, leases: dict[str, int]) -> None:
    """Revoke the nodes' leases (one per node, or the one session they share) and their keys."""
    store = Store([etcd_url])
    await store.start()
    try:
        sem = asyncio.Semaphore(64)

        async def one(lease: int) -> None:
            async with sem:
                await store.revoke(lease)

        await asyncio.gather(*(one(lease) for lease in set(leases.values())))
    finally:
        await store.close()


def _etcd_counters(url: str) -> tuple[float, float]:
    """etcd's raft proposals committed (its writes) and lease renewals so far, from its /metrics."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    values = dict(line.split(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return float(values["etcd_server_proposals_committed_total"]), float(values["etcd_debugging_lease_renewed_total"])


async def _rates(proc: psutil.Process, etcd_url: str, seconds: float) -> tuple[float, float, float]:
    """`proc`'s CPU seconds, and etcd's writes/s and renewals/s, over the next `seconds`."""
    writes, renewals = _etcd_counters(etcd_url)
    cpu = await _cpu_seconds(proc, seconds)
    writes2, renewals2 = _etcd_counters(etcd_url)
    return cpu, (writes2 - writes) / seconds, (renewals2 - renewals) / seconds


Measured = tuple[LivenessFigures, str, dict[str, int], float, float]


async def _resync(cluster: LocalCluster, prefix: str, nodes: int, t: Timing) -> float:
    """Seconds from a fresh replica's start on `prefix` to a view that lists every node."""
    started = time.perf_counter()
    fresh = cluster.add_coordinator(prefix=prefix, node_ttl=t.node_ttl, heartbeat_interval=t.heartbeat_interval,
                                    extra_args=["--max-heartbeats-per-second", "0"]).address  # fmt: skip
    try:
        await wait_nodes(fresh, nodes, 120)
        return time.perf_counter() - started
    finally:
        cluster.stop_coordinator(fresh)


async def _measure_design(cluster: LocalCluster, design: str, nodes: int, concurrency: int, duration: float,
                          t: Timing) -> Measured:  # fmt: skip
    """One design's coordinator with `nodes` nodes, heartbeating at `interval` from their own process.
    Also returns its address (left running), the nodes' leases, and how long registering took."""
    interval = t.heartbeat_interval
    flags = ["--node-liveness", design, "--max-heartbeats-per-second", "0"]
    addr = cluster.add_coordinator(prefix=f"/bench-{design}/", node_ttl=t.node_ttl, heartbeat_interval=interval,
                                   extra_args=flags).address  # fmt: skip
    t0 = time.perf_counter()
    leases = await register_nodes(addr, [f"n{i:05d}" for i in range(nodes)], concurrency=128)
    register_s = time.perf_counter() - t0
    # Agents heartbeat from registration on: a node first heard from an interval after the last
    # registration would be as late as a dead one. Paused (not stopped) for the idle window.
    beats = _start_heartbeats(addr, leases, interval, cluster.data_dir)
    hb_cycles = quiet_cycles = 0.0
    doubles = false_down = 0
    try:
        await wait_nodes(addr, nodes, 120)
        # A fresh replica's load time with the nodes only (the target's case), before any history.
        resync = await _resync(cluster, f"/bench-{design}/", nodes, t) if design == CHOSEN else 0.0
        coordinator = psutil.Process(cluster.coordinator(addr).process.pid)
        window = 2 * duration  # CPU per heartbeat is a small difference of two CPU totals: long windows
        # Rounds of (heartbeats on, cycles; heartbeats paused, cycles): the loss is a difference of
        # two noisy rates, so each is summed over ROUNDS alternating windows. CPU and etcd rates are
        # taken in the first round, with heartbeats only and at their steady pace; the idle CPU
        # they are compared with, after the rounds, in a pause shorter than the TTL's margin.
        for round_ in range(ROUNDS):
            await asyncio.sleep(2)  # see _cpu_ms_per_call; after a pause, the overdue heartbeats go now
            if round_ == 0:
                sender = psutil.Process(beats.pid)
                sender_before = sender.cpu_times()
                busy_cpu_s, writes, renewals = await _rates(coordinator, cluster.etcd_url, window)
                sender_after = sender.cpu_times()
                sender_cpu_ms = (sum(sender_after[:2]) - sum(sender_before[:2])) * 1000 / (nodes / interval * window)
                await run_cycles(addr, concurrency, min(duration, 2))  # warm-up
            rate, d = await run_cycles(addr, concurrency, duration)
            hb_cycles += rate
            doubles += d
            false_down = max(false_down, await _down_nodes(addr))
            # Without heartbeats: paused, not stopped, so that no node misses one (bench/heartbeats.py).
            beats.send_signal(signal.SIGUSR1)
            rate, d = await run_cycles(addr, concurrency, duration)
            beats.send_signal(signal.SIGUSR2)
            quiet_cycles += rate
            doubles += d
            false_down = max(false_down, await _down_nodes(addr))
        await asyncio.sleep(2)
        # As long as the busy window, but a pause shorter than the TTL's margin over the interval.
        idle = min(window, t.node_ttl - t.heartbeat_interval - 2)
        beats.send_signal(signal.SIGUSR1)
        idle_cpu_s = await _cpu_seconds(coordinator, idle) * window / idle
        beats.send_signal(signal.SIGUSR2)
        hb_cpu_ms = (busy_cpu_s - idle_cpu_s) * 1000 / (nodes / interval * window)
    finally:
        sent, hb_errors = _stop_heartbeats(beats)
    hb_rate, quiet_rate = hb_cycles / ROUNDS, quiet_cycles / ROUNDS
    figures = LivenessFigures(
        design=design, heartbeat_interval_s=interval, node_ttl_s=t.node_ttl,
        heartbeats_per_s=round(nodes / interval, 1),
        cycles_per_s_quiet=round(quiet_rate, 1), cycles_per_s_with_heartbeats=round(hb_rate, 1),
        heartbeat_cost=round(1 - hb_rate / quiet_rate, 3) if quiet_rate else 0.0,
        coordinator_cpu_ms_per_heartbeat=round(hb_cpu_ms, 3),
        sender_cpu_ms_per_heartbeat=round(sender_cpu_ms, 3),
        liveness_etcd_writes_per_s=round(writes, 1),
        liveness_lease_renewals_per_s=round(renewals, 1),
        heartbeats_sent=sent, heartbeat_errors=hb_errors, false_down=false_down,
        double_allocations=doubles,
    )  # fmt: skip
    return figures, addr, leases, register_s, resync


async def _detection(cluster: LocalCluster, addr: str, leases: dict[str, int], interval: int,
                     victims: int = 5) -> tuple[float, int]:  # fmt: skip
    """Seconds from the moment `victims` nodes stop heartbeating (their agents die) until the
    coordinator lists every one DOWN; and how many of the others it listed DOWN meanwhile."""
    names = sorted(leases)
    dead = set(names[:: max(1, len(names) // victims)][:victims])
    beats = _start_heartbeats(addr, leases, interval, cluster.data_dir)
    # Every node heard from at least once, and none down (one silent since an earlier phase comes
    # back with its first heartbeat here), before the victims die.
    await asyncio.sleep(interval + 2)
    for _ in range(int(interval) + 30):
        if await _down_nodes(addr) == 0:
            break
        await asyncio.sleep(1)
    _stop_heartbeats(beats)
    died = time.perf_counter()
    beats = _start_heartbeats(addr, {n: v for n, v in leases.items() if n not in dead}, interval, cluster.data_dir)
    false_down = 0
    try:
        async with grpc.aio.insecure_channel(addr) as channel:
            stub = pb_grpc.CoordinatorServiceStub(channel)
            while time.perf_counter() - died < 300:
                summary = await stub.GetClusterSummary(pb.GetClusterSummaryRequest(), timeout=30)
                down = {n.name for n in summary.nodes if n.state == tpb.NODE_STATE_DOWN}
                false_down = max(false_down, len(down - dead))
                if dead <= down:
                    return time.perf_counter() - died, false_down
                await asyncio.sleep(0.25)
    finally:
        _stop_heartbeats(beats)
    raise TimeoutError(f"{sorted(dead)} not down 300 s after their heartbeats stopped")


async def run_scale(cluster: LocalCluster, nodes: int, small: int, concurrency: int, duration: float,
                    heartbeat_interval: int | None = None) -> ScaleResult:  # fmt: skip
    """`heartbeat_interval` None: what the default policy tells agents at `nodes` nodes (the cap)."""
    # Small cluster first, on its own prefix.
    small_addr = cluster.add_coordinator(prefix="/bench-small/").address
    await register_nodes(small_addr, [f"s{i:05d}" for i in range(small)])
    await wait_nodes(small_addr, small, 60)
    # Allocate+release cycles: an allocate-only run would fill 100 nodes' 800 GPUs in a second.
    await run_cycles(small_addr, concurrency, min(duration, 2))  # warm-up, as for the large cluster
    small_rate, small_doubles = await run_cycles(small_addr, concurrency, duration)
    cluster.stop_coordinator(small_addr)

    # Each design at the same heartbeat rate: the interval the default cap gives at this size,
    # with the default margin of the TTL over it (coordinator/liveness.py).
    t = timing(nodes, DEFAULT_LIVENESS)
    if heartbeat_interval is not None:
        t = Timing(heartbeat_interval, heartbeat_interval + t.node_ttl - t.heartbeat_interval)
    # The chosen design first: its coordinator also gives the memory, the empty call's floor, the
    # detection time at this size and the resync time. Each design's leases are revoked after it,
    # so that their expiry (a raft write each) does not load etcd while the next one is measured.
    chosen, addr, leases, register_s, resync_s = await _measure_design(cluster, CHOSEN, nodes, concurrency, duration, t)
    prefix = f"/bench-{CHOSEN}/"
    coordinator = psutil.Process(cluster.coordinator(addr).process.pid)
    rss = cluster.coordinator(addr).process.rss() / 2**20
    window = min(duration, 5)
    idle_cpu_s = await _cpu_seconds(coordinator, window)
    # Empty unary calls at the heartbeats' pace: the floor under any heartbeat's cost.
    noops = _start_heartbeats(addr, leases, t.heartbeat_interval, cluster.data_dir, noop=True)
    try:
        noop_cpu_ms = await _cpu_ms_per_call(coordinator, idle_cpu_s, window, nodes / t.heartbeat_interval)
    finally:
        _stop_heartbeats(noops)

    # Time to detect a dead node at this size, then at the smaller sizes the issue names, each on
    # a coordinator of its own with the default policy.
    detection = {str(nodes): await _detection(cluster, addr, leases, t.heartbeat_interval)}

    # Again after every phase: its view also loads the history they left (tombstones, audit entries).
    resync_loaded_s = await _resync(cluster, prefix, nodes, t)
    cluster.stop_coordinator(addr)
    await _revoke(cluster.etcd_url, leases)

    before, addr, leases, _, _ = await _measure_design(cluster, "node-lease", nodes, concurrency, duration, t)
    cluster.stop_coordinator(addr)
    await _revoke(cluster.etcd_url, leases)
    designs = [before, chosen]

    for size in (100, 1000):
        if size >= nodes:
            continue
        base = DEFAULT_LIVENESS
        addr = cluster.add_coordinator(prefix=f"/bench-detect-{size}/", node_ttl=base.node_ttl,
                                       heartbeat_interval=base.heartbeat_interval).address  # fmt: skip
        leases = await register_nodes(addr, [f"d{i:05d}" for i in range(size)], concurrency=128)
        detection[str(size)] = await _detection(cluster, addr, leases, timing(size, base).heartbeat_interval)
        cluster.stop_coordinator(addr)
        await _revoke(cluster.etcd_url, leases)

    return ScaleResult(
        nodes=nodes,
        gpus=nodes * GPUS_PER_NODE,
        register_s=round(register_s, 2),
        coordinator_rss_mb=round(rss, 1),
        resync_s=round(resync_s, 2),
        resync_after_load_s=round(resync_loaded_s, 2),
        small_nodes=small,
        cycles_per_s_small=round(small_rate, 1),
        cycles_per_s_large=chosen.cycles_per_s_quiet,
        throughput_ratio=round(chosen.cycles_per_s_quiet / small_rate, 3) if small_rate else 0.0,
        heartbeat_interval_s=t.heartbeat_interval,
        cycles_per_s_with_heartbeats=chosen.cycles_per_s_with_heartbeats,
        heartbeat_cost=chosen.heartbeat_cost,
        coordinator_cpu_ms_per_heartbeat=chosen.coordinator_cpu_ms_per_heartbeat,
        coordinator_cpu_ms_per_noop_rpc=round(noop_cpu_ms, 3),
        heartbeats_sent=chosen.heartbeats_sent,
        heartbeat_errors=chosen.heartbeat_errors,
        false_down=chosen.false_down,
        double_allocations=small_doubles + sum(d.double_allocations for d in designs),
        liveness_design=CHOSEN,
        liveness_cost_share=chosen.heartbeat_cost,
        liveness_etcd_writes_per_s=chosen.liveness_etcd_writes_per_s,
        liveness_lease_renewals_per_s=chosen.liveness_lease_renewals_per_s,
        detection_s={k: round(v[0], 1) for k, v in sorted(detection.items(), key=lambda kv: int(kv[0]))},
        detection_false_down=max(v[1] for v in detection.values()),
        designs=designs,
    )
