"""Protobuf messages -> client models. The only place that knows both shapes."""

from __future__ import annotations

from gpulease.client.models import (
    EVENT_TYPES,
    AllocatedGpu,
    AllocationInfo,
    AllocationMember,
    AuditEntry,
    ClusterSummary,
    Container,
    Event,
    Gpu,
    Node,
    NodeSummary,
    PendingInfo,
    PriorityClassInfo,
    Quota,
    QuotaInfo,
    ReservationInfo,
    TokenInfo,
    WhoAmI,
)
from gpulease.v1 import coordinator_pb2, types_pb2
from gpulease.v1 import types_pb2 as tpb

_STATE_NAMES: dict[int, str] = {
    types_pb2.NODE_STATE_UP: "up",
    types_pb2.NODE_STATE_DOWN: "down",
    types_pb2.NODE_STATE_CORDONED: "cordoned",
}


def state_name(state: int) -> str:
    return _STATE_NAMES.get(state, "unknown")


def allocation(msg: types_pb2.Allocation) -> AllocationInfo:
    return AllocationInfo(
        id=msg.id,
        node=msg.node,
        gpus=tuple(AllocatedGpu(index=g.index, uuid=g.uuid, model=g.model) for g in msg.gpus),
        cpus=msg.cpus,
        memory_bytes=msg.memory_bytes,
        ttl_seconds=msg.ttl_seconds,
        revision=msg.revision,
        owner=msg.owner,
        request_id=msg.request_id,
        created_unix_ms=msg.created_unix_ms,
        node_address=msg.node_address,
        principal=msg.principal,
        tenant=msg.tenant,
        preemptible=msg.preemptible,
        priority_class=msg.priority_class,
        max_runtime_seconds=msg.max_runtime_seconds,
        members=tuple(
            AllocationMember(
                m.node,
                tuple(AllocatedGpu(index=g.index, uuid=g.uuid, model=g.model) for g in m.gpus),
                m.cpus,
                m.memory_bytes,
                m.node_address,
            )
            for m in msg.members
        ),
    )


def pending(msg: coordinator_pb2.PendingStatus) -> PendingInfo:
    return PendingInfo(
        id=msg.id, request_id=msg.request_id, tenant=msg.tenant, principal=msg.principal,
        priority_class=msg.priority_class, priority=msg.priority, gpus=msg.gpus, gpu_model=msg.gpu_model,
        position=msg.position, pool=msg.pool, reason=msg.reason, queued_unix_ms=msg.queued_unix_ms,
        wait_until_unix_ms=msg.wait_until_unix_ms, estimated_start_unix_ms=msg.estimated_start_unix_ms,
        max_runtime_seconds=msg.max_runtime_seconds,
    )  # fmt: skip


def node(msg: types_pb2.Node) -> Node:
    inv = msg.inventory
    return Node(
        name=msg.name,
        state=state_name(msg.state),
        address=msg.address,
        gpus=tuple(
            Gpu(
                index=g.index,
                uuid=g.uuid,
                model=g.model,
                memory_total_bytes=g.memory_total_bytes,
                healthy=g.healthy,
                simulated=g.simulated,
                health_detail=g.health_detail,
                foreign_processes=g.foreign_processes,
                foreign_detail=g.foreign_detail,
                utilization_percent=g.utilization_percent if g.HasField("utilization_percent") else None,
                memory_used_bytes=g.memory_used_bytes if g.HasField("memory_used_bytes") else None,
                temperature_c=g.temperature_c if g.HasField("temperature_c") else None,
                power_draw_mw=g.power_draw_mw if g.HasField("power_draw_mw") else None,
            )
            for g in inv.gpus
        ),
        cpus_total=inv.cpus_total,
        memory_total_bytes=inv.memory_total_bytes,
        labels=dict(inv.labels),
        hostname=inv.hostname,
        cordoned=msg.cordoned,
        allocated_gpu_indexes=tuple(msg.allocated_gpu_indexes),
        cpus_allocated=msg.cpus_allocated,
        memory_allocated_bytes=msg.memory_allocated_bytes,
    )


def node_summary(msg: coordinator_pb2.NodeSummary) -> NodeSummary:
    return NodeSummary(
        name=msg.name,
        state=state_name(msg.state) if msg.name else "",
        gpus_total=msg.gpus_total,
        gpus_free=msg.gpus_free,
        cpus_total=msg.cpus_total,
        cpus_free=msg.cpus_free,
        memory_total_bytes=msg.memory_total_bytes,
        memory_free_bytes=msg.memory_free_bytes,
    )


def cluster_summary(msg: coordinator_pb2.GetClusterSummaryResponse) -> ClusterSummary:
    return ClusterSummary(
        nodes=tuple(node_summary(n) for n in msg.nodes),
        totals=node_summary(msg.totals),
        revision=msg.revision,
    )


