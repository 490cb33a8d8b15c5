"""What must happen once, with several replicas and no leader (issue 17): shown idempotent by
forcing two replicas to do it at the same moment. (The expiry audit entry: test_security.py,
test_an_expiry_is_audited_once_with_two_replicas; the unsettled sweep: test_in_doubt_commits.py.)"""

from __future__ import annotations

import asyncio

from gpulease.coordinator.allocations import AllocateInput
from gpulease.coordinator.batcher import LeftQueue
from gpulease.coordinator.domain import Allocation, PendingRequest
from gpulease.coordinator.records import encode_pending
from gpulease.coordinator.store import Put
from tests.support import harness
from tests.support.inproc import Core, core, node_info


async def admit_as_the_queue_does(c: Core, pending: PendingRequest) -> tuple[Allocation, bool]:
    """WaitingQueue._admit: admit; a queue key found gone means another replica admitted it (or
    it lapsed), and the request id then names that allocation."""
    try:
        return await c.allocations.admit(pending, frozenset())
    except LeftQueue:
        existing = await c.allocations.existing(pending.request_id, pending.shape)
        assert existing is not None, "the queue key is gone and nothing holds the request id"
        return existing, True


async def test_two_replicas_admitting_one_pending_request_make_one_allocation(etcd: harness.Etcd, prefix: str) -> None:
    """A client whose wait broke resumed on the other replica: both now serve the same pending
    request and both admit it in the same instant. One transaction commits; the other replica hands
    its waiter that allocation, and the GPU is held once."""
    async with core([etcd.url], prefix) as a, core([etcd.url], prefix) as b:
        await a.nodes.register(node_info("n1", gpus=4))
        ask = AllocateInput(gpus=1, cpus=1, memory_bytes=2**30, ttl_seconds=30, request_id="resumed-wait")
        lease = await a.store.grant(30)
        pending = a.allocations.prepare(ask).pending(1, 0, lease)
        await a.store.txn([], [Put(a.keys.queue(pending.id), encode_pending(pending), lease),
                               Put(a.keys.queued(pending.request_id), pending.id.encode(), lease)])  # fmt: skip
        rev = await a.store.put(f"{prefix}sync", b"")
        assert await a.view.wait_for_revision(rev, 5) and await b.view.wait_for_revision(rev, 5)

        both = asyncio.Event()
        arrived = 0

        async def together(n: int) -> None:  # both transactions leave only once both are ready
            nonlocal arrived
            arrived += 1
            if arrived == 2:
                both.set()
            await asyncio.wait_for(both.wait(), 5)

        a.committer.before = b.committer.before = together
        (x, x_reused), (y, y_reused) = await asyncio.gather(
            admit_as_the_queue_does(a, pending), admit_as_the_queue_does(b, pending)
        )
        assert x.id == y.id == pending.id
        assert sorted([x_reused, y_reused]) == [False, True]
        assert len(await a.keys_under("gpus/n1")) == 1
        assert await a.keys_under("queue") == []
