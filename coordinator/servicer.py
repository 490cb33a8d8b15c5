"""Thin gRPC servicers, one per audience: proto in, service call, proto out. Errors go through
the catalog. CoordinatorServicer serves users, NodeServicer agents, AdminServicer operators, so
that who may call what can be decided per service.

Every method is wrapped with @rpc (coordinator/guard.py): the caller is authenticated from the
connection and checked against the RPC's rule (coordinator/authz.py) before the method runs;
``caller()`` is that principal. Object-level checks (whose allocation, which node) follow here or
in the services, with the same authz functions."""

from __future__ import annotations

import time
from typing import Any, TypeAlias

import grpc

from gpulease.common.identity import Role
from gpulease.coordinator import authz, convert, telemetry
from gpulease.coordinator.allocations import AllocateInput, AllocationService
from gpulease.coordinator.audit import AuditLog
from gpulease.coordinator.containers import ContainerForwarder
from gpulease.coordinator.domain import Allocation, Reservation
from gpulease.coordinator.endings import Endings
from gpulease.coordinator.guard import Guard, auth_method, caller, rpc
from gpulease.coordinator.nodes import NodeService
from gpulease.coordinator.policies import Policies, TenantStatus
from gpulease.coordinator.preemption import Notice, Preemptions
from gpulease.coordinator.priority_classes import PriorityClass
from gpulease.coordinator.quota import Quota
from gpulease.coordinator.tokens import TokenRecord, Tokens
from gpulease.coordinator.view import ClusterView
from gpulease.coordinator.waiting import Status, WaitingQueue
from gpulease.errors import InvalidRequest
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import coordinator_pb2_grpc as pb_grpc
from gpulease.v1 import types_pb2 as tpb

Ctx: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


def _alloc_pb(view: ClusterView, a: Allocation) -> tpb.Allocation:
    addresses = {}
    for name in a.nodes:
        node = view.node(name)
        addresses[name] = node.info.address if node else ""
    return convert.allocation(a, addresses.get(a.node, ""), addresses)


def _allocate_input(request: pb.AllocateRequest) -> AllocateInput:
    return AllocateInput(
        gpus=request.gpus,
        cpus=request.cpus if request.HasField("cpus") else None,
        memory_bytes=request.memory_bytes if request.HasField("memory_bytes") else None,
        gpu_model=request.gpu_model,
        min_gpu_memory_bytes=request.min_gpu_memory_bytes,
        node_selector=dict(request.node_selector),
        ttl_seconds=request.ttl_seconds,
        owner=request.owner,
        request_id=request.request_id,
        principal=caller().id,
        tenant=authz.check_tenant(caller(), request.tenant),
        max_runtime_s=request.max_runtime_seconds,
        priority_class=request.priority_class,
        preemptible=request.preemptible,
        nodes=request.nodes,
        same_label=request.same_label,
    )


def _preemption_pb(n: Notice) -> tpb.Preemption:
    return tpb.Preemption(by=n.by, cause=n.cause, deadline_unix_ms=n.deadline_ms, reason=n.reason)


def _quota_pb(tenant: str, q: Quota) -> pb.Quota:
    out = pb.Quota(tenant=tenant, models=dict(q.models), borrow=q.borrow, max_lifetime_seconds=q.max_lifetime_s,
                   weight=q.weight)  # fmt: skip
    if q.gpus is not None:
        out.gpus = q.gpus
    if q.cpus is not None:
        out.cpus = q.cpus
    if q.memory_bytes is not None:
        out.memory_bytes = q.memory_bytes
    return out


def _quota_from_pb(q: pb.Quota) -> Quota:
    return Quota(
        gpus=q.gpus if q.HasField("gpus") else None, models=dict(q.models), cpus=q.cpus if q.HasField("cpus") else None,
        memory_bytes=q.memory_bytes if q.HasField("memory_bytes") else None, borrow=q.borrow,
        max_lifetime_s=q.max_lifetime_seconds, weight=q.weight,
    )  # fmt: skip


