"""What the client returns: plain frozen values, so callers never handle protobuf messages.

``AllocationInfo`` is the allocation record; the handles that ``Client.allocate`` and
``AsyncClient.allocate`` return (``Allocation``, ``AsyncAllocation``) hold one (``alloc.info``, its
fields also read as ``alloc.id`` etc.) and a session bound to their client.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AllocatedGpu:
    index: int
    uuid: str
    model: str


@dataclass(frozen=True)
class AllocationMember:
    """What an allocation holds on one node (a gang has one member per node)."""

    node: str
    gpus: tuple[AllocatedGpu, ...]
    cpus: int
    memory_bytes: int
    # host:port of the node's agent.
    node_address: str


@dataclass(frozen=True)
class AllocationInfo:
    """An allocation as the coordinator reported it."""

    id: str
    node: str
    gpus: tuple[AllocatedGpu, ...]
    cpus: int
    memory_bytes: int
    ttl_seconds: int
    # etcd revision that created the allocation: the fencing token agents check.
    revision: int
    owner: str
    request_id: str
    created_unix_ms: int
    # host:port of the node's agent.
    node_address: str
    # Who made it, as the coordinator identified the caller ("user:alice"): who may use it. `owner`
    # is a free-text description and decides nothing.
    principal: str = ""
    # The tenant its resources count against.
    tenant: str = ""
    # May be preempted by a pending request of a higher priority class (or reclaimed by a tenant
    # below its nominal quota when this one borrows).
    preemptible: bool = False
    priority_class: str = ""
    # Declared runtime: the lease is not renewed past it (0 = none).
    max_runtime_seconds: int = 0
    # Every node it holds something on, the first member first (node, gpus, cpus, memory_bytes
    # and node_address above are the first member's); one for a one-node allocation.
    members: tuple[AllocationMember, ...] = ()

    @property
    def gpu_indexes(self) -> tuple[int, ...]:
        return tuple(g.index for g in self.gpus)

    @property
    def is_gang(self) -> bool:
        return len(self.members) > 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "node": self.node,
            "gpus": [{"index": g.index, "uuid": g.uuid, "model": g.model} for g in self.gpus],
            "cpus": self.cpus,
            "memory_bytes": self.memory_bytes,
            "ttl_seconds": self.ttl_seconds,
            "revision": self.revision,
            "owner": self.owner,
            "request_id": self.request_id,
            "created_unix_ms": self.created_unix_ms,
            "node_address": self.node_address,
            "principal": self.principal,
            "tenant": self.tenant,
            "preemptible": self.preemptible,
            "priority_class": self.priority_class,
            "max_runtime_seconds": self.max_runtime_seconds,
            "members": [
                {
                    "node": m.node,
                    "gpus": [{"index": g.index, "uuid": g.uuid, "model": g.model} for g in m.gpus],
                    "cpus": m.cpus,
                    "memory_bytes": m.memory_bytes,
                    "node_address": m.node_address,
                }
                for m in self.members
            ],
        }


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    model: str
    memory_total_bytes: int
    healthy: bool
    # Made up by an agent started with --simulate-gpus; never true on real hardware.
    simulated: bool
    health_detail: str
    # Something gpulease did not start uses this GPU (a process, or memory while unallocated).
    foreign_processes: bool = False
    foreign_detail: str = ""
    # Telemetry from the node's last heartbeat to the coordinator answering (kept in its memory);
    # None = unknown (simulated GPUs, a down node, a node heartbeating another replica).
    utilization_percent: int | None = None
    memory_used_bytes: int | None = None
    temperature_c: int | None = None
    power_draw_mw: int | None = None


@dataclass(frozen=True)
class Node:
    name: str
    # "up", "down", "cordoned" (or "unknown" if the coordinator sent no state).
    state: str
    address: str
    gpus: tuple[Gpu, ...]
    cpus_total: int
    memory_total_bytes: int
    labels: dict[str, str]
    hostname: str
    cordoned: bool
    allocated_gpu_indexes: tuple[int, ...]
    cpus_allocated: int
    memory_allocated_bytes: int


@dataclass(frozen=True)
class NodeSummary:
    name: str
    state: str
    gpus_total: int
    gpus_free: int
    cpus_total: int
    cpus_free: int
    memory_total_bytes: int
    memory_free_bytes: int


@dataclass(frozen=True)
class ClusterSummary:
    nodes: tuple[NodeSummary, ...]
    # Sum over nodes that are up; name and state are empty.
    totals: NodeSummary
    revision: int


@dataclass(frozen=True)
class Container:
    """A container gpulease runs on an allocation's GPUs."""

    id: str
    allocation_id: str
    revision: int
    state: str  # "created", "running" or "exited"
    exit_code: int | None
    image: str
    name: str
    node: str
    gpu_indexes: tuple[int, ...]
    error: str = ""
    started_unix_ms: int = 0
    finished_unix_ms: int = 0
    restart_count: int = 0

    @property
    def exited(self) -> bool:
        return self.state == "exited"


