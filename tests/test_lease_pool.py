"""Pre-granted leases: Allocate skips the LeaseGrant round trip, and the allocation still gets its TTL."""

from __future__ import annotations

import asyncio
import time

from coordinator.lease_pool import LeasePool
from coordinator.store import Store
from gpulease.v1 import coordinator_pb2 as pb
from tests import harness


def test_pool_hands_out_young_granted_leases(etcd: harness.Etcd) -> None:
    async def run() -> None:
        store = Store([etcd.url])
        await store.start()
        pool = LeasePool(store, size=4, max_age=0.5)
        try:
            first, pooled = await pool.take(30)
            assert not pooled and await store.keepalive_once(first) == 30  # empty pool: granted directly
            await asyncio.sleep(0.2)  # the refill runs in the background
            second, pooled = await pool.take(30)
            assert pooled and second != first and await store.keepalive_once(second) == 30
            await asyncio.sleep(0.7)  # every pooled lease is now older than max_age: none is handed out
            _, pooled = await pool.take(30)
            assert not pooled
            other, pooled = await pool.take(7)  # pools are per TTL
            assert not pooled and await store.keepalive_once(other) == 7
        finally:
            await pool.close()
            await store.close()

    asyncio.run(run())


def test_allocation_on_a_pooled_lease_lives_its_whole_ttl(coordinator: harness.Coordinator) -> None:
    s = coordinator.stub
    harness.register(s, "node-a", gpus=2)
    harness.wait_nodes_up(s, {"node-a"})
    s.Release(pb.ReleaseRequest(allocation_id=s.Allocate(pb.AllocateRequest(gpus=1, ttl_seconds=5)).allocation.id))
    time.sleep(1.5)  # the pooled leases age (granted ~1.5 s ago), the next allocation takes one
    s.Allocate(pb.AllocateRequest(gpus=1, ttl_seconds=5))
    granted = time.monotonic()
    # Renewed at commit: still held after TTL - 1 s although its lease was granted earlier...
    time.sleep(4.0)
    assert harness.summary(s).totals.gpus_free == 1
    # ...and freed by lease expiry without any keepalive.
    harness.wait_until(lambda: harness.summary(s).totals.gpus_free == 2, 5 + 3 - (time.monotonic() - granted),
                       "GPUs freed by lease expiry")  # fmt: skip
