"""Thin gRPC servicers, one per audience: proto in, service call, proto out. Errors go through
the catalog. CoordinatorServicer serves users, NodeServicer agents, AdminServicer operators, so
that who may call what can be decided per service."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc

from gpulease.coordinator import convert
from gpulease.coordinator.allocations import AllocateInput, AllocationService
from gpulease.coordinator.containers import ContainerForwarder
from gpulease.coordinator.domain import Allocation
from gpulease.coordinator.errors import grpc_errors
from gpulease.coordinator.nodes import NodeService
from gpulease.coordinator.view import ClusterView
from gpulease.errors import InvalidRequest
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import coordinator_pb2_grpc as pb_grpc
from gpulease.v1 import types_pb2 as tpb

Ctx: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


def _alloc_pb(view: ClusterView, a: Allocation) -> tpb.Allocation:
    node = view.node(a.node)
    return convert.allocation(a, node.info.address if node else "")


class CoordinatorServicer(pb_grpc.CoordinatorServiceServicer):
    """Users: allocations, containers on them, and the cluster's state."""

    def __init__(
        self, allocations: AllocationService, nodes: NodeService, view: ClusterView, containers: ContainerForwarder
    ) -> None:
        self._allocs = allocations
        self._nodes = nodes
        self._view = view
        self._containers = containers

    def _alloc_pb(self, a: Allocation) -> tpb.Allocation:
        return _alloc_pb(self._view, a)

    @grpc_errors
    async def Allocate(self, request: pb.AllocateRequest, context: Ctx) -> pb.AllocateResponse:
        alloc, reused = await self._allocs.allocate(
            AllocateInput(
                gpus=request.gpus,
                cpus=request.cpus if request.HasField("cpus") else None,
                memory_bytes=request.memory_bytes if request.HasField("memory_bytes") else None,
                gpu_model=request.gpu_model,
                min_gpu_memory_bytes=request.min_gpu_memory_bytes,
                node_selector=dict(request.node_selector),
                ttl_seconds=request.ttl_seconds,
                owner=request.owner,
                request_id=request.request_id,
            )
        )
        return pb.AllocateResponse(allocation=self._alloc_pb(alloc), reused=reused)

    @grpc_errors
    async def Release(self, request: pb.ReleaseRequest, context: Ctx) -> pb.ReleaseResponse:
        revision = await self._allocs.release(request.allocation_id)
        return pb.ReleaseResponse(released=revision > 0, revision=revision)

    @grpc_errors
    async def KeepAlive(self, request: pb.KeepAliveRequest, context: Ctx) -> pb.KeepAliveResponse:
        return pb.KeepAliveResponse(ttl_seconds=await self._allocs.keep_alive(request.allocation_id))

    @grpc_errors
    async def GetAllocation(self, request: pb.GetAllocationRequest, context: Ctx) -> pb.GetAllocationResponse:
        alloc = await self._allocs.get(request.allocation_id)
        return pb.GetAllocationResponse(allocation=self._alloc_pb(alloc))

    @grpc_errors
    async def ListAllocations(self, request: pb.ListAllocationsRequest, context: Ctx) -> pb.ListAllocationsResponse:
        allocs = await self._allocs.list(node=request.node, owner=request.owner)
        return pb.ListAllocationsResponse(allocations=[self._alloc_pb(a) for a in allocs])

    @grpc_errors
    async def ListNodes(self, request: pb.ListNodesRequest, context: Ctx) -> pb.ListNodesResponse:
        return pb.ListNodesResponse(nodes=[convert.node(v) for v in self._nodes.nodes()])

    @grpc_errors
    async def GetClusterSummary(
        self, request: pb.GetClusterSummaryRequest, context: Ctx
    ) -> pb.GetClusterSummaryResponse:
        return convert.cluster_summary(self._nodes.nodes(), self._view.revision)

    # --- containers, forwarded to the allocation's agent ------------------------------------

    @grpc_errors
    async def RunContainer(self, request: pb.RunContainerRequest, context: Ctx) -> tpb.ContainerStatus:
        return await self._containers.run(request.allocation_id, request.spec)

    @grpc_errors
    async def WaitContainer(self, request: tpb.WaitContainerRequest, context: Ctx) -> tpb.ContainerStatus:
        return await self._containers.wait(request)

    @grpc_errors
    async def StopContainer(self, request: tpb.StopContainerRequest, context: Ctx) -> tpb.ContainerStatus:
        return await self._containers.stop(request)

    @grpc_errors
    async def ListContainers(self, request: tpb.ListContainersRequest, context: Ctx) -> tpb.ListContainersResponse:
        return await self._containers.list(request.allocation_id)

    @grpc_errors
    async def StreamLogs(self, request: tpb.StreamLogsRequest, context: Ctx) -> None:  # type: ignore[override]
        # A coroutine writing to the stream (not an async generator) so the error catalog applies.
        async for chunk in self._containers.logs(request):
            await context.write(chunk)