EVENT_TYPES = (
    "allocated", "released", "expired", "preempted", "queued", "node_up", "node_down", "node_cordoned",
    "node_uncordoned", "gpu_unhealthy", "gpu_healthy", "container_started", "container_stopped",
    "container_exited", "history_gap", "resync", "overflow",
)  # fmt: skip


@dataclass(frozen=True)
class Event:
    """One cluster change from the coordinator's event stream (WatchEvents). ``type`` is one of
    EVENT_TYPES; ``revision`` is etcd's (resume with since=revision). The markers: "history_gap"
    (the replica's buffer starts after the requested revision), "resync" (changes up to this
    revision are missing: the coordinator reloaded), "overflow" (this reader fell behind and the
    stream ends: resume with since=revision)."""

    type: str
    revision: int
    time_unix_ms: int
    allocation_id: str = ""
    node: str = ""
    tenant: str = ""
    principal: str = ""
    gpus: tuple[str, ...] = ()
    detail: str = ""

    def to_dict(self) -> dict[str, object]:
        d = dict(self.__dict__)
        d["gpus"] = list(self.gpus)
        return d


@dataclass(frozen=True)
class LogChunk:
    stream: str  # "stdout" or "stderr"
    data: bytes


@dataclass(frozen=True)
class WhoAmI:
    """Who the coordinator takes the caller for."""

    # "user:alice", "agent:node-1", or "local:local" (a clear-text coordinator trusts every caller).
    principal: str
    # "admin", "user" or "viewer"; empty for agents and coordinators.
    role: str
    tenant: str
    # How the caller was identified: "certificate", "token" or "none" (clear text).
    method: str


@dataclass(frozen=True)
class TokenInfo:
    """A bearer token as the coordinator lists it: never its secret (only its hash is stored)."""

    name: str
    role: str
    tenant: str
    created_unix_ms: int
    # 0: never expires.
    expires_unix_ms: int
    # The principal that created it.
    created_by: str


@dataclass(frozen=True)
class AuditEntry:
    """One entry of the coordinator's audit log."""

    time_unix_ms: int
    # "user:alice", or "anonymous" (with the peer's address) for a refused unauthenticated call.
    actor: str
    tenant: str
    # allocate, release, force-release, expire, cordon, uncordon, node-delete, container-start,
    # container-stop, token-create, token-revoke, denied.
    action: str
    # What it acted on: an allocation id, a node, a token name, an RPC.
    target: str
    # "ok", or the refusal's reason.
    outcome: str
    # The etcd revision of the change (0 when it was not an etcd write).
    revision: int
    detail: str


