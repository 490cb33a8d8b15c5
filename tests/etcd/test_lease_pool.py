"""Pre-granted leases: Allocate skips the LeaseGrant round trip, and the allocation still gets its TTL."""

from __future__ import annotations

import asyncio
import time

import pytest

from gpulease.coordinator.lease_pool import LeasePool, needs_renewal
from gpulease.coordinator.store import Store
from gpulease.v1 import coordinator_pb2 as pb
from tests.support import harness


def test_pool_hands_out_young_granted_leases(etcd: harness.Etcd) -> None:
    async def run() -> None:
        store = Store([etcd.url])
        await store.start()
        pool = LeasePool(store, size=4, max_age=0.5)
        try:
            # take() says when the lease's clock started: at or after the call for a direct grant,
            # before it for a pooled lease.
            t0 = time.monotonic()
            first, granted = await pool.take(30)
            assert granted >= t0 and await store.keepalive_once(first) == 30  # empty pool: granted directly
            await asyncio.sleep(0.2)  # the refill runs in the background
            t0 = time.monotonic()
            second, granted = await pool.take(30)
            assert 0 < t0 - granted <= 0.5 and second != first and await store.keepalive_once(second) == 30
            pool.replenish(30)  # as an allocation does once it has its answer: back to 4
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            assert [(await pool.take(30))[1] < t0 for _ in range(5)] == [True] * 4 + [False]
            await pool.settle()  # the refill the takes started has granted its leases (under load it can lag)
            await asyncio.sleep(0.7)  # every pooled lease is now older than max_age: none is handed out
            t0 = time.monotonic()
            _, granted = await pool.take(30)
            assert granted >= t0
            t0 = time.monotonic()
            other, granted = await pool.take(7)  # pools are per TTL
            assert granted >= t0 and await store.keepalive_once(other) == 7
        finally:
            await pool.close()
            await store.close()

    asyncio.run(run())


@pytest.mark.parametrize(
    ("ttl", "age", "renew"),
    [
        (600, 0.0, False),  # granted for this very call
        (600, 2.0, False),  # 2 s of 600: within 1 %, the etcd call is saved
        (60, 0.5, False),
        (60, 0.7, True),  # over 1 % of a minute: renewed
        (5, 0.04, False),
        (5, 1.5, True),  # the test below: 30 % of a short TTL must come back
    ],
)
def test_renewal_at_commit_only_when_the_lease_lost_over_1_percent(ttl: int, age: float, renew: bool) -> None:
    assert needs_renewal(ttl, age) is renew


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
