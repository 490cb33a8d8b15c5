"""What must happen once, with several replicas and no leader (issue 17): shown idempotent by
forcing two replicas to do it at the same moment: queue admission and preemption here; the expiry
audit entry in test_security.py (test_an_expiry_is_audited_once_with_two_replicas); the unsettled
sweep in test_in_doubt_commits.py (settled by another coordinator's sweep)."""

from __future__ import annotations

import asyncio

from gpulease.coordinator.allocations import AllocateInput
from gpulease.coordinator.batcher import LeftQueue
from gpulease.coordinator.domain import Allocation, PendingRequest
from gpulease.coordinator.preemption import Preemptions
from gpulease.coordinator.preemption_plan import Preemption
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


async def test_two_replicas_preempting_one_victim_at_once_preempt_it_once(etcd: harness.Etcd, prefix: str) -> None:
    """Each replica serves a blocked head that wants the same victim, and both send the preemption
    in the same instant: one transaction wins (the victim's notice, one claim, one audit entry);
    the other is refused and plans again. Both then sweep past the deadline: one revocation, no
    error from the second."""
    async with core([etcd.url], prefix) as a, core([etcd.url], prefix) as b:
        await a.nodes.register(node_info("n1", gpus=1))
        victim, _ = await a.allocations.allocate(
            AllocateInput(gpus=1, cpus=1, memory_bytes=2**30, ttl_seconds=60, preemptible=True)
        )
        heads = []
        for c, rid in ((a, "head-a"), (b, "head-b")):
            lease = await c.store.grant(30)
            ask = AllocateInput(gpus=1, cpus=1, memory_bytes=2**30, ttl_seconds=30, request_id=rid)
            entry = c.allocations.prepare(ask).pending(1, 0, lease)
            await c.store.txn([], [Put(c.keys.queue(entry.id), encode_pending(entry), lease)])
            heads.append(entry)
        rev = await a.store.put(f"{prefix}sync", b"")
        assert await a.view.wait_for_revision(rev, 5) and await b.view.wait_for_revision(rev, 5)

        plan = Preemption("n1", (victim.id,), "priority", tuple(g.index for g in victim.gpus))
        pa, pb = Preemptions(a.store, a.keys, a.view), Preemptions(b.store, b.keys, b.view)
        won = await asyncio.gather(pa.preempt(heads[0], plan, a.allocations.classes()),
                                   pb.preempt(heads[1], plan, b.allocations.classes()))  # fmt: skip
        assert sorted(won) == [False, True]
        assert await a.keys_under("preempting") == [victim.id]
        assert len(await a.keys_under("claims")) == 1
        audit = [k for k in await a.keys_under("audit") if k.endswith(f"{victim.id}.preempt")]
        assert len(audit) == 1

        rev = await a.store.put(f"{prefix}sync", b"")
        assert await a.view.wait_for_revision(rev, 5) and await b.view.wait_for_revision(rev, 5)
        far = 2**62
        pa.sweep(far)
        pb.sweep(far)
        await until_gone(a, victim.id)
        assert await a.keys_under("gpus/n1") == []


async def until_gone(c: Core, alloc_id: str) -> None:
    for _ in range(100):
        if alloc_id not in await c.keys_under("allocs"):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{alloc_id} was not revoked")