def _tenant_pb(t: TenantStatus) -> pb.TenantQuotaStatus:
    out = pb.TenantQuotaStatus(
        tenant=t.tenant, from_default=t.from_default, used_gpus=t.usage.gpus, used_models=dict(t.usage.models),
        used_cpus=t.usage.cpus, used_memory_bytes=t.usage.memory_bytes, borrowed_gpus=t.borrowed, pending=t.pending,
        fair_share_usage=t.fair_share_gpu_hours,
    )  # fmt: skip
    if t.quota is not None:
        out.quota.CopyFrom(_quota_pb(t.tenant, t.quota))
    return out


def _reservation_pb(r: Reservation, now_ms: int) -> pb.Reservation:
    return pb.Reservation(name=r.name, tenant=r.tenant, gpus=r.total, nodes=dict(r.gpus), gpu_model=r.model,
                          start_unix_ms=r.start_ms, end_unix_ms=r.end_ms, created_unix_ms=r.created_ms,
                          created_by=r.by, active=r.active(now_ms))  # fmt: skip


def _now_ms() -> int:
    return int(time.time() * 1000)


def _class_pb(c: PriorityClass) -> pb.PriorityClass:
    return pb.PriorityClass(name=c.name, value=c.value, is_default=c.is_default, preemption_grace_seconds=c.grace_s,
                            min_runtime_seconds=c.min_runtime_s)  # fmt: skip


def _pending_pb(s: Status) -> pb.PendingStatus:
    e = s.entry
    return pb.PendingStatus(
        id=e.id, request_id=e.request_id.rpartition("/")[2], tenant=e.tenant, principal=e.principal,
        priority_class=e.priority_class, priority=e.priority, gpus=e.req.gpus, gpu_model=e.req.gpu_model,
        position=s.position, pool=e.pool, reason=s.reason, queued_unix_ms=e.created_ms,
        wait_until_unix_ms=e.wait_until_ms, estimated_start_unix_ms=s.estimated_start_ms,
        max_runtime_seconds=e.max_runtime_s,
    )  # fmt: skip


def _token_pb(r: TokenRecord) -> pb.TokenInfo:
    return pb.TokenInfo(name=r.name, role=r.role.value, tenant=r.tenant, created_unix_ms=r.created_ms,
                        expires_unix_ms=r.expires_ms, created_by=r.created_by)  # fmt: skip


