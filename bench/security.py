"""What security costs: allocations/s with TLS and bearer tokens, against clear text, in one run.

Two clusters share the run's etcd (each on its own prefix), alike in every setting but security:
one clear-text coordinator, and one with mutual TLS to agents and TLS + a token for the client
(rate limit off, so that the limit is not what is measured). Each registers the same nodes (the
secure one through each node's own agent certificate, as agents do) and runs the same load; they
take turns, twice each, so that a machine warming up or slowing down favours neither.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from bench.cluster import GPUS_PER_NODE, register_nodes, start_cluster, wait_nodes
from bench.load import LoadResult, run_load
from bench.raw import noop_rpc
from gpulease.dev.cluster import LocalCluster

ROUNDS = 2


@dataclass(frozen=True)
class SecurityCost:
    concurrency: int
    clear_alloc_per_s: float
    secure_alloc_per_s: float
    # secure / clear, each the mean of its rounds; the target is >= 0.85 (docs/performance.md)
    ratio: float
    clear_cycles_per_s: float
    secure_cycles_per_s: float
    cycles_ratio: float
    clear_p50_ms: float
    secure_p50_ms: float
    # Empty health checks on the same coordinators: what TLS alone costs a call, no auth involved
    noop_clear_per_s: float
    noop_tls_per_s: float
    noop_ratio: float
    double_allocations: int
    errors: dict[str, int]


async def _one(cluster: LocalCluster, nodes: int, concurrency: int, duration: float) -> tuple[LoadResult, float]:
    address = cluster.add_coordinator(prefix="/security/", extra_args=["--rate-limit", "0"]).address
    try:
        names = [f"node-{i:05d}" for i in range(nodes)]
        await register_nodes(address, names, cluster=cluster)
        await wait_nodes(address, nodes, 120, cluster=cluster)
        config = cluster.client_config(targets=[address]) if cluster.secure else None
        load = await run_load(address, concurrency, duration, nodes * GPUS_PER_NODE * 9 // 10, config=config)
        # TLS alone (health checks need no token): a channel verified with the cluster's CA.
        channel = (
            grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(cluster.ca_file.read_bytes()))
            if cluster.secure
            else None
        )
        noop, _ = await noop_rpc(address, concurrency, min(duration, 3), channel)
        return load, noop
    finally:
        cluster.stop_coordinator(address)


async def run_security(etcd_url: str, nodes: int, concurrency: int, duration: float) -> SecurityCost:
    clear = start_cluster(etcd_url=etcd_url, temp_prefix="gpulease-bench-clear-")
    secure = start_cluster(etcd_url=etcd_url, temp_prefix="gpulease-bench-tls-", secure=True)
    results: dict[bool, list[LoadResult]] = {False: [], True: []}
    noops: dict[bool, list[float]] = {False: [], True: []}
    try:
        for _ in range(ROUNDS):
            for cluster in (clear, secure):
                # A fresh prefix state each time: the previous run's coordinator is gone and its
                # allocations released; nodes register again (idempotent).
                load, noop = await _one(cluster, nodes, concurrency, duration)
                results[cluster.secure].append(load)
                noops[cluster.secure].append(noop)
    finally:
        clear.stop()
        secure.stop()

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    c, s = results[False], results[True]
    clear_rate, secure_rate = mean([r.alloc_per_s for r in c]), mean([r.alloc_per_s for r in s])
    clear_cycles, secure_cycles = mean([r.cycles_per_s for r in c]), mean([r.cycles_per_s for r in s])
    errors: dict[str, int] = {}
    for r in (*c, *s):
        for k, v in r.errors.items():
            errors[k] = errors.get(k, 0) + v
    return SecurityCost(
        concurrency=concurrency,
        clear_alloc_per_s=round(clear_rate, 1),
        secure_alloc_per_s=round(secure_rate, 1),
        ratio=round(secure_rate / clear_rate, 3) if clear_rate else 0.0,
        clear_cycles_per_s=round(clear_cycles, 1),
        secure_cycles_per_s=round(secure_cycles, 1),
        cycles_ratio=round(secure_cycles / clear_cycles, 3) if clear_cycles else 0.0,
        clear_p50_ms=round(mean([r.alloc_lat.ms(0.5) for r in c]), 2),
        secure_p50_ms=round(mean([r.alloc_lat.ms(0.5) for r in s]), 2),
        noop_clear_per_s=round(mean(noops[False]), 1),
        noop_tls_per_s=round(mean(noops[True]), 1),
        noop_ratio=round(mean(noops[True]) / mean(noops[False]), 3) if noops[False] and mean(noops[False]) else 0.0,
        double_allocations=sum(r.double_allocations for r in (*c, *s)),
        errors=errors,
    )
