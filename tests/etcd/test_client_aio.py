"""AsyncClient against a real coordinator and etcd: the core cases of test_client_lifecycle, for
``async with`` handles (release on exit, exception and cancellation; keepalive task; lease loss;
UNAVAILABLE failover and bounded retries; idempotent Allocate; container argument checks)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from gpulease import errors
from gpulease.client import Container
from gpulease.client.aio import AsyncAllocation, AsyncClient, AsyncContainerHandle
from gpulease.dev import procs
from tests.support import harness

NODE_GPUS = 4


@pytest.fixture
def address(coordinator: harness.Coordinator) -> str:
    harness.register(coordinator.stub, "n1", gpus=NODE_GPUS)
    harness.wait_nodes_up(coordinator.stub, {"n1"})
    return coordinator.address


async def free_gpus(client: AsyncClient) -> int:
    return (await client.cluster_summary()).totals.gpus_free


def dead_address() -> str:
    return f"127.0.0.1:{procs.free_port()}"


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def _container(allocation_id: str) -> Container:
    return Container(id="c0ffee", allocation_id=allocation_id, revision=1, state="running", exit_code=None,
                     image="busybox", name="c", node="n1", gpu_indexes=(0,))  # fmt: skip


async def test_releases_on_normal_exit_and_on_exception(address: str) -> None:
    async with AsyncClient(address, timeout=5) as client:
        async with await client.allocate(gpus=2, ttl=30) as alloc:
            assert isinstance(alloc, AsyncAllocation) and len(alloc.gpus) == 2
            assert await free_gpus(client) == NODE_GPUS - 2
        assert alloc.released and await free_gpus(client) == NODE_GPUS
        assert await alloc.release() is False

        with pytest.raises(RuntimeError, match="boom"):
            async with await client.allocate(gpus=3, ttl=30) as failing:
                assert await free_gpus(client) == NODE_GPUS - 3
                raise RuntimeError("boom")
        assert failing.released and await free_gpus(client) == NODE_GPUS
        with pytest.raises(errors.AllocationNotFound):
            await client.get_allocation(failing.id)


async def test_cancelling_the_holder_releases(address: str) -> None:
    async with AsyncClient(address, timeout=5) as client:
        entered = asyncio.Event()

        async def hold() -> None:
            async with await client.allocate(gpus=2, ttl=60):
                entered.set()
                await asyncio.sleep(60)

        task = asyncio.create_task(hold())
        await asyncio.wait_for(entered.wait(), 20)
        assert await free_gpus(client) == NODE_GPUS - 2
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        assert await free_gpus(client) == NODE_GPUS


@pytest.mark.slow
async def test_keepalive_task_keeps_a_short_lease_alive(address: str) -> None:
    async with AsyncClient(address, timeout=5) as client:
        unattended = await client.allocate(gpus=1, ttl=5)
        async with await client.allocate(gpus=1, ttl=5) as kept:
            await asyncio.sleep(8)
            assert not kept.lost
            assert (await client.get_allocation(kept.id)).id == kept.id
            with pytest.raises(errors.AllocationNotFound):
                await client.get_allocation(unattended.id)
        assert await free_gpus(client) == NODE_GPUS


@pytest.mark.slow
async def test_lost_when_released_behind_its_back(address: str) -> None:
    async with AsyncClient(address, timeout=5) as client:
        async with await client.allocate(gpus=2, ttl=6) as alloc:
            async with AsyncClient(address, timeout=5) as other:
                assert await other.release(alloc.id) is True
            assert await wait_for(lambda: alloc.lost, 6, "the handle to notice") <= 6
            with pytest.raises(errors.AllocationLost, match="lost at"):
                await alloc.run_container("busybox", ["true"])
            with pytest.raises(errors.AllocationLost):
                await alloc.keep_alive()
            handle = AsyncContainerHandle(alloc, _container(alloc.id))
            with pytest.raises(errors.AllocationLost):
                await handle.wait()
            with pytest.raises(errors.AllocationLost):
                await handle.stop()
            with pytest.raises(errors.AllocationLost):
                async for _ in handle.logs():
                    pass
        assert await free_gpus(client) == NODE_GPUS


@pytest.mark.slow
async def test_lost_when_the_coordinator_is_gone(coordinator: harness.Coordinator, address: str) -> None:
    ttl = 5
    async with AsyncClient(address, timeout=1) as client, await client.allocate(gpus=1, ttl=ttl) as alloc:
        await asyncio.sleep(0.5)  # the first renewal is done
        stopping = time.monotonic()
        await asyncio.to_thread(coordinator.proc.stop)
        stopped = time.monotonic()
        await wait_for(lambda: alloc.lost, ttl + 5, "the lease to be declared lost")
        lost_at = time.monotonic()
        # The last renewal was at most ttl/3 before the stop began, and not after it ended: lost
        # once the TTL has run out since then.
        assert lost_at - stopping >= ttl - ttl / 3 - 0.5, (stopping, stopped, lost_at)
        assert lost_at - stopped <= ttl + 2, (stopping, stopped, lost_at)
        assert alloc.lost_reason and f"longer than its {ttl}s TTL" in alloc.lost_reason
        with pytest.raises(errors.AllocationLost):
            await alloc.keep_alive()
        started = time.monotonic()
    assert time.monotonic() - started < 5


async def test_fails_over_and_retries_are_bounded(address: str) -> None:
    async with AsyncClient([dead_address(), address], timeout=5) as client, await client.allocate(gpus=1) as alloc:
        assert alloc.node == "n1"
    dead = dead_address()
    async with AsyncClient(dead, timeout=1, retry_deadline=2) as client:
        started = time.monotonic()
        with pytest.raises(errors.Unavailable) as info:
            await client.allocate(gpus=1, ttl=30)
        assert 1.5 <= time.monotonic() - started <= 4
    assert dead in info.value.message


async def test_the_same_request_id_allocates_once(address: str) -> None:
    async with AsyncClient(address, timeout=5) as client:
        first = await client.allocate(gpus=2, ttl=30, request_id="aio-req-1", owner="idem")
        again = await client.allocate(gpus=2, ttl=30, request_id="aio-req-1", owner="idem")
        assert again.id == first.id
        assert len(await client.list_allocations(owner="idem")) == 1
        assert await free_gpus(client) == NODE_GPUS - 2
        assert await first.release() is True
        assert await again.release() is False


async def test_keepalive_context_does_not_release(address: str) -> None:
    async with AsyncClient(address, timeout=5) as client:
        made = await client.allocate(gpus=1, ttl=30)
        fetched = await client.get_allocation(made.id)
        async with fetched.keepalive():
            assert await fetched.keep_alive() > 0
        assert not fetched.released
        assert await made.release() is True


async def test_container_arguments_and_error_mapping(address: str) -> None:
    async with AsyncClient(address, timeout=5, retry_deadline=20) as client:
        async with await client.allocate(gpus=1, ttl=30) as alloc:
            with pytest.raises(errors.InvalidRequest, match="list of arguments"):
                await alloc.run_container("busybox", "echo hi")
            with pytest.raises(errors.InvalidRequest, match="volume"):
                await alloc.run_container("busybox", ["true"], volumes=["nope"])
            handle = AsyncContainerHandle(alloc, _container(alloc.id))
            with pytest.raises(errors.InvalidRequest, match="timeout"):
                await handle.wait(timeout=0)
            # The agent address leads nowhere: UNAVAILABLE from the coordinator, not resent.
            started = time.monotonic()
            with pytest.raises(errors.Unavailable, match="agent"):
                await alloc.run_container("busybox", ["true"])
            assert time.monotonic() - started < 5
        with pytest.raises(errors.AllocationNotFound):
            await client.run_container("a" * 32, "busybox", ["true"])
