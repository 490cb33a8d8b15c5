"""The agent's container side in process, against a real coordinator and etcd: a `cluster` fixture
with two registered nodes, an `agent` wired as agent/app.py wires it (over an in-memory runtime),
and the small helpers its tests share (tests/e2e/test_agent_containers.py,
tests/etcd/test_agent_fencing_races.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from gpulease.agent.app import COORDINATOR_CHANNEL_OPTIONS
from gpulease.agent.containers import ContainerService, Limits, ReadyGate, RuntimeHandle
from gpulease.agent.enforcer import Enforcer
from gpulease.agent.fencing import CoordinatorClient, Fence, Vouchers
from gpulease.agent.runtime import ContainerRuntime, Hardening
from gpulease.common.container_policy import ContainerPolicy
from gpulease.dev import procs
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import types_pb2 as tpb
from tests.support import harness
from tests.support.fake_runtime import FakeRuntime
from tests.support.harness import GiB

NODE = "n1"
OTHER = "n2"
# Enforcement defaults of agent/config.py: the bounds below are the budget they promise.
INTERVAL = 2.0
GRACE = 1.0


def node_inventory(name: str) -> tpb.NodeInventory:
    inv = harness.inventory(4, cpus=32, memory=256 * GiB, node=name, labels={"host": name})
    for g in inv.gpus:
        g.cpu_affinity = "0-7" if g.index < 2 else "8-15"
    return inv


@dataclass
class Cluster:
    address: str
    stub: harness.AnyService
    inventories: dict[str, tpb.NodeInventory]

    async def allocate(self, node: str = NODE, gpus: int = 1, ttl: int = 60, cpus: int = 4) -> tpb.Allocation:
        response = await self.stub.Allocate(
            pb.AllocateRequest(
                gpus=gpus, cpus=cpus, memory_bytes=8 * GiB, ttl_seconds=ttl, owner="test", node_selector={"host": node}
            )
        )
        alloc: tpb.Allocation = response.allocation
        assert alloc.node == node
        return alloc

    async def release(self, allocation_id: str) -> None:
        assert (await self.stub.Release(pb.ReleaseRequest(allocation_id=allocation_id))).released

    async def is_live(self, allocation_id: str) -> bool:
        try:
            await self.stub.GetAllocation(pb.GetAllocationRequest(allocation_id=allocation_id))
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND
            return False
        return True


@pytest.fixture
async def cluster(coordinator: harness.Coordinator) -> AsyncIterator[Cluster]:
    async with grpc.aio.insecure_channel(coordinator.address) as channel:
        stub = harness.AnyService(channel)
        inventories = {name: node_inventory(name) for name in (NODE, OTHER)}
        for name, inv in inventories.items():
            await stub.RegisterNode(
                pb.RegisterNodeRequest(node=name, address=f"127.0.0.1:{procs.free_port()}", inventory=inv)
            )
        yield Cluster(coordinator.address, stub, inventories)


@dataclass
class Agent:
    runtime: FakeRuntime
    coordinator: CoordinatorClient
    vouchers: Vouchers
    gate: ReadyGate
    containers: ContainerService
    enforcer: Enforcer
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    def start_enforcer(self) -> None:
        self.tasks.append(asyncio.create_task(self.enforcer.run()))


@contextlib.asynccontextmanager
async def agent(
    address: str,
    runtime: FakeRuntime,
    *,
    node: str = NODE,
    reconciling: bool = False,
    interval: float = INTERVAL,
    grace: float = GRACE,
    retention: float = 3600.0,
    inventory: tpb.NodeInventory | None = None,
    latest_inventory: Callable[[], tpb.NodeInventory | None] | None = None,
    factory: Callable[[], ContainerRuntime] | None = None,
    policy: ContainerPolicy | None = None,
    network: str = "gpulease-test",
    hardening: Hardening | None = None,
    limits: Limits | None = None,
) -> AsyncIterator[Agent]:
    """The agent's container side, in process, as agent/app.py wires it.

    Its inventory is ``latest_inventory()`` if given, else ``inventory``, else the one the cluster
    fixture registered for ``node``: the agent checks allocations' GPUs against it. ``policy``:
    the agent's container policy (default: ContainerPolicy(), as an agent with no allowlists);
    ``hardening`` and ``limits``: how its containers run and what an allocation may hold (defaults
    as an agent's).
    """
    if latest_inventory is None:
        known = inventory if inventory is not None else node_inventory(node)

        def latest_inventory() -> tpb.NodeInventory | None:
            return known

    async with grpc.aio.insecure_channel(address, options=COORDINATOR_CHANNEL_OPTIONS) as channel:
        coordinator = CoordinatorClient(channel, address, timeout=3.0)
        vouchers = Vouchers()
        gate = ReadyGate(reconciling=reconciling)
        containers = ContainerService(
            node=node,
            runtime=RuntimeHandle(factory or (lambda: runtime)),
            fence=Fence(coordinator, node, vouchers),
            gate=gate,
            latest_inventory=latest_inventory,
            network=network,
            stop_grace_seconds=10.0,
            on_started=lambda info: enforcer.note_started(info),
            recheck=lambda: enforcer.recheck(),
            policy=policy,
            hardening=hardening,
            limits=limits,
        )
        enforcer = Enforcer(
            node=node, coordinator=coordinator, containers=containers, vouchers=vouchers, interval=interval,
            grace=grace, retention=retention,
        )  # fmt: skip
        a = Agent(runtime, coordinator, vouchers, gate, containers, enforcer)
        try:
            yield a
        finally:
            for t in a.tasks:
                t.cancel()
            for t in a.tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            containers.close()
            enforcer.close()


def spec(**kw: Any) -> tpb.ContainerSpec:
    kw.setdefault("image", "example/train:1")  # Docker Hub: on the default registry allowlist
    kw.setdefault("command", ["sleep", "infinity"])
    return tpb.ContainerSpec(**kw)


async def eventually(predicate: Callable[[], Awaitable[Any] | Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


async def register_again(cluster: Cluster) -> pb.RegisterNodeResponse:
    """Register NODE again, as its agent would: the answer's lease is the test's to heartbeat."""
    return await cluster.stub.RegisterNode(
        pb.RegisterNodeRequest(node=NODE, address="127.0.0.1:9", inventory=cluster.inventories[NODE])
    )


async def heartbeat(cluster: Cluster, node: str, lease: int) -> int:
    response = await cluster.stub.Heartbeat(pb.HeartbeatRequest(node=node, lease_id=lease))
    assert response.lease_id == lease  # renewed, not re-registered
    return int(response.allocations_revision)
