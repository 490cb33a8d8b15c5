"""One tenant cannot starve the agent (issue 14, part B): the per-allocation and per-node limits of
the container service, in process against a real coordinator and etcd, with an in-memory runtime.

- log streams: at most Limits.max_log_streams_per_allocation per allocation (RATE_LIMITED, rule
  'log-streams'); another allocation streams meanwhile;
- waits: at most Limits.max_waits_per_allocation per allocation (rule 'waits'), all of one
  container's waits sharing one watcher;
- starts: one in flight per allocation (RATE_LIMITED, rule 'starts');
- pulls: at most Limits.max_concurrent_pulls in flight on the node, the rest waiting in the order
  they came; a caller that goes away leaves the queue, or has its pull cut (PULL_CANCEL).

The same against the real dockerd, with a registry that trickles bytes, 50 stuck pulls and 500
waits, and a real agent process: tests/e2e/test_agent_starvation.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest

from gpulease.agent.containers import FairSlots, Limits
from gpulease.agent.runtime import PULL_CANCEL
from gpulease.errors import RateLimited
from gpulease.v1 import types_pb2 as tpb
from tests.support.agent_cluster import Cluster, agent, eventually, spec
from tests.support.agent_cluster import cluster as cluster  # the fixture: NODE and OTHER registered
from tests.support.fake_runtime import FakeRuntime

LIMITS = Limits(max_concurrent_pulls=2, max_log_streams_per_allocation=4, max_waits_per_allocation=8)


class GatedPulls(FakeRuntime):
    """Every pull blocks until the test opens its image's gate (bounded), and records whether its
    caller's PULL_CANCEL event was set."""

    def __init__(self) -> None:
        super().__init__()
        self.gates: dict[str, threading.Event] = {}
        self.pulling: list[str] = []
        self.cancelled: list[str] = []

    def ensure_image(self, image: str) -> None:
        cancel = PULL_CANCEL.get()
        with self._cond:
            self.pulling.append(image)
        gate = self.gates.setdefault(image, threading.Event())
        for _ in range(200):  # at most 20 s
            if gate.wait(0.1):
                break
            if cancel is not None and cancel.is_set():
                self.cancelled.append(image)
                raise RuntimeError("cancelled")
        super().ensure_image(image)


async def test_log_streams_are_limited_per_allocation(cluster: Cluster) -> None:
    runtime = FakeRuntime()
    async with agent(cluster.address, runtime, limits=LIMITS) as a:
        mine, other = await cluster.allocate(), await cluster.allocate()
        c_mine = await a.containers.start(mine.id, mine.revision, spec())
        c_other = await a.containers.start(other.id, other.revision, spec())
        runtime.containers[c_mine.container_id].logs.append(("stdout", b"hello\n"))
        held = [a.containers.logs(tpb.ContainerRef(container_id=c_mine.container_id), follow=True) for _ in range(4)]
        try:
            for stream in held:
                assert (await anext(stream)).data == b"hello\n"
            with pytest.raises(RateLimited) as e:
                await anext(a.containers.logs(tpb.ContainerRef(container_id=c_mine.container_id), follow=True))
            assert e.value.message.startswith("rule 'log-streams': ") and mine.id in e.value.message
            # Another allocation streams meanwhile, to its end.
            runtime.containers[c_other.container_id].logs.append(("stdout", b"other\n"))
            runtime.finish(c_other.container_id, 0)
            got = [c.data async for c in a.containers.logs(tpb.ContainerRef(container_id=c_other.container_id), True)]
            assert got == [b"other\n"]
            # A stream that ends frees its place.
            await held.pop().aclose()
            again = a.containers.logs(tpb.ContainerRef(container_id=c_mine.container_id), follow=True)
            assert (await anext(again)).data == b"hello\n"
            held.append(again)
        finally:
            for stream in held:
                await stream.aclose()
        assert runtime.wait_readers_gone(5.0)


