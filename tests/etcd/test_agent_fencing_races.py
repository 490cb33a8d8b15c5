"""A container start against allocations that change under it (issue 11, defects 3 and 2).

Real etcd and coordinator processes; an in-memory runtime whose pull or create step runs a test's
step at exactly that point (a release, a new allocation, a re-read inventory), so each race is
forced, not hoped for:

- released while the image is pulled: the check after the pull refuses, nothing is created;
- released between that check and the start: the check after the start stops and removes it;
- a GPU still used by an ended allocation's container: refused, the enforcer asked to check now;
- every start wakes the enforcer for a fresh ListAllocations answer (and a shutdown at that
  instant still stops it);
- GPU indexes that now name other UUIDs (a GPU fell off the bus, the host rebooted): refused.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from gpulease.agent.runtime import ContainerInfo, ContainerLaunch
from gpulease.errors import Conflict, StaleFencingToken, Unavailable
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import types_pb2 as tpb
from tests.support import harness
from tests.support.agent_cluster import (
    NODE,
    Cluster,
    GiB,
    agent,
    eventually,
    heartbeat,
    node_inventory,
    register_again,
    spec,
)
from tests.support.agent_cluster import cluster as cluster  # the fixture: NODE and another node registered
from tests.support.fake_runtime import FakeRuntime

GPUS = 4  # on NODE (node_inventory)


class SteppedRuntime(FakeRuntime):
    """A FakeRuntime that runs a test's step inside a start, once: at the end of the pull, or
    right before the container is created. Steps run in the start's worker thread, so they use
    the coordinator's blocking stub."""

    def __init__(self) -> None:
        super().__init__()
        self.during_pull: Callable[[], None] | None = None
        self.before_create: Callable[[], None] | None = None

    def ensure_image(self, image: str) -> None:
        super().ensure_image(image)
        step, self.during_pull = self.during_pull, None
        if step is not None:
            step()

    def create_and_start(self, launch: ContainerLaunch) -> ContainerInfo:
        step, self.before_create = self.before_create, None
        if step is not None:
            step()
        return super().create_and_start(launch)


def allocate_all(coordinator: harness.Coordinator) -> tpb.Allocation:
    """Every GPU of NODE: whoever allocates after a release gets the very same GPUs."""
    request = pb.AllocateRequest(
        gpus=GPUS, cpus=4, memory_bytes=8 * GiB, ttl_seconds=60, owner="test", node_selector={"host": NODE}
    )
    return coordinator.stub.Allocate(request).allocation


def hand_over(coordinator: harness.Coordinator, old: tpb.Allocation, new: list[tpb.Allocation]) -> Callable[[], None]:
    """A step: release ``old`` and give its GPUs to a new holder (appended to ``new``)."""

    def step() -> None:
        assert coordinator.stub.Release(pb.ReleaseRequest(allocation_id=old.id)).released
        new.append(allocate_all(coordinator))

    return step


def running(runtime: FakeRuntime, allocation_id: str) -> list[str]:
    return [c.id for c in runtime.list(allocation_id) if c.state == "running"]


# -- defect 3: the allocation ends while its container is being started -----------------------------


async def test_released_during_the_pull_nothing_is_created(cluster: Cluster, coordinator: harness.Coordinator) -> None:
    first = allocate_all(coordinator)
    successors: list[tpb.Allocation] = []
    runtime = SteppedRuntime()
    runtime.during_pull = hand_over(coordinator, first, successors)
    async with agent(cluster.address, runtime) as a:
        with pytest.raises(StaleFencingToken, match="not live"):
            await a.containers.start(first.id, first.revision, spec())
        assert runtime.launches == [] and running(runtime, first.id) == []
        (second,) = successors
        assert await cluster.is_live(second.id)
        assert [g.uuid for g in second.gpus] == [g.uuid for g in first.gpus]  # the same GPUs
        # The new holder starts on them; nothing of the old one is in the way.
        started = await a.containers.start(second.id, second.revision, spec())
    assert started.state == tpb.CONTAINER_STATE_RUNNING
    assert [launch.allocation_id for launch in runtime.launches] == [second.id]


