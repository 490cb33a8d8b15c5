"""Issue 11, defect 4: every answer to one request id names the same allocation.

Two Allocates with the same request id landed in one commit round: both were placed, the second
on what the first had just taken, and it was answered RESOURCE_EXHAUSTED while its twin committed.
If the caller that got the allocation was the one that had given up, the GPUs were held by nobody.
"""

from __future__ import annotations

import asyncio

from gpulease.coordinator.allocations import AllocateInput
from gpulease.coordinator.batcher import Batcher, BatchPolicy
from gpulease.coordinator.domain import ResourceRequest
from tests.support import harness
from tests.support.batcher_fakes import (
    ONE,
    FakeCommitter,
    FakeSource,
    claim_as_is,
    draft,
    never_committed,
    no_lookup,
    node,
)
from tests.support.inproc import core, node_info, until


async def test_twins_in_one_round_get_the_same_allocation(etcd: harness.Etcd, prefix: str) -> None:
    async with core([etcd.url], prefix) as c:
        await c.nodes.register(node_info("small", gpus=1))
        await c.nodes.register(node_info("busy", gpus=2))
        assert await c.view.wait_for_revision(await c.store.put(f"{prefix}sync", b""), 5)
        gate = asyncio.Event()

        async def hold_first_commit(n: int) -> None:
            if n == 1:
                await gate.wait()

        c.committer.before = hold_first_commit
        # A burst elsewhere keeps a commit in flight while the twins queue up behind it.
        filler = asyncio.create_task(c.allocate(gpus=2))
        await until(lambda: c.committer.commits == 1, 5, "the filler's commit")
        twin = AllocateInput(gpus=1, request_id="twin")
        twins = [asyncio.create_task(c.allocations.allocate(twin)) for _ in range(2)]
        await until(lambda: c.allocations.batcher._queue.qsize() == 2, 5, "both twins queued")
        gate.set()
        assert (await filler).node == "busy"
        (a, reused_a), (b, reused_b) = await asyncio.gather(*twins)
        assert a.id == b.id and a.node == "small"
        assert sorted([reused_a, reused_b]) == [False, True]
        assert len(await c.keys_under("allocs")) == 2  # the filler and the one twin allocation


async def test_members_after_an_overflow_wait_a_round_and_take_nothing() -> None:
    """Members that would push the txn past max_txn_ops wait, and so does every later member: they
    were placed on an overlay that counted the overflowing one, so none of their results holds."""
    committer = FakeCommitter()
    big = ResourceRequest(gpus=6, cpus=1, memory_bytes=1)
    batcher = Batcher(FakeSource(node("a", 8), node("b", 8)), committer, by_request_id=no_lookup, by_id=no_lookup,
                      claim=claim_as_is, decide=never_committed, policy=BatchPolicy(max_txn_ops=16))  # fmt: skip
    task = asyncio.create_task(batcher.run())
    try:
        futs = [batcher.submit(big, draft(1)), batcher.submit(big, draft(2)), batcher.submit(ONE, draft(3))]
        results = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert all(not isinstance(r, BaseException) for r in results)
    # The 2nd member overflows the first txn: it and the 3rd (which would have fitted) wait a round.
    assert [[i.draft.id for i in b] for b in committer.batches] == [[draft(1).id], [draft(2).id, draft(3).id]]