class CoordinatorServicer(pb_grpc.CoordinatorServiceServicer):
    """Users: allocations, containers on them, and the cluster's state."""

    SERVICE = "gpulease.v1.CoordinatorService"

    def __init__(
        self, allocations: AllocationService, nodes: NodeService, view: ClusterView, containers: ContainerForwarder,
        guard: Guard, endings: Endings, audit: AuditLog, queue: WaitingQueue, policies: Policies,
        preemptions: Preemptions | None = None,
    ) -> None:  # fmt: skip
        self._preemptions = preemptions
        self._queue = queue
        self._policies = policies
        self._allocs = allocations
        self._nodes = nodes
        self._view = view
        self._containers = containers
        self._guard = guard
        self._endings = endings
        self._audit = audit

    def _alloc_pb(self, a: Allocation) -> tpb.Allocation:
        out = _alloc_pb(self._view, a)
        notice = self._preemptions.notice(a.id) if self._preemptions else None
        if notice is not None:  # the victim's record says so (GetAllocation, ListAllocations)
            out.preemption.CopyFrom(_preemption_pb(notice))
        return out

    async def _check_owner(self, allocation_id: str) -> None:
        """The caller owns the allocation (live, or ended with containers kept) or is an admin."""
        who = caller()
        if who.is_admin():
            return
        if not allocation_id:
            raise InvalidRequest("allocation_id is required")
        alloc = self._view.allocation(allocation_id)
        if alloc is not None:
            authz.check_owner(who, alloc.principal, f"allocation {allocation_id}")
            return
        home = self._endings.home(allocation_id)
        if home is not None:
            authz.check_owner(who, home.principal, f"allocation {allocation_id}")
            return
        alloc = await self._allocs.get(allocation_id)  # linearizable: the view may lag a fresh one
        authz.check_owner(who, alloc.principal, f"allocation {allocation_id}")

    @rpc
    async def Allocate(self, request: pb.AllocateRequest, context: Ctx) -> pb.AllocateResponse:
        if request.wait_seconds:
            raise InvalidRequest("wait_seconds is for WaitAllocate (gpuctl allocate --wait, client allocate(wait=))")
        alloc, reused = await self._allocs.allocate(_allocate_input(request))
        return pb.AllocateResponse(allocation=self._alloc_pb(alloc), reused=reused)

    @rpc
    async def WaitAllocate(self, request: pb.AllocateRequest, context: Ctx) -> None:  # type: ignore[override]
        # A coroutine writing to the stream (not an async generator) so the error catalog applies.
        async for item in self._queue.wait(_allocate_input(request), request.wait_seconds):
            if isinstance(item, Status):
                await context.write(pb.AllocateProgress(pending=_pending_pb(item)))
            else:
                alloc, reused = item
                answer = pb.AllocateResponse(allocation=self._alloc_pb(alloc), reused=reused)
                await context.write(pb.AllocateProgress(allocated=answer))

    @rpc
    async def ListPending(self, request: pb.ListPendingRequest, context: Ctx) -> pb.ListPendingResponse:
        who = caller()
        # A user sees its own tenant's requests; viewers and admins, everyone's.
        mine = who.role is Role.USER
        return pb.ListPendingResponse(pending=[_pending_pb(s) for s in self._queue.statuses()
                                               if not mine or s.entry.tenant == who.tenant])  # fmt: skip

    @rpc
    async def Release(self, request: pb.ReleaseRequest, context: Ctx) -> pb.ReleaseResponse:
        revision = await self._allocs.release(request.allocation_id, caller(), request.release_id)
        return pb.ReleaseResponse(released=revision > 0, revision=revision)

    @rpc
    async def CancelRequest(self, request: pb.CancelRequestRequest, context: Ctx) -> pb.CancelRequestResponse:
        released, revision = await self._allocs.cancel(request.request_id, request.ttl_seconds, caller())
        return pb.CancelRequestResponse(released_allocation_id=released, revision=revision)

    @rpc
    async def KeepAlive(self, request: pb.KeepAliveRequest, context: Ctx) -> pb.KeepAliveResponse:
        ttl = await self._allocs.keep_alive(request.allocation_id, caller())
        answer = pb.KeepAliveResponse(ttl_seconds=ttl)
        notice = self._preemptions.notice(request.allocation_id) if self._preemptions else None
        if notice is not None:  # still renewed until the deadline; the holder is told to wind down
            answer.preemption.CopyFrom(_preemption_pb(notice))
        return answer

    @rpc
    async def GetAllocation(self, request: pb.GetAllocationRequest, context: Ctx) -> pb.GetAllocationResponse:
        alloc = await self._allocs.get(request.allocation_id, caller())
        return pb.GetAllocationResponse(allocation=self._alloc_pb(alloc))

    @rpc
    async def ListAllocations(self, request: pb.ListAllocationsRequest, context: Ctx) -> pb.ListAllocationsResponse:
        allocs = await self._allocs.list(node=request.node, owner=request.owner)
        return pb.ListAllocationsResponse(allocations=[self._alloc_pb(a) for a in allocs])

    @rpc
    async def ListNodes(self, request: pb.ListNodesRequest, context: Ctx) -> pb.ListNodesResponse:
        seen = self._nodes.telemetry
        return pb.ListNodesResponse(nodes=[convert.node(v, seen.of(v.name, v.up)) for v in self._nodes.nodes()])

    @rpc
    async def GetClusterSummary(
        self, request: pb.GetClusterSummaryRequest, context: Ctx
    ) -> pb.GetClusterSummaryResponse:
        return convert.cluster_summary(self._nodes.nodes(), self._view.revision)

    @rpc
    async def WhoAmI(self, request: pb.WhoAmIRequest, context: Ctx) -> pb.WhoAmIResponse:
        who = caller()
        return pb.WhoAmIResponse(principal=who.id, role=who.role.value if who.role else "", tenant=who.tenant,
                                 method=auth_method())  # fmt: skip

    @rpc
    async def ListQuotas(self, request: pb.ListQuotasRequest, context: Ctx) -> pb.ListQuotasResponse:
        who = caller()
        pending: dict[str, int] = {}
        for e in self._queue.pending():
            pending[e.tenant] = pending.get(e.tenant, 0) + 1
        statuses = self._policies.statuses(pending, self._queue.fair_usage())
        # A user sees its own tenant (and the default quota); viewers and admins, every tenant.
        mine = who.role is Role.USER
        return pb.ListQuotasResponse(tenants=[_tenant_pb(t) for t in statuses
                                              if not mine or t.tenant in (who.tenant, "*")])  # fmt: skip

    @rpc
    async def ListPriorityClasses(
        self, request: pb.ListPriorityClassesRequest, context: Ctx
    ) -> pb.ListPriorityClassesResponse:
        classes = sorted(self._allocs.classes().by_name.values(), key=lambda c: (-c.value, c.name))
        return pb.ListPriorityClassesResponse(classes=[_class_pb(c) for c in classes])

    @rpc
    async def ListReservations(self, request: pb.ListReservationsRequest, context: Ctx) -> pb.ListReservationsResponse:
        now = _now_ms()
        found = self._policies.reservations()
        return pb.ListReservationsResponse(reservations=[_reservation_pb(r, now) for r in found])

    @rpc
    async def WatchEvents(self, request: pb.WatchEventsRequest, context: Ctx) -> None:  # type: ignore[override]
        # A coroutine writing to the stream (not an async generator) so the error catalog applies.
        who = caller()
        mine = who.role is Role.USER  # as ListPending: a user sees its own tenant (and node events)
        self._view.ensure_synced()
        types = convert.event_types(request.types)
        async for ev in self._view.events.subscribe(request.since_revision, types, follow=request.follow):
            if mine and ev.tenant and ev.tenant != who.tenant:
                continue
            await context.write(convert.event(ev))

    # --- containers, forwarded to the allocation's agent ------------------------------------

    @rpc
    async def RunContainer(self, request: pb.RunContainerRequest, context: Ctx) -> tpb.ContainerStatus:
        alloc = await self._allocs.get(request.allocation_id, caller())  # the owner's, and live
        # A gang's member to run on ("" = the first); the agent gets the allocation as seen there.
        node = request.node or alloc.members[0].node
        if node not in alloc.nodes:
            raise InvalidRequest(f"node {node!r} is not a member of allocation {alloc.id} (its nodes: "
                                 f"{', '.join(alloc.nodes)}); run its containers on those")  # fmt: skip
        self._containers.check_spec(request.spec, alloc.tenant)  # the container policy, before anything is sent
        await self._endings.note_containers(alloc)
        status = await self._containers.run(alloc.on(node), request.spec)  # no second read: this one is current
        detail = f"container={status.container_id} image={request.spec.image}"
        await self._audit.record(caller(), "container-start", alloc.id,
                                 detail=detail + (f" node={node}" if alloc.is_gang else ""))  # fmt: skip
        return status

    @rpc
    async def WaitContainer(self, request: tpb.WaitContainerRequest, context: Ctx) -> tpb.ContainerStatus:
        await self._check_owner(request.ref.allocation_id)
        return await self._containers.wait(request)

    @rpc
    async def StopContainer(self, request: tpb.StopContainerRequest, context: Ctx) -> tpb.ContainerStatus:
        await self._check_owner(request.ref.allocation_id)
        status = await self._containers.stop(request)
        await self._audit.record(caller(), "container-stop", request.ref.allocation_id,
                                 detail=f"container={status.container_id}")  # fmt: skip
        return status

    @rpc
    async def ListContainers(self, request: tpb.ListContainersRequest, context: Ctx) -> tpb.ListContainersResponse:
        await self._check_owner(request.allocation_id)
        return await self._containers.list(request.allocation_id)

    @rpc
    async def StreamLogs(self, request: tpb.StreamLogsRequest, context: Ctx) -> None:  # type: ignore[override]
        # A coroutine writing to the stream (not an async generator) so the error catalog applies.
        await self._check_owner(request.ref.allocation_id)
        async for chunk in self._containers.logs(request):
            await context.write(chunk)