async def test_waits_are_limited_per_allocation_and_share_one_watcher(cluster: Cluster) -> None:
    runtime = FakeRuntime()
    async with agent(cluster.address, runtime, limits=LIMITS) as a:
        mine, other = await cluster.allocate(), await cluster.allocate()
        c_mine = await a.containers.start(mine.id, mine.revision, spec())
        c_other = await a.containers.start(other.id, other.revision, spec())
        ref = tpb.ContainerRef(container_id=c_mine.container_id)
        waits = [asyncio.create_task(a.containers.wait(ref, 60)) for _ in range(8)]
        await eventually(lambda: a.containers._waits.count(mine.id) == 8, 5, "8 waits in flight")
        with pytest.raises(RateLimited) as e:
            await a.containers.wait(ref, 60)
        assert e.value.message.startswith("rule 'waits': ")
        # Another allocation's wait is not held up.
        runtime.finish(c_other.container_id, 4)
        assert (await a.containers.wait(tpb.ContainerRef(container_id=c_other.container_id), 10)).exit_code == 4
        # One watcher for the eight: at most one runtime.wait in flight for the container at a time.
        assert len(a.containers._exit_watches) == 1
        runtime.finish(c_mine.container_id, 3)
        done = await asyncio.wait_for(asyncio.gather(*waits), 10)
        assert {s.exit_code for s in done} == {3}
        assert a.containers._waits.count(mine.id) == 0 and not a.containers._exit_watches


async def test_a_wait_whose_caller_goes_stops_its_watcher(cluster: Cluster) -> None:
    runtime = FakeRuntime()
    async with agent(cluster.address, runtime, limits=LIMITS) as a:
        alloc = await cluster.allocate()
        c = await a.containers.start(alloc.id, alloc.revision, spec())
        task = asyncio.create_task(a.containers.wait(tpb.ContainerRef(container_id=c.container_id), 60))
        await eventually(lambda: a.containers._exit_watches, 5, "a watcher")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # The watcher ends after its current slice (WAIT_SLICE_S) once no one waits.
        await eventually(lambda: not a.containers._exit_watches, 5, "the watcher to end")
        assert a.containers._waits.count(alloc.id) == 0


async def test_one_start_in_flight_per_allocation(cluster: Cluster) -> None:
    runtime = GatedPulls()
    async with agent(cluster.address, runtime, limits=LIMITS) as a:
        alloc = await cluster.allocate()
        first = asyncio.create_task(a.containers.start(alloc.id, alloc.revision, spec(image="example/slow:1")))
        await eventually(lambda: runtime.pulling, 5, "the first start to pull")
        with pytest.raises(RateLimited) as e:
            await a.containers.start(alloc.id, alloc.revision, spec(image="example/other:1"))
        assert e.value.message.startswith("rule 'starts': ")
        runtime.gates["example/slow:1"].set()
        assert (await asyncio.wait_for(first, 10)).state == tpb.CONTAINER_STATE_RUNNING


async def test_pulls_are_limited_per_node_and_served_in_turn(cluster: Cluster) -> None:
    runtime = GatedPulls()
    async with agent(cluster.address, runtime, limits=LIMITS) as a:
        allocs = [await cluster.allocate() for _ in range(4)]
        images = [f"example/img{i}:1" for i in range(4)]
        starts = []
        for alloc, image in zip(allocs, images, strict=True):
            starts.append(asyncio.create_task(a.containers.start(alloc.id, alloc.revision, spec(image=image))))
            await asyncio.sleep(0.05)  # in this order
        await eventually(lambda: len(runtime.pulling) == 2, 5, "two pulls in flight")
        await asyncio.sleep(0.3)
        assert runtime.pulling == images[:2] and a.containers.pulls.waiting == 2
        # The third's caller goes away: it leaves the queue without pulling.
        starts[2].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starts[2]
        assert a.containers.pulls.waiting == 1
        # The second's caller goes away while it pulls: its pull is told (PULL_CANCEL) and its
        # place goes to the fourth once the runtime has let go.
        starts[1].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starts[1]
        await eventually(lambda: runtime.cancelled == [images[1]], 5, "the second pull to be cancelled")
        await eventually(lambda: runtime.pulling == [images[0], images[1], images[3]], 5, "the fourth to pull")
        for image in (images[0], images[3]):
            runtime.gates[image].set()
        for task in (starts[0], starts[3]):
            assert (await asyncio.wait_for(task, 10)).state == tpb.CONTAINER_STATE_RUNNING
        assert a.containers.pulls.in_use == 0 and a.containers.pulls.waiting == 0
        assert images[2] not in runtime.pulling


async def test_fair_slots_serve_in_order_and_skip_the_cancelled() -> None:
    slots = FairSlots(1)
    await slots.acquire()
    order: list[int] = []

    async def take(i: int) -> None:
        await slots.acquire()
        order.append(i)
        slots.release()

    tasks = [asyncio.create_task(take(i)) for i in range(5)]
    await asyncio.sleep(0.01)
    tasks[2].cancel()
    slots.release()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert order == [0, 1, 3, 4] and slots.in_use == 0 and slots.waiting == 0