@dataclass(frozen=True)
class PendingInfo:
    """A request waiting in the queue: its place and why it waits (WaitAllocate, ListPending)."""

    id: str
    request_id: str
    tenant: str
    principal: str
    priority_class: str
    priority: int
    gpus: int
    gpu_model: str
    # 1-based, among the pending requests of its pool (GPU model; "" = any model). 0: not placed yet.
    position: int
    pool: str
    reason: str
    queued_unix_ms: int
    wait_until_unix_ms: int
    # From the declared runtimes of the allocations in its way; 0 = no estimate.
    estimated_start_unix_ms: int
    max_runtime_seconds: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Quota:
    """A tenant's quota as the coordinator stores it (``Client.set_quota``). None: unlimited.
    tenant "*" is the default quota, for tenants with none of their own."""

    tenant: str
    # Nominal GPUs overall, and per GPU model (the model's exact name).
    gpus: int | None = None
    models: dict[str, int] = field(default_factory=dict)
    # Hard caps (no borrowing).
    cpus: int | None = None
    memory_bytes: int | None = None
    # GPUs the tenant may use above its nominal quota, out of capacity others leave unused.
    borrow: int = 0
    # An allocation is not renewed past this age (0 = no limit).
    max_lifetime_seconds: int = 0
    # Fair-share weight (0 = the nominal GPUs, or 1 without them).
    weight: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "gpus": self.gpus,
            "models": dict(self.models),
            "cpus": self.cpus,
            "memory_bytes": self.memory_bytes,
            "borrow": self.borrow,
            "max_lifetime_seconds": self.max_lifetime_seconds,
            "weight": self.weight,
        }


@dataclass(frozen=True)
class QuotaInfo:
    """One tenant's quota and what it uses now (``Client.list_quotas``)."""

    tenant: str
    # The quota that applies (the tenant's own, or the default "*"); None when none applies.
    quota: Quota | None
    # True when ``quota`` is the default one ("*"), the tenant having none of its own.
    from_default: bool
    used_gpus: int
    used_models: dict[str, int]
    used_cpus: int
    used_memory_bytes: int
    # GPUs used above the nominal quota (reclaimable by preemption).
    borrowed_gpus: int
    # Its requests waiting in the queue.
    pending: int
    # Decayed GPU-hours: the fair-share order (lower usage per weight goes first).
    fair_share_gpu_hours: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "quota": self.quota.to_dict() if self.quota is not None else None,
            "from_default": self.from_default,
            "used_gpus": self.used_gpus,
            "used_models": dict(self.used_models),
            "used_cpus": self.used_cpus,
            "used_memory_bytes": self.used_memory_bytes,
            "borrowed_gpus": self.borrowed_gpus,
            "pending": self.pending,
            "fair_share_gpu_hours": self.fair_share_gpu_hours,
        }


@dataclass(frozen=True)
class PriorityClassInfo:
    """A priority class the coordinator knows (configured, or set with ``Client.set_priority_class``)."""

    name: str
    # Higher goes first in the queue, and may preempt lower preemptible work.
    value: int
    # The class of requests that name none.
    is_default: bool
    # How long a victim of this class runs between the preemption notice and revocation.
    preemption_grace_seconds: int
    # An allocation of this class is never preempted before it has run this long (0 = none).
    min_runtime_seconds: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ReservationInfo:
    """GPUs held for one tenant over a window (``Client.create_reservation``): other tenants are not
    placed on them meanwhile."""

    name: str
    tenant: str
    gpus: int
    # Node -> GPUs held there.
    nodes: dict[str, int]
    # "" = any model.
    gpu_model: str
    start_unix_ms: int
    end_unix_ms: int
    created_unix_ms: int
    created_by: str
    # In its window now (by the coordinator's clock).
    active: bool

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "nodes": dict(self.nodes)}


def gang_envs(info: AllocationInfo, env: Mapping[str, str] | None) -> list[tuple[str, dict[str, str]]]:
    """(member node, environment) per member of ``info``, first member first, for run_gang: ``env``
    plus RANK (the member's place), WORLD_SIZE, MASTER_ADDR (the first member's agent host) and
    GPULEASE_PEERS (every member's agent address, comma-separated, in rank order)."""
    members = info.members or (AllocationMember(info.node, info.gpus, info.cpus, info.memory_bytes, info.node_address),)
    peers = [m.node_address for m in members]
    host = peers[0].rpartition(":")[0].strip("[]") or peers[0]
    return [
        (
            m.node,
            {
                **(env or {}),
                "RANK": str(rank),
                "WORLD_SIZE": str(len(members)),
                "MASTER_ADDR": host,
                "GPULEASE_PEERS": ",".join(peers),
            },
        )
        for rank, m in enumerate(members)
    ]