class NodeServicer(pb_grpc.NodeServiceServicer):
    """Agents: registration, heartbeats, and the allocations that run on their node. An agent's
    certificate names its node, and every call here is about that node only (NodeRestriction)."""

    SERVICE = "gpulease.v1.NodeService"

    def __init__(
        self, allocations: AllocationService, nodes: NodeService, view: ClusterView, guard: Guard,
        containers: ContainerForwarder | None = None,
    ) -> None:  # fmt: skip
        self._allocs = allocations
        self._nodes = nodes
        self._view = view
        self._guard = guard
        self._containers = containers

    @rpc
    async def RegisterNode(self, request: pb.RegisterNodeRequest, context: Ctx) -> pb.RegisterNodeResponse:
        authz.check_node(caller(), request.node)
        reg = await self._nodes.register(convert.node_info(request.node, request.address, request.inventory))
        return pb.RegisterNodeResponse(
            lease_id=reg.lease_id,
            heartbeat_interval_seconds=reg.heartbeat_interval,
            node_ttl_seconds=reg.node_ttl,
            allocations_revision=reg.allocations_revision,
        )

    @rpc
    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Ctx) -> pb.HeartbeatResponse:
        authz.check_node(caller(), request.node)
        info = (
            convert.node_info(request.node, request.address, request.inventory)
            if request.HasField("inventory")
            else None
        )
        reg = await self._nodes.heartbeat(request.node, request.lease_id, info, telemetry.samples(request.telemetry),
                                          request.exits, request.enforced_revision)  # fmt: skip
        return pb.HeartbeatResponse(lease_id=reg.lease_id, heartbeat_interval_seconds=reg.heartbeat_interval,
                                    allocations_revision=reg.allocations_revision)  # fmt: skip

    @rpc
    async def ListNodeAllocations(self, request: pb.ListAllocationsRequest, context: Ctx) -> pb.ListAllocationsResponse:
        if not request.node:
            raise InvalidRequest("ListNodeAllocations needs the node whose allocations to list")
        authz.check_node(caller(), request.node)
        allocs = await self._allocs.list(node=request.node, owner=request.owner)
        return pb.ListAllocationsResponse(allocations=[_alloc_pb(self._view, a) for a in allocs])

    @rpc
    async def GetNodeAllocation(self, request: pb.GetAllocationRequest, context: Ctx) -> pb.GetAllocationResponse:
        # Another node's: PERMISSION_DENIED; a gang's: as seen on the agent's own member node.
        alloc = await self._allocs.get(request.allocation_id, caller())
        if alloc.is_gang and caller().node is None and self._containers is not None:
            # Clear text: no identity names the agent's node. It asks while this replica forwards a
            # start to it (agents ask only to fence a start), so that member is the one.
            node = self._containers.starting_on(alloc.id)
            alloc = alloc.on(node) if node else alloc
        return pb.GetAllocationResponse(allocation=_alloc_pb(self._view, alloc))


