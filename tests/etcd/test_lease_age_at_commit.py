"""Issue 11, defect 6: an acknowledged allocation has the whole TTL it was promised, from the answer.

The lease's clock starts at its grant; the queue, rejected rounds and a slow etcd all run on it.
A commit that landed at grant + 4 s of a 5 s TTL was answered "5 s" and vanished a second later.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from gpulease.errors import Conflict
from tests.support import harness
from tests.support.inproc import core, node_info


async def test_a_late_commit_is_renewed_to_the_full_ttl_before_the_answer(etcd: harness.Etcd, prefix: str) -> None:
    async with core([etcd.url], prefix) as c:
        await c.nodes.register(node_info("n1", gpus=4))
        assert await c.view.wait_for_revision(await c.store.put(f"{prefix}sync", b""), 5)

        async def slow_etcd(n: int) -> None:
            await asyncio.sleep(4.0)  # the lease (TTL 5 s, granted for this call) is 4 s old at commit

        c.committer.before = slow_etcd
        alloc = await c.allocate(gpus=1, ttl_seconds=5)
        answered = time.monotonic()
        c.committer.before = None
        # Without a keepalive, the allocation must outlive the answer by nearly its TTL.
        await asyncio.sleep(max(0.0, answered + 3.0 - time.monotonic()))
        assert await c.store.get(c.keys.alloc(alloc.id)) is not None
        assert (await c.store.keepalive(alloc.lease_id)).ttl == 5


async def test_a_commit_after_the_lease_lapsed_is_refused_and_holds_nothing(etcd: harness.Etcd, prefix: str) -> None:
    async with core([etcd.url], prefix) as c:
        await c.nodes.register(node_info("n1", gpus=4))
        assert await c.view.wait_for_revision(await c.store.put(f"{prefix}sync", b""), 5)

        async def stalled_etcd(n: int) -> None:
            await asyncio.sleep(6.5)  # past the 5 s TTL: etcd has dropped the lease

        c.committer.before = stalled_etcd
        with pytest.raises(Conflict, match="retry"):
            await c.allocate(gpus=1, ttl_seconds=5)
        assert await c.keys_under("allocs") == [] and await c.keys_under("gpus") == []