class NodeServicer(pb_grpc.NodeServiceServicer):
    """Agents: registration, heartbeats, and the allocations that run on their node."""

    def __init__(self, allocations: AllocationService, nodes: NodeService, view: ClusterView) -> None:
        self._allocs = allocations
        self._nodes = nodes
        self._view = view

    @grpc_errors
    async def RegisterNode(self, request: pb.RegisterNodeRequest, context: Ctx) -> pb.RegisterNodeResponse:
        reg = await self._nodes.register(convert.node_info(request.node, request.address, request.inventory))
        return pb.RegisterNodeResponse(
            lease_id=reg.lease_id,
            heartbeat_interval_seconds=reg.heartbeat_interval,
            node_ttl_seconds=reg.node_ttl,
            allocations_revision=reg.allocations_revision,
        )

    @grpc_errors
    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Ctx) -> pb.HeartbeatResponse:
        info = (
            convert.node_info(request.node, request.address, request.inventory)
            if request.HasField("inventory")
            else None
        )
        reg = await self._nodes.heartbeat(request.node, request.lease_id, info)
        return pb.HeartbeatResponse(lease_id=reg.lease_id, heartbeat_interval_seconds=reg.heartbeat_interval,
                                    allocations_revision=reg.allocations_revision)  # fmt: skip

    @grpc_errors
    async def ListNodeAllocations(self, request: pb.ListAllocationsRequest, context: Ctx) -> pb.ListAllocationsResponse:
        if not request.node:
            raise InvalidRequest("ListNodeAllocations needs the node whose allocations to list")
        allocs = await self._allocs.list(node=request.node, owner=request.owner)
        return pb.ListAllocationsResponse(allocations=[_alloc_pb(self._view, a) for a in allocs])

    @grpc_errors
    async def GetNodeAllocation(self, request: pb.GetAllocationRequest, context: Ctx) -> pb.GetAllocationResponse:
        return pb.GetAllocationResponse(allocation=_alloc_pb(self._view, await self._allocs.get(request.allocation_id)))


class AdminServicer(pb_grpc.AdminServiceServicer):
    """Operators and the benchmark."""

    def __init__(self, allocations: AllocationService, nodes: NodeService, view: ClusterView) -> None:
        self._allocs = allocations
        self._nodes = nodes
        self._view = view

    @grpc_errors
    async def CordonNode(self, request: pb.CordonNodeRequest, context: Ctx) -> pb.CordonNodeResponse:
        view = await self._nodes.cordon(request.node, request.cordoned)
        return pb.CordonNodeResponse(node=convert.node(view))

    @grpc_errors
    async def GetStats(self, request: pb.GetStatsRequest, context: Ctx) -> pb.GetStatsResponse:
        b = self._allocs.batcher
        return pb.GetStatsResponse(
            allocations_committed=b.committed,
            commits=b.commits,
            rejected_commits=b.rejections,
            view_revision=self._view.revision,
            nodes=len(self._view.nodes()),
        )
