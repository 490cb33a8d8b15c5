"""proto <-> domain translation, in one place."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from gpulease.coordinator.domain import AllocatedGpu, Allocation, GpuInfo, NodeInfo, NodeState, NodeView
from gpulease.coordinator.events import ClusterEvent, EventType
from gpulease.coordinator.telemetry import GpuSample
from gpulease.v1 import coordinator_pb2 as cpb
from gpulease.v1 import types_pb2 as tpb

_STATE = {
    NodeState.UP: tpb.NODE_STATE_UP,
    NodeState.DOWN: tpb.NODE_STATE_DOWN,
    NodeState.CORDONED: tpb.NODE_STATE_CORDONED,
}


def node_info(name: str, address: str, inv: tpb.NodeInventory) -> NodeInfo:
    return NodeInfo(
        name=name,
        address=address,
        gpus=tuple(
            GpuInfo(
                index=g.index,
                uuid=g.uuid,
                model=g.model,
                memory_total_bytes=g.memory_total_bytes,
                healthy=g.healthy,
                simulated=g.simulated,
                health_detail=g.health_detail,
                foreign=g.foreign_processes,
                foreign_detail=g.foreign_detail,
                pci_bus_id=g.pci_bus_id,
                mig_mode=g.mig_mode,
                numa_node=g.numa_node if g.HasField("numa_node") else None,
                cpu_affinity=g.cpu_affinity,
                links=tuple((x.peer_index, x.nvlink_count, x.common_ancestor) for x in g.links),
            )
            for g in inv.gpus
        ),
        cpus_total=inv.cpus_total,
        memory_total_bytes=inv.memory_total_bytes,
        labels=dict(inv.labels),
        hostname=inv.hostname,
        reconciling=inv.reconciling,
        driver_version=inv.driver_version,
        cuda_version=inv.cuda_version,
        source=inv.source,
    )


def inventory(info: NodeInfo) -> tpb.NodeInventory:
    return tpb.NodeInventory(
        gpus=[
            tpb.Gpu(
                index=g.index,
                uuid=g.uuid,
                model=g.model,
                memory_total_bytes=g.memory_total_bytes,
                healthy=g.healthy,
                simulated=g.simulated,
                health_detail=g.health_detail,
                foreign_processes=g.foreign,
                foreign_detail=g.foreign_detail,
                pci_bus_id=g.pci_bus_id,
                mig_mode=g.mig_mode,
                numa_node=g.numa_node,
                cpu_affinity=g.cpu_affinity,
                links=[tpb.GpuLink(peer_index=p, nvlink_count=n, common_ancestor=a) for p, n, a in g.links],
            )
            for g in info.gpus
        ],
        cpus_total=info.cpus_total,
        memory_total_bytes=info.memory_total_bytes,
        labels=dict(info.labels),
        hostname=info.hostname,
        reconciling=info.reconciling,
        driver_version=info.driver_version,
        cuda_version=info.cuda_version,
        source=info.source,
    )


def node(v: NodeView, telemetry: Mapping[int, GpuSample] | None = None) -> tpb.Node:
    """``telemetry``: the node's latest heartbeat samples by GPU index (in memory, not in the record)."""
    inv = inventory(v.info)
    for g in inv.gpus:
        s = (telemetry or {}).get(g.index)
        if s is not None:
            for f in ("utilization_percent", "memory_used_bytes", "temperature_c", "power_draw_mw"):
                value = getattr(s, f)
                if value is not None:
                    setattr(g, f, value)
    return tpb.Node(
        name=v.name,
        state=_STATE[v.state],
        address=v.info.address,
        inventory=inv,
        cordoned=v.info.cordoned,
        allocated_gpu_indexes=sorted(v.gpus_held),
        cpus_allocated=v.cpus_used,
        memory_allocated_bytes=v.memory_used,
    )


def node_summary(v: NodeView) -> cpb.NodeSummary:
    schedulable = v.schedulable
    return cpb.NodeSummary(
        name=v.name,
        state=_STATE[v.state],
        gpus_total=len(v.info.gpus),
        gpus_free=len(v.free_gpus) if schedulable else 0,
        cpus_total=v.info.cpus_total,
        cpus_free=v.cpus_free if schedulable else 0,
        memory_total_bytes=v.info.memory_total_bytes,
        memory_free_bytes=v.memory_free if schedulable else 0,
    )


def _gpus(gpus: tuple[AllocatedGpu, ...]) -> list[tpb.AllocatedGpu]:
    return [tpb.AllocatedGpu(index=g.index, uuid=g.uuid, model=g.model) for g in gpus]


def allocation(a: Allocation, node_address: str = "", addresses: Mapping[str, str] | None = None) -> tpb.Allocation:
    """``addresses``: node -> agent address, for the members (node_address: a.node's)."""
    addresses = {**(addresses or {}), a.node: node_address} if node_address else (addresses or {})
    members = [tpb.AllocationMember(node=m.node, gpus=_gpus(m.gpus), cpus=m.cpus, memory_bytes=m.memory_bytes,
                                    node_address=addresses.get(m.node, "")) for m in a.members]  # fmt: skip
    return tpb.Allocation(
        id=a.id,
        node=a.node,
        gpus=_gpus(a.gpus),
        cpus=a.cpus,
        memory_bytes=a.memory_bytes,
        ttl_seconds=a.ttl_seconds,
        revision=a.revision,
        owner=a.owner,
        request_id=a.client_request_id,
        created_unix_ms=a.created_unix_ms,
        node_address=node_address,
        principal=a.principal,
        tenant=a.tenant,
        preemptible=a.preemptible,
        priority_class=a.priority_class,
        max_runtime_seconds=a.max_runtime_s,
        members=members,
    )


_SUMMED = ("gpus_total", "gpus_free", "cpus_total", "cpus_free", "memory_total_bytes", "memory_free_bytes")


def cluster_summary(views: list[NodeView], revision: int) -> cpb.GetClusterSummaryResponse:
    """One row per node and a TOTAL row summing them, at the view's revision."""
    rows = [node_summary(v) for v in views]
    totals = cpb.NodeSummary(name="TOTAL")
    for r in rows:
        for f in _SUMMED:
            setattr(totals, f, getattr(totals, f) + getattr(r, f))
    return cpb.GetClusterSummaryResponse(nodes=rows, totals=totals, revision=revision)


_EVENT_PB = {t: cpb.EventType.Value("EVENT_TYPE_" + t.name) for t in EventType}
_EVENT_OF = {int(v): t for t, v in _EVENT_PB.items()}


def event(ev: ClusterEvent) -> cpb.ClusterEvent:
    return cpb.ClusterEvent(
        type=_EVENT_PB[ev.type], revision=ev.revision, time_unix_ms=ev.time_ms, allocation_id=ev.allocation_id,
        node=ev.node, tenant=ev.tenant, principal=ev.principal, gpus=list(ev.gpus), detail=ev.detail,
    )  # fmt: skip


def event_types(types: Iterable[int]) -> frozenset[EventType]:
    """WatchEventsRequest.types -> the domain's (unknown numbers are ignored)."""
    return frozenset(_EVENT_OF[int(t)] for t in types if int(t) in _EVENT_OF)
