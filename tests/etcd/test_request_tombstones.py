"""Release-time tombstones and CancelRequest (issue 17): an Allocate attempt the client moved on from
can never commit after the request was released or cancelled, so no GPU is held by nobody.

The interleavings are forced: replica A's commit is held by a hook while the client's retry of the
same request id on replica B is answered, used and released; only then does A's commit go on.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable

import pytest

from gpulease.client import Client
from gpulease.coordinator import tombstones
from gpulease.coordinator.allocations import AllocateInput
from gpulease.errors import DeadlineExceeded, InvalidRequest, RequestReleased, Unavailable
from tests.support import harness
from tests.support.inproc import Core, core, node_info, until


def ask(request_id: str, gpus: int = 1) -> AllocateInput:
    return AllocateInput(gpus=gpus, cpus=1, memory_bytes=2**30, ttl_seconds=30, request_id=request_id)


def hold_first_commit(c: Core) -> tuple[asyncio.Event, asyncio.Event]:
    """(gate, held): the next commit of `c` waits, with `held` set, until `gate` is set."""
    gate, held = asyncio.Event(), asyncio.Event()

    async def hold(n: int) -> None:
        if not held.is_set():
            held.set()
            await gate.wait()

    c.committer.before = hold
    return gate, held


async def gpu_keys(c: Core) -> list[str]:
    return await c.keys_under("gpus")


async def test_an_attempt_held_past_the_release_of_its_retry_cannot_commit(etcd: harness.Etcd, prefix: str) -> None:
    """The defect: A's attempt committed after the client had its answer from B and had released it,
    holding a GPU for nobody until its TTL (0-3 of 16 GPUs after an etcd leader storm)."""
    async with core([etcd.url], prefix) as a, core([etcd.url], prefix) as b:
        await a.nodes.register(node_info("n1", gpus=4))
        assert await b.view.wait_for_revision(await a.store.put(f"{prefix}sync", b""), 5)
        gate, held = hold_first_commit(a)
        stale = asyncio.create_task(a.allocations.allocate(ask("job-1")))
        await asyncio.wait_for(held.wait(), 5)  # A placed it and is about to commit

        # The client gave up on A, sent the same request id to B, got it, used it and released it.
        mine, reused = await b.allocations.allocate(ask("job-1"))
        assert not reused
        assert await b.allocations.release(mine.id) > 0

        gate.set()
        with pytest.raises(RequestReleased, match="job-1"):
            await stale
        assert await gpu_keys(a) == []
        assert await a.keys_under("allocs") == []
        kv = await a.store.get(a.keys.req(mine.request_id))
        assert kv is not None and tombstones.is_tombstone(kv.value)
        assert tombstones.released_id(kv.value) == mine.id


async def test_cancel_stops_an_attempt_in_flight_and_releases_what_it_holds(etcd: harness.Etcd, prefix: str) -> None:
    async with core([etcd.url], prefix) as a, core([etcd.url], prefix) as b:
        await a.nodes.register(node_info("n1", gpus=4))
        assert await b.view.wait_for_revision(await a.store.put(f"{prefix}sync", b""), 5)
        # In flight on A, cancelled through B before it commits: it never commits.
        gate, held = hold_first_commit(a)
        stale = asyncio.create_task(a.allocations.allocate(ask("job-2")))
        await asyncio.wait_for(held.wait(), 5)
        released, revision = await b.allocations.cancel("job-2", 30)
        assert released == "" and revision > 0
        gate.set()
        with pytest.raises(RequestReleased):
            await stale
        assert await gpu_keys(a) == []

        # Live: cancel releases it, and the id does not allocate again while its tombstone lives.
        alloc, _ = await a.allocations.allocate(ask("job-3", gpus=2))
        released, _ = await b.allocations.cancel("job-3", 30)
        assert released == alloc.id
        assert await gpu_keys(a) == []
        with pytest.raises(RequestReleased, match="Use a new request id"):
            await a.allocations.allocate(ask("job-3", gpus=2))
        assert await gpu_keys(a) == []
        # Idempotent: cancelling again changes nothing.
        assert (await b.allocations.cancel("job-3", 30))[0] == ""


async def test_tombstones_share_a_lease_that_outlives_every_attempt(etcd: harness.Etcd, prefix: str) -> None:
    async with core([etcd.url], prefix) as a:
        await a.nodes.register(node_info("n1", gpus=4))
        first, _ = await a.allocations.allocate(ask("t-1"))
        second, _ = await a.allocations.allocate(ask("t-2"))
        await a.allocations.release(first.id)
        await a.allocations.release(second.id)
        kvs = [await a.store.get(a.keys.req(x.request_id)) for x in (first, second)]
        assert all(kv is not None and tombstones.is_tombstone(kv.value) for kv in kvs)
        leases = {kv.lease for kv in kvs if kv is not None}
        assert len(leases) == 1  # one LeaseGrant for many releases
        ttl = await a.store.keepalive_once(leases.pop())
        assert ttl >= tombstones.life_needed(30)


async def test_an_attempt_stalled_past_the_bound_takes_no_lease_and_commits_nothing(
    etcd: harness.Etcd, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with core([etcd.url], prefix) as a:
        await a.nodes.register(node_info("n1", gpus=4))
        monkeypatch.setattr(tombstones, "ATTEMPT_BOUND_S", 0.2)
        prep = a.allocations.prepare(ask("slow-1"))
        await asyncio.sleep(0.3)  # the process was stopped, say, between arrival and commit
        with pytest.raises(Unavailable, match="nothing was allocated"):
            await a.allocations.allocate_prepared(prep)
        assert await gpu_keys(a) == [] and await a.keys_under("reqs") == []


def test_an_allocate_left_on_a_stopped_coordinator_never_commits_after_the_release(
    start_coordinator: Callable[..., harness.Coordinator],
) -> None:
    """The storm's leak, end to end: the coordinator that got the Allocate stops answering (SIGSTOP);
    the client moves on to the other one at its deadline, gets the allocation, releases it. When the
    stopped one resumes, its attempt of the same request cannot commit."""
    a, b = start_coordinator(), start_coordinator()
    harness.register(b.stub, "n1", gpus=4)
    with Client([a.address, b.address], timeout=2) as client:
        assert harness.free_gpus(client) == 4  # answered by a: the next call starts there
        os.kill(a.proc.pid, signal.SIGSTOP)
        try:
            alloc = client.allocate(gpus=1, request_id="rid-stopped", ttl=30)  # a: deadline; then b
            assert alloc.release()
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)
        with Client(a.address, timeout=5) as via_a:
            harness.wait_until(lambda: harness.free_gpus(via_a) == 4, 10, "a to answer again")
            with pytest.raises(RequestReleased):
                via_a.allocate(gpus=1, request_id="rid-stopped", ttl=30)
        time.sleep(1)  # anything a still had in flight has landed or failed by now
        assert harness.free_gpus(client) == 4
        assert client.list_allocations() == []


def test_the_client_cancels_an_allocate_whose_outcome_it_does_not_know(
    coordinator: harness.Coordinator,
) -> None:
    """The coordinator stops answering (SIGSTOP) while it has the Allocate: the client's deadline
    passes with the outcome unknown. The client cancels the request (the coordinator is resumed
    in between: allocate 0-3 s, resumed at 4.5 s, cancel 3-6 s) and says so; nothing is held
    afterwards, whatever the coordinator did with the attempt."""
    harness.register(coordinator.stub, "n1", gpus=4)
    pid = coordinator.proc.pid
    resume = threading.Timer(4.5, os.kill, (pid, signal.SIGCONT))
    with Client(coordinator.address, timeout=3) as client:
        assert harness.free_gpus(client) == 4
        os.kill(pid, signal.SIGSTOP)
        resume.start()
        try:
            with pytest.raises(DeadlineExceeded, match="the client cancelled request rid-unknown"):
                client.allocate(gpus=1, request_id="rid-unknown", ttl=30)
        finally:
            resume.cancel()
            os.kill(pid, signal.SIGCONT)
        time.sleep(1)  # anything the coordinator still had in flight has landed or failed by now
        assert harness.free_gpus(client) == 4 and client.list_allocations() == []
        with pytest.raises(RequestReleased):
            client.allocate(gpus=1, request_id="rid-unknown", ttl=30)


async def test_a_release_sent_again_is_told_released_only_by_the_same_call(etcd: harness.Etcd, prefix: str) -> None:
    """A Release whose answer was lost is sent again (same release_id): it is told the allocation was
    released, at the revision of the release, rather than "not live". Another call is not."""
    async with core([etcd.url], prefix) as a, core([etcd.url], prefix) as b:
        await a.nodes.register(node_info("n1", gpus=4))
        alloc, _ = await a.allocations.allocate(ask("job-r"))
        first = await a.allocations.release(alloc.id, release_id="call-1")
        assert first > 0
        assert await b.view.wait_for_revision(first, 5)
        assert await b.allocations.release(alloc.id, release_id="call-1") == first  # the retry, elsewhere
        assert await a.allocations.release(alloc.id, release_id="call-2") == 0  # another call
        assert await a.allocations.release(alloc.id) == 0


async def test_a_cancel_with_a_ttl_out_of_range_is_refused_and_writes_nothing(etcd: harness.Etcd, prefix: str) -> None:
    async with core([etcd.url], prefix) as a:
        with pytest.raises(InvalidRequest, match="ttl of 9999999s is out of range"):
            await a.allocations.cancel("job-x", 9_999_999)
        assert await a.keys_under("reqs") == []


async def _released_elsewhere_while_a_watch_stood_still(a: Core, b: Core) -> tuple[str, int]:
    """Allocate through A, stop A's watch, release through B (release_id "call-1"): A's view still
    holds the allocation. Returns (allocation id, the release's revision)."""
    await a.nodes.register(node_info("n1", gpus=4))
    alloc, _ = await a.allocations.allocate(ask("job-s"))
    assert await b.view.wait_for_revision(alloc.revision, 5)
    watch = a.tasks[0]  # the view's task (core() starts it first)
    watch.cancel()
    await asyncio.gather(watch, return_exceptions=True)
    first = await b.allocations.release(alloc.id, release_id="call-1")
    assert first > 0 and a.view.allocation(alloc.id) is not None  # A has not seen the release
    return alloc.id, first


async def test_a_release_sent_again_to_a_replica_whose_watch_stalled_is_told_released(
    etcd: harness.Etcd, prefix: str
) -> None:
    """The CI failure of stop 22 (test_watch_compaction): the retry of a Release whose answer was lost
    reached a replica whose watch was stalled. Its view still held the allocation, its compare found
    it gone, and without the release's event it answered "not live": the history called it lost."""
    async with core([etcd.url], prefix) as a, core([etcd.url], prefix) as b:
        alloc_id, first = await _released_elsewhere_while_a_watch_stood_still(a, b)
        assert await a.allocations.release(alloc_id, release_id="call-1") == first
        assert await a.allocations.release(alloc_id, release_id="call-2") == 0  # another call
        assert await a.allocations.release(alloc_id) == 0


async def test_a_release_sent_again_after_a_reload_or_a_start_is_told_released(etcd: harness.Etcd, prefix: str) -> None:
    """A watch that lost its place (a compaction) reloads the view from a snapshot taken after the
    release: the release's events never reach it. The retry is still told "released", and so it is
    by a replica that started after the release."""
    async with core([etcd.url], prefix) as a, core([etcd.url], prefix) as b:
        alloc_id, first = await _released_elsewhere_while_a_watch_stood_still(a, b)
        loads = a.view.loads
        a.tasks[0] = asyncio.create_task(a.view.run())  # reloads from a snapshot, as after a compaction
        await until(lambda: a.view.loads > loads, 5, "A's view to reload")
        assert a.view.allocation(alloc_id) is None
        assert await a.allocations.release(alloc_id, release_id="call-2") == 0  # another call
        assert await a.allocations.release(alloc_id, release_id="call-1") == first
        async with core([etcd.url], prefix) as fresh:  # a replica started after the release
            assert await fresh.allocations.release(alloc_id, release_id="call-1") == first
            assert await fresh.allocations.release(alloc_id, release_id="call-2") == 0
