"""Issue 11, defect 4: every answer to one request id names the same allocation.

Two Allocates with the same request id landed in one commit round: both were placed, the second
on what the first had just taken, and it was answered RESOURCE_EXHAUSTED while its twin committed.
If the caller that got the allocation was the one that had given up, the GPUs were held by nobody.
"""

from __future__ import annotations

import asyncio

from gpulease.coordinator.allocations import AllocateInput
from tests.support import harness
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