async def test_released_between_the_check_and_the_start_the_container_is_undone(
    cluster: Cluster, coordinator: harness.Coordinator
) -> None:
    first = allocate_all(coordinator)
    successors: list[tpb.Allocation] = []
    runtime = SteppedRuntime()
    runtime.before_create = hand_over(coordinator, first, successors)
    async with agent(cluster.address, runtime) as a:
        with pytest.raises(StaleFencingToken) as e:
            await a.containers.start(first.id, first.revision, spec())
        # It was created and started (the check before it passed), then stopped and removed.
        assert [launch.allocation_id for launch in runtime.launches] == [first.id]
        assert "was started and then stopped and removed" in e.value.message
        assert "the allocation ended (released or expired) while the container was being started" in e.value.message
        assert running(runtime, first.id) == [] and runtime.list(first.id) == []
        (second,) = successors
        assert await cluster.is_live(second.id)
        started = await a.containers.start(second.id, second.revision, spec())
    assert started.state == tpb.CONTAINER_STATE_RUNNING and running(runtime, second.id) == [started.container_id]


async def test_a_gpu_used_by_an_ended_allocations_container_is_refused_until_the_enforcer_stops_it(
    cluster: Cluster, coordinator: harness.Coordinator
) -> None:
    lease = (await register_again(cluster)).lease_id
    first = allocate_all(coordinator)
    runtime = FakeRuntime()
    async with agent(cluster.address, runtime, interval=30.0) as a:
        old = await a.containers.start(first.id, first.revision, spec())
        a.enforcer.note_allocations_revision(await heartbeat(cluster, NODE, lease), time.monotonic(), 60)
        a.start_enforcer()
        await eventually(lambda: a.enforcer.lists == 1, 5, "the first check")
        # Released and given away; no heartbeat says so, and the interval is 30 s: the enforcer
        # would keep the old container running on the GPUs for now.
        await cluster.release(first.id)
        second = allocate_all(coordinator)
        with pytest.raises(Conflict) as e:
            await a.containers.start(second.id, second.revision, spec())
        gpu = second.gpus[0]
        assert f"GPU {gpu.index} ({gpu.uuid}) of node {NODE} is in use by container {old.name}" in e.value.message
        assert f"of allocation {first.id} (revision {first.revision})" in e.value.message
        assert [launch.allocation_id for launch in runtime.launches] == [first.id]  # nothing created
        # The refusal asked the enforcer to check now, on a fresh answer: it stops the old one.
        await eventually(lambda: runtime.info(old.container_id).state == "exited", 5, "the old container stopped")
        assert a.enforcer.lists == 2
        started = await a.containers.start(second.id, second.revision, spec())
    assert started.state == tpb.CONTAINER_STATE_RUNNING


async def test_gpus_in_use_are_matched_by_uuid_or_for_old_containers_by_index(cluster: Cluster) -> None:
    alloc = await cluster.allocate(gpus=1)
    (gpu,) = alloc.gpus
    other = "0123456789abcdef"
    runtime = FakeRuntime()
    # Labelled before a reboot: same index, but another GPU (UUID). Not in the way.
    runtime.plant(allocation_id=other, revision=3, node=NODE, gpus=((gpu.index, "GPU-gone"),))
    # Started by an agent that wrote no UUID label: its index is all it says, and it is ours.
    legacy = runtime.plant(allocation_id=other, revision=3, node=NODE, gpus=((gpu.index, ""),))
    async with agent(cluster.address, runtime) as a:
        with pytest.raises(Conflict, match=f"in use by container .* \\({legacy[:12]}\\) of allocation {other}"):
            await a.containers.start(alloc.id, alloc.revision, spec())
        assert runtime.launches == []
        runtime.stop(legacy, 0)
        started = await a.containers.start(alloc.id, alloc.revision, spec())
    assert started.state == tpb.CONTAINER_STATE_RUNNING


async def test_every_start_makes_the_enforcer_ask_at_once(cluster: Cluster) -> None:
    lease = (await register_again(cluster)).lease_id
    alloc = await cluster.allocate()
    other = await cluster.allocate()
    runtime = FakeRuntime()
    async with agent(cluster.address, runtime, interval=30.0) as a:
        a.enforcer.note_allocations_revision(await heartbeat(cluster, NODE, lease), time.monotonic(), 60)
        a.start_enforcer()
        await eventually(lambda: a.enforcer.lists == 1, 5, "the first check")
        await a.containers.start(alloc.id, alloc.revision, spec())
        await eventually(lambda: a.enforcer.lists == 2, 5, "a check after the first start")
        # The heartbeat still vouches for the last answer, which has both allocations: asked anyway.
        # (Another allocation: one allocation runs one container at a time, issue 14.)
        await a.containers.start(other.id, other.revision, spec())
        await eventually(lambda: a.enforcer.lists == 3, 5, "a check after the second start")


