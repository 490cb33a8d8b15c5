"""GPUs that ran containers stay held until their agent reports the containers stopped (issue 17:
a partitioned agent's container kept running on a GPU that had been granted again).

Real etcd, in-process coordinator cores; the agent's side is its heartbeat's enforced_revision.
"""

from __future__ import annotations

import asyncio

import pytest

from gpulease.coordinator import draining
from gpulease.coordinator.allocations import AllocateInput
from gpulease.coordinator.endings import Endings
from gpulease.errors import AllocationNotFound, InsufficientResources
from tests.support import harness
from tests.support.inproc import Core, core, node_info


def ask(gpus: int = 1) -> AllocateInput:
    return AllocateInput(gpus=gpus, cpus=1, memory_bytes=2**30, ttl_seconds=30)


async def synced(*cores: Core) -> None:
    rev = await cores[0].store.put(f"{cores[0].keys.prefix}sync", b"")
    for c in cores:
        assert await c.view.wait_for_revision(rev, 5)


async def test_a_gpu_that_ran_a_container_is_free_only_once_the_agent_has_stopped_it(
    etcd: harness.Etcd, prefix: str
) -> None:
    async with core([etcd.url], prefix) as c:
        reg = await c.nodes.register(node_info("n1", gpus=2))
        a = await c.allocate(2)
        await Endings(c.store, c.keys, c.view).note_containers(a)  # what RunContainer does first
        await synced(c)
        [drain] = c.view.drains("n1")
        assert drain.allocation_id == a.id and drain.ended_at is None
        assert drain.gpus == frozenset(g.uuid for g in a.gpus)

        released_at = await c.allocations.release(a.id)
        await synced(c)
        [drain] = c.view.drains("n1")
        assert drain.ended_at == released_at
        with pytest.raises(InsufficientResources):
            await c.allocate(1)  # released, but its container may still run

        # An agent that has not enforced that far yet changes nothing.
        await c.nodes.heartbeat("n1", reg.lease_id, None, enforced_revision=released_at - 1)
        await synced(c)
        assert len(c.view.drains("n1")) == 1
        with pytest.raises(InsufficientResources):
            await c.allocate(1)

        # It listed the node's allocations at (or past) the release and stopped the container.
        await c.nodes.heartbeat("n1", reg.lease_id, None, enforced_revision=released_at)
        await synced(c)
        assert c.view.drains("n1") == []
        assert (await c.allocate(2)).node == "n1"


async def test_an_allocation_without_containers_is_free_at_once(etcd: harness.Etcd, prefix: str) -> None:
    async with core([etcd.url], prefix) as c:
        await c.nodes.register(node_info("n1", gpus=2))
        a = await c.allocate(2)
        await c.allocations.release(a.id)
        assert (await c.allocate(2)).node == "n1"
        assert await c.keys_under("drain") == []


async def test_a_commit_placed_before_a_gpu_began_draining_fails(etcd: harness.Etcd, prefix: str) -> None:
    """Replica A places on a snapshot where the GPU is free; before its commit, replica B allocates the
    same GPU, runs a container on it and releases it. The GPU key is gone again and the reservation
    deleted, so only the drain/ range compare stops A's commit."""
    async with core([etcd.url], prefix) as a, core([etcd.url], prefix) as b:
        await a.nodes.register(node_info("n1", gpus=1))
        await synced(a, b)
        gate, held = asyncio.Event(), asyncio.Event()

        async def hold(n: int) -> None:
            if not held.is_set():
                held.set()
                await gate.wait()

        a.committer.before = hold
        late = asyncio.create_task(a.allocate(1))
        await asyncio.wait_for(held.wait(), 5)
        other = await b.allocate(1)
        await Endings(b.store, b.keys, b.view).note_containers(other)
        await b.allocations.release(other.id)
        gate.set()
        with pytest.raises(InsufficientResources):
            await late
        assert await a.keys_under("gpus") == []
        assert a.allocations.batcher.rejections == 1, "its commit was rejected, then refused on the newer view"


async def test_no_drain_is_written_for_an_allocation_that_ended(etcd: harness.Etcd, prefix: str) -> None:
    async with core([etcd.url], prefix) as c:
        await c.nodes.register(node_info("n1", gpus=2))
        a = await c.allocate(1)
        await c.allocations.release(a.id)
        with pytest.raises(AllocationNotFound):
            await Endings(c.store, c.keys, c.view).note_containers(a)
        assert await c.keys_under("drain") == []


def test_clearable_needs_an_end_at_or_below_the_enforced_revision() -> None:
    live = draining.Drain("a", frozenset({"GPU-1"}), 5, None)
    ended = draining.Drain("b", frozenset({"GPU-2"}), 6, 10)
    assert draining.clearable([live, ended], 9) == []
    assert draining.clearable([live, ended], 10) == [ended]
    assert draining.clearable([live, ended], 0) == []