class AdminServicer(pb_grpc.AdminServiceServicer):
    """Operators and the benchmark."""

    SERVICE = "gpulease.v1.AdminService"

    def __init__(
        self, allocations: AllocationService, nodes: NodeService, view: ClusterView, guard: Guard, tokens: Tokens,
        audit: AuditLog, policies: Policies,
    ) -> None:  # fmt: skip
        self._policies = policies
        self._allocs = allocations
        self._nodes = nodes
        self._view = view
        self._guard = guard
        self._tokens = tokens
        self._audit = audit

    @rpc
    async def CordonNode(self, request: pb.CordonNodeRequest, context: Ctx) -> pb.CordonNodeResponse:
        view = await self._nodes.cordon(request.node, request.cordoned, caller())
        return pb.CordonNodeResponse(node=convert.node(view))

    @rpc
    async def DeleteNode(self, request: pb.DeleteNodeRequest, context: Ctx) -> pb.DeleteNodeResponse:
        return pb.DeleteNodeResponse(revision=await self._nodes.delete(request.node, caller()))

    @rpc
    async def CreateToken(self, request: pb.CreateTokenRequest, context: Ctx) -> pb.CreateTokenResponse:
        secret, record = await self._tokens.create(caller(), request.name, request.role, request.tenant,
                                                   request.ttl_seconds)  # fmt: skip
        return pb.CreateTokenResponse(token=secret, info=_token_pb(record))

    @rpc
    async def ListTokens(self, request: pb.ListTokensRequest, context: Ctx) -> pb.ListTokensResponse:
        return pb.ListTokensResponse(tokens=[_token_pb(r) for r in self._tokens.list()])

    @rpc
    async def RevokeToken(self, request: pb.RevokeTokenRequest, context: Ctx) -> pb.RevokeTokenResponse:
        await self._tokens.revoke(caller(), request.name)
        return pb.RevokeTokenResponse(revoked=True)

    @rpc
    async def ReadAudit(self, request: pb.ReadAuditRequest, context: Ctx) -> pb.ReadAuditResponse:
        if not 0 <= request.limit <= 100_000:
            raise InvalidRequest("limit must be 0 (1000) to 100000")
        entries = await self._audit.read(request.since_unix_ms, request.actor, request.limit or 1000)
        return pb.ReadAuditResponse(entries=[pb.AuditEntry(**e.__dict__) for e in entries])

    @rpc
    async def SetQuota(self, request: pb.SetQuotaRequest, context: Ctx) -> pb.SetQuotaResponse:
        tenant = request.quota.tenant
        q = await self._policies.set_quota(caller(), tenant, _quota_from_pb(request.quota))
        return pb.SetQuotaResponse(quota=_quota_pb(tenant, q))

    @rpc
    async def DeleteQuota(self, request: pb.DeleteQuotaRequest, context: Ctx) -> pb.DeleteQuotaResponse:
        return pb.DeleteQuotaResponse(deleted=await self._policies.delete_quota(caller(), request.tenant))

    @rpc
    async def SetPriorityClass(self, request: pb.SetPriorityClassRequest, context: Ctx) -> pb.SetPriorityClassResponse:
        c = request.priority_class
        stored = await self._policies.set_class(caller(), PriorityClass(
            c.name, c.value, c.is_default, c.preemption_grace_seconds, c.min_runtime_seconds))  # fmt: skip
        return pb.SetPriorityClassResponse(priority_class=_class_pb(stored))

    @rpc
    async def DeletePriorityClass(
        self, request: pb.DeletePriorityClassRequest, context: Ctx
    ) -> pb.DeletePriorityClassResponse:
        return pb.DeletePriorityClassResponse(deleted=await self._policies.delete_class(caller(), request.name))

    @rpc
    async def CreateReservation(
        self, request: pb.CreateReservationRequest, context: Ctx
    ) -> pb.CreateReservationResponse:
        r = await self._policies.create_reservation(
            caller(), request.name, request.tenant, request.gpus, list(request.nodes), request.gpu_model,
            request.start_unix_ms, request.end_unix_ms,
        )  # fmt: skip
        return pb.CreateReservationResponse(reservation=_reservation_pb(r, _now_ms()))

    @rpc
    async def DeleteReservation(
        self, request: pb.DeleteReservationRequest, context: Ctx
    ) -> pb.DeleteReservationResponse:
        return pb.DeleteReservationResponse(deleted=await self._policies.delete_reservation(caller(), request.name))

    @rpc
    async def GetStats(self, request: pb.GetStatsRequest, context: Ctx) -> pb.GetStatsResponse:
        b = self._allocs.batcher
        return pb.GetStatsResponse(
            allocations_committed=b.committed,
            commits=b.commits,
            rejected_commits=b.rejections,
            view_revision=self._view.revision,
            nodes=len(self._view.nodes()),
        )
