"""Issue 11, defect 5: a commit whose answer was lost never leaves an allocation nobody was told of.

The transaction really commits in etcd; then its answer is lost and etcd is cut off (a TCP proxy
between the coordinator and etcd refuses connections). The coordinator must settle the outcome
before answering, or hand it to the settler, which removes the allocation unless a retry was
handed it, and finishes the job even after the coordinator that started it is gone.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence

import pytest

from gpulease.coordinator.allocations import AllocateInput, AllocationPolicy
from gpulease.coordinator.committer import CommitResult, Committer, Item
from gpulease.coordinator.domain import Snapshot
from gpulease.coordinator.keys import Keys
from gpulease.coordinator.store import OutcomeUnknown, Store
from gpulease.errors import Unavailable
from tests.support import harness
from tests.support.inproc import Core, core, node_info, until
from tests.support.tcp_proxy import TcpProxy


class LosingCommitter:
    """Commits for real, then loses etcd's answer and cuts etcd off for `outage` seconds."""

    def __init__(self, inner: Committer, proxy: TcpProxy, outage: float) -> None:
        self.inner, self.proxy, self.outage = inner, proxy, outage

    async def commit(self, items: Sequence[Item], snapshot: Snapshot) -> CommitResult:
        await self.inner.commit(items, snapshot)
        self.proxy.refuse()
        asyncio.get_running_loop().call_later(self.outage, self.proxy.allow)
        raise OutcomeUnknown("etcd's answer to the allocation was lost")


@pytest.fixture
async def direct(etcd: harness.Etcd) -> AsyncIterator[Store]:
    store = Store([etcd.url])
    await store.start()
    yield store
    await store.close()


@pytest.fixture
def proxy(etcd: harness.Etcd) -> TcpProxy:
    p = TcpProxy("127.0.0.1", int(etcd.url.rsplit(":", 1)[1]))
    yield p  # type: ignore[misc]
    p.close()


async def setup(c: Core, outage: float, proxy: TcpProxy) -> None:
    await c.nodes.register(node_info("n1", gpus=4))
    assert await c.view.wait_for_revision(await c.store.put(f"{c.keys.prefix}sync", b""), 5)
    c.committer.inner = LosingCommitter(c.committer.inner, proxy, outage)


async def live(direct: Store, keys: Keys, kind: str) -> list[str]:
    _, kvs = await direct.get_prefix(f"{keys.prefix}{kind}/", f"{keys.prefix}{kind}0".encode())
    return [kv.key for kv in kvs]


async def test_an_outcome_settled_within_the_timeout_is_answered(proxy: TcpProxy, direct: Store, prefix: str) -> None:
    async with core([proxy.url], prefix, policy=AllocationPolicy(settle_timeout=10)) as c:
        await setup(c, 1.0, proxy)
        alloc, reused = await c.allocations.allocate(AllocateInput(gpus=2, ttl_seconds=3600, request_id="r1"))
        assert not reused and len(alloc.gpus) == 2
        assert await direct.get(c.keys.alloc(alloc.id)) is not None  # told, and live


async def test_an_unsettled_commit_is_removed_once_etcd_is_back(proxy: TcpProxy, direct: Store, prefix: str) -> None:
    async with core([proxy.url], prefix, policy=AllocationPolicy(settle_timeout=0.5)) as c:
        await setup(c, 3.0, proxy)
        with pytest.raises(Unavailable, match="not known yet"):
            await c.allocations.allocate(AllocateInput(gpus=2, ttl_seconds=3600, request_id="r1"))
        assert len(await live(direct, c.keys, "allocs")) == 1  # it did commit, with a 1 h TTL
        await until(lambda: c.allocations.settler.settled == 1, 20, "the settler")
        for kind in ("allocs", "gpus", "res", "reqs", "unsettled"):
            assert await live(direct, c.keys, kind) == [], kind


async def test_a_retry_that_was_handed_the_allocation_keeps_it(
    etcd: harness.Etcd, proxy: TcpProxy, direct: Store, prefix: str
) -> None:
    async with core([proxy.url], prefix, policy=AllocationPolicy(settle_timeout=0.5)) as c:
        await setup(c, 3.0, proxy)
        request = AllocateInput(gpus=2, ttl_seconds=3600, request_id="r1")
        with pytest.raises(Unavailable):
            await c.allocations.allocate(request)
        # The client retries on another replica while this one still cannot reach etcd.
        async with core([etcd.url], prefix) as other:
            mine, reused = await other.allocations.allocate(request)
            assert reused
            await until(lambda: c.allocations.settler.settled == 1, 20, "the settler")
            assert await live(direct, c.keys, "unsettled") == []
            assert await direct.get(c.keys.alloc(mine.id)) is not None  # still the retry's


async def test_a_recorded_allocation_is_settled_by_another_coordinator(
    etcd: harness.Etcd, direct: Store, prefix: str
) -> None:
    # A coordinator recorded an allocation it could not settle, and died.
    async with core([etcd.url], prefix) as dead:
        await dead.nodes.register(node_info("n1", gpus=4))
        assert await dead.view.wait_for_revision(await dead.store.put(f"{prefix}sync", b""), 5)
        alloc = await dead.allocate(gpus=2, ttl_seconds=3600, request_id="r1")
        record = {"lease": alloc.lease_id, "request_id": "r1", "ttl": 3600}
        await direct.put(dead.keys.unsettled(alloc.id), json.dumps(record).encode())
    async with core([etcd.url], prefix) as c:  # its start-up sweep finishes the job
        await until(lambda: c.allocations.settler.settled == 1, 10, "the sweep")
        for kind in ("allocs", "gpus", "unsettled"):
            assert await live(direct, c.keys, kind) == [], kind
