"""What the release tombstone (issue 17, coordinator/tombstones.py) costs: a release transaction as
before (the allocation's keys deleted) against one that also puts the tombstone on a shared lease,
in the same run, on the same etcd, at the same concurrency. Each release first gets an allocation's
keys (record, 1 GPU, reservation, request key) on a fresh lease, as the coordinator would have them."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from bench.stats import Latencies
from gpulease.coordinator import tombstones
from gpulease.coordinator.store import Cmp, Delete, Op, Put, Store

PREFIX = "/bench-tombstones/"


@dataclass(frozen=True)
class TombstoneCost:
    concurrency: int
    release_per_s_old: float
    release_per_s_tombstone: float
    release_p50_ms_old: float
    release_p50_ms_tombstone: float
    # tombstone / old: > 1 means the tombstone makes a release slower.
    p50_ratio: float
    throughput_ratio: float


async def _releases(store: Store, concurrency: int, duration: float, tombstone: bool, lat: Latencies) -> float:
    done = 0
    grave = await store.grant(600) if tombstone else 0
    stop = time.perf_counter() + duration
    kind = "new" if tombstone else "old"

    async def worker(w: int) -> None:
        nonlocal done
        i = 0
        lease = await store.grant(60)
        while time.perf_counter() < stop:
            base = f"{PREFIX}{kind}/{w}/{i}/"
            i += 1
            keys = [base + k for k in ("alloc", "gpu", "res", "req")]
            created = await store.txn([], [Put(k, b"x", lease) for k in keys])
            t0 = time.perf_counter()
            ops: list[Op] = [Put(base + "audit", b"release")]
            if tombstone:
                ops += [Delete(k) for k in keys[:3]] + [Put(keys[3], tombstones.value("x"), grave)]
            else:
                ops += [Delete(k) for k in keys]
            out = await store.txn([Cmp(keys[0], "create", "==", created.revision)], ops)
            lat.add(time.perf_counter() - t0)
            assert out.succeeded
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return done / (time.perf_counter() - t0)


async def run_tombstones(etcd_url: str, concurrency: int, duration: float) -> TombstoneCost:
    store = Store([etcd_url], timeout=10)
    await store.start()
    try:
        # Old, new, old, new: each half of the duration, so that neither side gets the warm etcd only.
        lat_old, lat_new = Latencies(), Latencies()
        old1 = await _releases(store, concurrency, duration / 2, False, lat_old)
        new1 = await _releases(store, concurrency, duration / 2, True, lat_new)
        old2 = await _releases(store, concurrency, duration / 2, False, lat_old)
        new2 = await _releases(store, concurrency, duration / 2, True, lat_new)
    finally:
        await store.delete_range(PREFIX, (PREFIX[:-1] + "0").encode())
        await store.close()
    old, new = (old1 + old2) / 2, (new1 + new2) / 2
    p50_old, p50_new = lat_old.ms(0.5), lat_new.ms(0.5)
    return TombstoneCost(
        concurrency=concurrency, release_per_s_old=round(old, 1), release_per_s_tombstone=round(new, 1),
        release_p50_ms_old=round(p50_old, 2), release_p50_ms_tombstone=round(p50_new, 2),
        p50_ratio=round(p50_new / p50_old, 3) if p50_old else 0.0,
        throughput_ratio=round(new / old, 3) if old else 0.0,
    )  # fmt: skip
