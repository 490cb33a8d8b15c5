"""The physical reference: raw etcd transactions through our own client stack (gpulease.coordinator.store,
i.e. etcd3aio), each a create-if-absent of a fresh key, at the same concurrency as the allocations."""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.stats import Latencies
from gpulease.coordinator.store import Cmp, Put, Store


async def raw_txn(etcd_url: str, concurrency: int, duration: float) -> tuple[float, Latencies]:
    store = Store([etcd_url], timeout=10)
    await store.start()
    lat = Latencies()
    done = 0
    stop = time.perf_counter() + duration

    async def worker(w: int) -> None:
        nonlocal done
        i = 0
        while time.perf_counter() < stop:
            key = f"/bench-raw/{concurrency}/{w}/{i}"
            i += 1
            t0 = time.perf_counter()
            out = await store.txn([Cmp(key, "create", "==", 0)], [Put(key, b"x")])
            lat.add(time.perf_counter() - t0)
            assert out.succeeded
            done += 1

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    finally:
        await store.close()
    return done / (time.perf_counter() - t0), lat


async def noop_rpc(
    address: str, concurrency: int, duration: float, channel: grpc.aio.Channel | None = None
) -> tuple[float, Latencies]:
    """The Python gRPC front's own ceiling: health checks/s against the coordinator, which do no
    work. No allocate can be cheaper than this, so it bounds allocations/s on this machine; and
    their latency, plus a raw transaction's, bounds an allocate's latency from below. ``channel``:
    one to use instead of a clear-text one (a TLS channel measures what TLS alone costs)."""
    lat = Latencies()
    done = 0
    stop = time.perf_counter() + duration
    async with channel or grpc.aio.insecure_channel(address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                await check(health_pb2.HealthCheckRequest(), timeout=10)
                lat.add(time.perf_counter() - t0)
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - t0), lat
