"""User-facing container operations, forwarded to the agent of the allocation's node.

The coordinator adds what the caller cannot be trusted with: the allocation's fencing token
(read linearizably from etcd) and the agent's address. The agent checks the token again
against etcd before it creates anything. What a spec may ask of a GPU server is checked here
against the coordinator's copy of the container policy before anything is forwarded
(``check_spec``, gpulease/common/container_policy.py); the agent checks its own copy again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from gpulease.common.container_policy import ContainerPolicy
from gpulease.coordinator.agents import AgentChannels, agent_error
from gpulease.coordinator.allocations import AllocationService
from gpulease.coordinator.domain import Allocation
from gpulease.coordinator.endings import Endings
from gpulease.coordinator.view import ClusterView
from gpulease.errors import AllocationNotFound, ContainerNotFound, InvalidRequest
from gpulease.v1 import agent_pb2
from gpulease.v1 import types_pb2 as tpb

# Image pulls happen inside StartContainer: give them time.
START_TIMEOUT = 900.0
CALL_TIMEOUT = 30.0
MAX_WAIT = 300

T = TypeVar("T")


class ContainerForwarder:
    def __init__(
        self,
        allocations: AllocationService,
        view: ClusterView,
        agents: AgentChannels,
        endings: Endings | None = None,
        *,
        policy: ContainerPolicy | None = None,
    ) -> None:
        self._allocs = allocations
        self._view = view
        self._agents = agents
        self._endings = endings
        self._policy = policy if policy is not None else ContainerPolicy()
        # allocation id -> member nodes a container is being started on by this replica right now
        self._starting: dict[str, list[str]] = {}

    def check_spec(self, spec: tpb.ContainerSpec, tenant: str) -> None:
        """PermissionDenied or InvalidRequest naming the container policy's rule that ``spec``
        breaks for an allocation of ``tenant``; nothing is forwarded then."""
        self._policy.check(spec, tenant=tenant)

    def _address(self, node: str) -> str:
        v = self._view.node(node)
        if v is None or not v.info.address:
            raise AllocationNotFound(f"node {node} is not registered; its containers cannot be reached")
        return v.info.address

    async def _nodes_of(self, ref: tpb.ContainerRef) -> tuple[str, ...]:
        """The nodes that may hold the allocation's containers: the live allocation's (a gang's
        members), or, once it ended, those recorded when its first container started
        (coordinator/endings.py), so logs and exit codes stay reachable after a release. Never every
        node in turn."""
        if not ref.allocation_id:
            raise InvalidRequest("allocation_id is required")
        home = self._endings.home(ref.allocation_id) if self._endings else None
        if home is not None:
            return home.all_nodes
        try:
            return (await self._allocs.get(ref.allocation_id)).nodes
        except AllocationNotFound:
            pass
        raise ContainerNotFound(
            f"no container of allocation {ref.allocation_id} is known: the allocation is not live, and none of its "
            "containers ran within the retention time"
        )

    async def _on_members(self, ref: tpb.ContainerRef, call: Callable[[Any], Awaitable[T]]) -> T:
        """``call(stub)`` on the agent of the node holding the container: the one node, or, for a
        gang, each member in turn until one knows the container (ContainerNotFound: the next)."""
        nodes = await self._nodes_of(ref)
        for i, node in enumerate(nodes):
            address = self._address(node)
            try:
                return await call(self._agents.stub(node, address))
            except grpc.aio.AioRpcError as exc:
                err = agent_error(exc, node, address)
                if isinstance(err, ContainerNotFound) and i + 1 < len(nodes):
                    continue
                raise err from None
        raise AssertionError("unreachable: an allocation has at least one node")

    def starting_on(self, allocation_id: str) -> str | None:
        """The one member node this replica is starting a container of ``allocation_id`` on now, if
        exactly one: how a clear-text coordinator (no agent identities) tells which member's agent
        asks GetNodeAllocation while it fences that start."""
        nodes = set(self._starting.get(allocation_id, ()))
        return nodes.pop() if len(nodes) == 1 else None

    async def run(self, alloc: Allocation, spec: tpb.ContainerSpec) -> tpb.ContainerStatus:
        """``alloc`` as read linearizably for this call (AllocationService.get), as seen on the node
        to run on (a gang's member: Allocation.on): its revision is the current fencing token, which
        the agent checks again before it creates anything."""
        address = self._address(alloc.node)
        request = agent_pb2.StartContainerRequest(allocation_id=alloc.id, revision=alloc.revision, spec=spec)
        self._starting.setdefault(alloc.id, []).append(alloc.node)
        try:
            started: tpb.ContainerStatus = await self._agents.stub(alloc.node, address).StartContainer(
                request, timeout=START_TIMEOUT
            )
            return started
        except grpc.aio.AioRpcError as exc:
            raise agent_error(exc, alloc.node, address) from None
        finally:
            nodes = self._starting[alloc.id]
            nodes.remove(alloc.node)
            if not nodes:
                del self._starting[alloc.id]

    async def wait(self, request: tpb.WaitContainerRequest) -> tpb.ContainerStatus:
        if not 0 <= request.timeout_seconds <= MAX_WAIT:
            raise InvalidRequest(f"timeout_seconds must be 0 to {MAX_WAIT}, got {request.timeout_seconds}")
        budget = (request.timeout_seconds or 30) + CALL_TIMEOUT
        waited: tpb.ContainerStatus = await self._on_members(
            request.ref, lambda stub: stub.WaitContainer(request, timeout=budget)
        )
        return waited

    async def stop(self, request: tpb.StopContainerRequest) -> tpb.ContainerStatus:
        if not 0 <= request.grace_seconds <= 3600:
            raise InvalidRequest(f"grace_seconds must be 0 to 3600, got {request.grace_seconds}")
        status: tpb.ContainerStatus = await self._on_members(
            request.ref, lambda stub: stub.StopContainer(request, timeout=(request.grace_seconds or 10) + CALL_TIMEOUT)
        )
        return status

    async def list(self, allocation_id: str) -> tpb.ListContainersResponse:
        """The allocation's containers: on its node, or on every member of a gang."""
        out = tpb.ListContainersResponse()
        for node in await self._nodes_of(tpb.ContainerRef(allocation_id=allocation_id)):
            address = self._address(node)
            try:
                listed: tpb.ListContainersResponse = await self._agents.stub(node, address).ListContainers(
                    tpb.ListContainersRequest(allocation_id=allocation_id), timeout=CALL_TIMEOUT
                )
            except grpc.aio.AioRpcError as exc:
                raise agent_error(exc, node, address) from None
            out.containers.extend(listed.containers)
        return out

    async def stop_all(self, alloc: Allocation, grace_seconds: int) -> None:
        """Stop every running container of ``alloc`` (preemption): SIGTERM, SIGKILL after the grace."""
        listed = await self.list(alloc.id)
        for c in listed.containers:
            if c.state == tpb.CONTAINER_STATE_RUNNING:
                ref = tpb.ContainerRef(allocation_id=alloc.id, container_id=c.container_id)
                await self.stop(tpb.StopContainerRequest(ref=ref, grace_seconds=min(grace_seconds, 3600)))

    async def logs(self, request: tpb.StreamLogsRequest) -> AsyncIterator[tpb.LogChunk]:
        nodes = await self._nodes_of(request.ref)
        for i, node in enumerate(nodes):
            address = self._address(node)
            call = self._agents.stub(node, address).StreamLogs(
                request, timeout=None if request.follow else CALL_TIMEOUT
            )
            sent = False
            try:
                async for chunk in call:
                    sent = True
                    yield chunk
                return
            except grpc.aio.AioRpcError as exc:
                err = agent_error(exc, node, address)
                if isinstance(err, ContainerNotFound) and not sent and i + 1 < len(nodes):
                    continue  # a gang: the container is on another member
                raise err from None
            finally:
                call.cancel()  # the user went away: stop the agent's stream too