_CONTAINER_STATES = {
    tpb.CONTAINER_STATE_CREATED: "created",
    tpb.CONTAINER_STATE_RUNNING: "running",
    tpb.CONTAINER_STATE_EXITED: "exited",
}


def container(c: tpb.ContainerStatus) -> Container:
    return Container(
        id=c.container_id,
        allocation_id=c.allocation_id,
        revision=c.revision,
        state=_CONTAINER_STATES.get(c.state, "unknown"),
        exit_code=c.exit_code if c.HasField("exit_code") else None,
        image=c.image,
        name=c.name,
        node=c.node,
        gpu_indexes=tuple(c.gpu_indexes),
        error=c.error,
        started_unix_ms=c.started_unix_ms,
        finished_unix_ms=c.finished_unix_ms,
        restart_count=c.restart_count,
    )


def whoami(msg: coordinator_pb2.WhoAmIResponse) -> WhoAmI:
    return WhoAmI(principal=msg.principal, role=msg.role, tenant=msg.tenant, method=msg.method)


def token_info(msg: coordinator_pb2.TokenInfo) -> TokenInfo:
    return TokenInfo(
        name=msg.name,
        role=msg.role,
        tenant=msg.tenant,
        created_unix_ms=msg.created_unix_ms,
        expires_unix_ms=msg.expires_unix_ms,
        created_by=msg.created_by,
    )


def audit_entry(msg: coordinator_pb2.AuditEntry) -> AuditEntry:
    return AuditEntry(
        time_unix_ms=msg.time_unix_ms,
        actor=msg.actor,
        tenant=msg.tenant,
        action=msg.action,
        target=msg.target,
        outcome=msg.outcome,
        revision=msg.revision,
        detail=msg.detail,
    )


def quota(msg: coordinator_pb2.Quota) -> Quota:
    return Quota(
        tenant=msg.tenant,
        gpus=msg.gpus if msg.HasField("gpus") else None,
        models=dict(msg.models),
        cpus=msg.cpus if msg.HasField("cpus") else None,
        memory_bytes=msg.memory_bytes if msg.HasField("memory_bytes") else None,
        borrow=msg.borrow,
        max_lifetime_seconds=msg.max_lifetime_seconds,
        weight=msg.weight,
    )


def quota_info(msg: coordinator_pb2.TenantQuotaStatus) -> QuotaInfo:
    return QuotaInfo(
        tenant=msg.tenant,
        quota=quota(msg.quota) if msg.HasField("quota") else None,
        from_default=msg.from_default,
        used_gpus=msg.used_gpus,
        used_models=dict(msg.used_models),
        used_cpus=msg.used_cpus,
        used_memory_bytes=msg.used_memory_bytes,
        borrowed_gpus=msg.borrowed_gpus,
        pending=msg.pending,
        fair_share_gpu_hours=msg.fair_share_usage,
    )


def priority_class(msg: coordinator_pb2.PriorityClass) -> PriorityClassInfo:
    return PriorityClassInfo(
        name=msg.name,
        value=msg.value,
        is_default=msg.is_default,
        preemption_grace_seconds=msg.preemption_grace_seconds,
        min_runtime_seconds=msg.min_runtime_seconds,
    )


def reservation(msg: coordinator_pb2.Reservation) -> ReservationInfo:
    return ReservationInfo(
        name=msg.name,
        tenant=msg.tenant,
        gpus=msg.gpus,
        nodes=dict(msg.nodes),
        gpu_model=msg.gpu_model,
        start_unix_ms=msg.start_unix_ms,
        end_unix_ms=msg.end_unix_ms,
        created_unix_ms=msg.created_unix_ms,
        created_by=msg.created_by,
        active=msg.active,
    )


def event(msg: coordinator_pb2.ClusterEvent) -> Event:
    name = coordinator_pb2.EventType.Name(msg.type) if msg.type in coordinator_pb2.EventType.values() else ""
    return Event(
        type=name.removeprefix("EVENT_TYPE_").lower() or str(msg.type), revision=msg.revision,
        time_unix_ms=msg.time_unix_ms, allocation_id=msg.allocation_id, node=msg.node, tenant=msg.tenant,
        principal=msg.principal, gpus=tuple(msg.gpus), detail=msg.detail,
    )  # fmt: skip


def event_type(name: str) -> coordinator_pb2.EventType.ValueType:
    """ "expired" -> EVENT_TYPE_EXPIRED's number; ValueError naming the known types otherwise."""
    key = name.strip().lower().replace("-", "_")
    if key not in EVENT_TYPES:
        raise ValueError(f"unknown event type {name!r}; known: {', '.join(EVENT_TYPES)}")
    return coordinator_pb2.EventType.Value("EVENT_TYPE_" + key.upper())