# -- defect 2: the allocation's index/UUID pairs must be the node's --------------------------------


def shifted(inventory: tpb.NodeInventory, gone: str) -> tpb.NodeInventory:
    """The inventory after GPU ``gone`` fell off the bus and the host rebooted: the rest renumbered."""
    out = tpb.NodeInventory()
    out.CopyFrom(inventory)
    del out.gpus[:]
    for gpu in (g for g in inventory.gpus if g.uuid != gone):
        renumbered = out.gpus.add()
        renumbered.CopyFrom(gpu)
        renumbered.index = len(out.gpus) - 1
    return out


async def test_a_gpu_index_that_names_another_uuid_now_is_refused(cluster: Cluster) -> None:
    alloc = await cluster.allocate(gpus=2)
    lowest = min(alloc.gpus, key=lambda g: g.index)
    now = shifted(node_inventory(NODE), gone=lowest.uuid)
    now_uuid = next(g.uuid for g in now.gpus if g.index == lowest.index)
    runtime = FakeRuntime()
    async with agent(cluster.address, runtime, inventory=now) as a:
        with pytest.raises(StaleFencingToken) as e:
            await a.containers.start(alloc.id, alloc.revision, spec())
    assert f"holds GPU {lowest.index} as UUID {lowest.uuid!r}" in e.value.message
    assert f"GPU {lowest.index} of node {NODE} is now UUID {now_uuid!r}" in e.value.message
    assert runtime.launches == [] and runtime.calls == []  # refused before the pull, nothing created


async def test_a_gpu_index_gone_from_the_inventory_is_refused(cluster: Cluster) -> None:
    alloc = await cluster.allocate(gpus=GPUS)
    last = max(alloc.gpus, key=lambda g: g.index)
    now = shifted(node_inventory(NODE), gone=last.uuid)  # the others keep their indexes
    runtime = FakeRuntime()
    async with agent(cluster.address, runtime, inventory=now) as a:
        with pytest.raises(StaleFencingToken, match=f"has no GPU {last.index} now"):
            await a.containers.start(alloc.id, alloc.revision, spec())
    assert runtime.launches == []


async def test_gpus_that_shift_during_the_pull_are_refused_before_create(cluster: Cluster) -> None:
    alloc = await cluster.allocate(gpus=2)
    inventories = [node_inventory(NODE)]
    runtime = SteppedRuntime()

    def reboot_seen() -> None:  # the agent reads its inventory again meanwhile
        inventories.append(shifted(inventories[0], gone=min(alloc.gpus, key=lambda g: g.index).uuid))

    runtime.during_pull = reboot_seen
    async with agent(cluster.address, runtime, latest_inventory=lambda: inventories[-1]) as a:
        with pytest.raises(StaleFencingToken, match="indexes shift"):
            await a.containers.start(alloc.id, alloc.revision, spec())
    assert "ensure_image" in runtime.calls and runtime.launches == []


async def test_an_inventory_not_read_yet_means_no_start(cluster: Cluster) -> None:
    alloc = await cluster.allocate()
    runtime = FakeRuntime()
    async with agent(cluster.address, runtime, latest_inventory=lambda: None) as a:
        with pytest.raises(Unavailable, match="has not read its GPU inventory yet"):
            await a.containers.start(alloc.id, alloc.revision, spec())
    assert runtime.launches == [] and runtime.calls == []


async def test_the_enforcer_stops_when_cancelled_as_a_start_wakes_it(cluster: Cluster) -> None:
    """A start wakes the enforcer; shutdown may cancel it in the same instant. It must end."""
    runtime = FakeRuntime()
    async with agent(cluster.address, runtime, interval=30.0) as a:
        task = asyncio.create_task(a.enforcer.run())
        await eventually(lambda: a.enforcer.lists == 1, 5, "the first check")
        a.enforcer.recheck()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
