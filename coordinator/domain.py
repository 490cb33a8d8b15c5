"""Domain model: plain frozen values, no I/O, no gRPC, no etcd.

The store turns etcd keys into these; placement reads them; servicers translate them to proto.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from functools import cached_property

from gpulease.coordinator.quota import EMPTY_BOOK, QuotaBook, Usage


class NodeState(StrEnum):
    UP = "up"
    DOWN = "down"
    CORDONED = "cordoned"


@dataclass(frozen=True)
class GpuInfo:
    index: int
    uuid: str
    model: str
    memory_total_bytes: int
    healthy: bool = True
    simulated: bool = False
    health_detail: str = ""
    # In use by something gpulease did not start: not handed out until that stops.
    foreign: bool = False
    foreign_detail: str = ""
    # Static facts from NVML ("" / None when unknown). Telemetry (temperature, utilization, ...)
    # is deliberately not part of the record: it would rewrite etcd on every heartbeat.
    pci_bus_id: str = ""
    mig_mode: str = ""
    numa_node: int | None = None
    cpu_affinity: str = ""
    # (peer index, NVLink count, common-ancestor level)
    links: tuple[tuple[int, int, str], ...] = ()


@dataclass(frozen=True)
class NodeInfo:
    """A node's record as registered by its agent (the etcd key nodes/<name>)."""

    name: str
    address: str
    gpus: tuple[GpuInfo, ...]
    cpus_total: int
    memory_total_bytes: int
    labels: Mapping[str, str] = field(default_factory=dict)
    hostname: str = ""
    cordoned: bool = False
    # The agent restarted and is still adopting its containers: it offers no GPUs meanwhile.
    reconciling: bool = False
    driver_version: str = ""
    cuda_version: str = ""
    # "nvml", "simulated" or "none"
    source: str = ""


def gpu_free(gpu: GpuInfo, held: frozenset[int]) -> bool:
    """The one rule for a GPU that placement may hand out now, whatever the request: healthy
    (which includes having a UUID to claim it by), not in use by something gpulease did not start,
    and not held by a live allocation. Request filters (model, memory) come on top."""
    return gpu.healthy and not gpu.foreign and gpu.index not in held


@dataclass(frozen=True)
class NodeView:
    """A node as placement sees it: record + liveness + what live allocations hold."""

    info: NodeInfo
    up: bool
    # mod_revision of the node record; the allocation txn compares it so that a
    # re-registration or cordon between placement and commit forces a retry.
    record_revision: int
    gpus_held: frozenset[int] = frozenset()
    cpus_used: int = 0
    memory_used: int = 0

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def state(self) -> NodeState:
        if not self.up:
            return NodeState.DOWN
        return NodeState.CORDONED if self.info.cordoned else NodeState.UP

    @property
    def schedulable(self) -> bool:
        return self.state is NodeState.UP and not self.info.reconciling

    @property
    def usable_gpus(self) -> tuple[GpuInfo, ...]:
        return tuple(g for g in self.info.gpus if g.healthy)

    @cached_property
    def free_indexes(self) -> frozenset[int]:
        """Indexes of the GPUs `gpu_free` allows; computed once per view (views are rebuilt, never
        changed, when an event touches their node)."""
        held = self.gpus_held
        return frozenset(g.index for g in self.info.gpus if gpu_free(g, held))

    @property
    def free_gpus(self) -> tuple[GpuInfo, ...]:
        free = self.free_indexes
        return tuple(g for g in self.info.gpus if g.index in free)

    @property
    def cpus_free(self) -> int:
        return max(0, self.info.cpus_total - self.cpus_used)

    @property
    def memory_free(self) -> int:
        return max(0, self.info.memory_total_bytes - self.memory_used)


class Overlay(Mapping[str, NodeView]):
    """base with some nodes replaced and some hidden, without copying base (10,000 nodes)."""

    def __init__(self, base: Mapping[str, NodeView], changed: Mapping[str, NodeView], hidden: frozenset[str]):
        self._base, self._changed, self._hidden = base, changed, hidden

    def __getitem__(self, key: str) -> NodeView:
        if key in self._hidden:
            raise KeyError(key)
        return self._changed.get(key) or self._base[key]

    def __iter__(self) -> Iterator[str]:
        return (k for k in self._base if k not in self._hidden)

    def __len__(self) -> int:
        return len(self._base) - sum(1 for k in self._hidden if k in self._base)


@dataclass(frozen=True)
class Reservation:
    """Capacity held for one tenant over a time window (etcd ``reservations/<name>``): ``gpus`` GPUs
    per node (concrete counts, chosen at creation when no nodes were named), of ``model`` ("" = any).
    Enforced by coordinator/reservations.py while ``start_ms <= now < end_ms``."""

    name: str
    tenant: str
    start_ms: int
    end_ms: int
    gpus: Mapping[str, int]
    model: str = ""
    created_ms: int = 0
    by: str = ""

    @property
    def total(self) -> int:
        return sum(self.gpus.values())

    def active(self, now_ms: int) -> bool:
        return self.start_ms <= now_ms < self.end_ms


@dataclass(frozen=True)
class ReservationBook:
    """The reservations at one revision, and what each tenant's live allocations hold (GPUs) on the
    nodes they name: a reservation blocks k GPUs minus what its tenant already holds there."""

    reservations: tuple[Reservation, ...] = ()
    # node -> tenant -> GPUs held there (only nodes some reservation names)
    held: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    def holding(self, node: str, tenant: str) -> int:
        return self.held.get(node, {}).get(tenant, 0)

    def plus(self, node: str, tenant: str, gpus: int) -> ReservationBook:
        """The book once ``tenant`` holds ``gpus`` more on ``node`` (a placement counted in a pass)."""
        if not any(node in r.gpus for r in self.reservations):
            return self
        on_node = dict(self.held.get(node, {}))
        on_node[tenant] = on_node.get(tenant, 0) + gpus
        return replace(self, held={**self.held, node: on_node})


NO_RESERVATIONS = ReservationBook()


@dataclass(frozen=True)
class Snapshot:
    """Cluster state at one etcd revision. Placement is a pure function of this."""

    revision: int
    nodes: Mapping[str, NodeView]
    # Tenants' quotas and usage at the same revision (placement checks quotas against it).
    quotas: QuotaBook = EMPTY_BOOK
    # Calendar reservations at the same revision (coordinator/reservations.py applies them per tenant).
    reservations: ReservationBook = NO_RESERVATIONS


@dataclass(frozen=True)
class ResourceRequest:
    """What an allocation asks for, already validated (counts > 0, strings sane)."""

    gpus: int
    cpus: int
    memory_bytes: int
    gpu_model: str = ""
    min_gpu_memory_bytes: int = 0
    node_selector: Mapping[str, str] = field(default_factory=dict)
    # CPU / memory not asked for: the configured per-GPU default capped by the node share
    # (coordinator/request_defaults.py).
    cpus_auto: bool = False
    memory_auto: bool = False
    # A gang (issue 15, section 5): this many distinct nodes, each with ``gpus`` GPUs and ``cpus`` /
    # ``memory_bytes`` of its own (all per node); 1 = one node, as always.
    nodes: int = 1
    # A gang's nodes must all have the same value of this label (a rack); "" = any nodes.
    same_label: str = ""

    @property
    def is_gang(self) -> bool:
        return self.nodes > 1

    def per_node(self) -> ResourceRequest:
        """What each node of a gang must hold: the same request for one node."""
        return replace(self, nodes=1, same_label="") if self.is_gang else self


@dataclass(frozen=True)
class Placement:
    """Placement's decision: which GPUs of which node, judged at snapshot_revision. A gang's
    placement is its first member's, with the other members (one Placement per node) in ``more``."""

    node: str
    gpu_indexes: tuple[int, ...]
    node_record_revision: int
    snapshot_revision: int
    more: tuple[Placement, ...] = ()

    @property
    def members(self) -> tuple[Placement, ...]:
        """One placement per node, the first member first (each with no ``more`` of its own)."""
        if not self.more:
            return (self,)
        return (replace(self, more=()), *self.more)

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(m.node for m in self.members)


@dataclass(frozen=True)
class AllocatedGpu:
    index: int
    uuid: str
    model: str = ""


@dataclass(frozen=True)
class Member:
    """What an allocation holds on one node."""

    node: str
    gpus: tuple[AllocatedGpu, ...]
    cpus: int
    memory_bytes: int


@dataclass(frozen=True)
class Allocation:
    # node, gpus, cpus and memory_bytes: the first member's (or, through on(), one member's as
    # seen on its node); ``gang`` lists every member of a gang (empty for one node: see members).
    id: str
    node: str
    gpus: tuple[AllocatedGpu, ...]
    cpus: int
    memory_bytes: int
    ttl_seconds: int
    lease_id: int
    # create_revision of the allocation key: the fencing token.
    revision: int
    # Free text from the request: describes, decides nothing.
    owner: str = ""
    # Scoped by the principal that asked: "<principal>/<client's request id>" (request ids belong
    # to their caller: another principal's equal id is another request). Older records: unscoped.
    request_id: str = ""
    created_unix_ms: int = 0
    # The authenticated caller that made it ("user:alice"), which decides who may use it, and the
    # tenant its resources count against. Empty in records made before identities existed.
    principal: str = ""
    tenant: str = ""
    # What was asked for (see request_shape): a reuse of the request id must ask for the same.
    shape: str = ""
    # Declared runtime (0: none): the lease is not renewed past created + max_runtime.
    max_runtime_s: int = 0
    priority: int = 0
    priority_class: str = ""
    preemptible: bool = False
    gang: tuple[Member, ...] = ()

    @property
    def members(self) -> tuple[Member, ...]:
        """Every node it holds something on, the first member first (one for a one-node allocation)."""
        return self.gang or (Member(self.node, self.gpus, self.cpus, self.memory_bytes),)

    @property
    def is_gang(self) -> bool:
        return len(self.gang) > 1

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(m.node for m in self.members)

    def on(self, node: str) -> Allocation:
        """The allocation as seen by one member node (node, GPUs, CPUs and memory there); an
        agent of that node gets this. KeyError when ``node`` is not a member."""
        for m in self.members:
            if m.node == node:
                return replace(self, node=m.node, gpus=m.gpus, cpus=m.cpus, memory_bytes=m.memory_bytes)
        raise KeyError(node)

    @property
    def usage(self) -> Usage:
        """What it counts against its tenant's quota (a gang: the sum over its members)."""
        if not self.gang:
            return usage_of(self.gpus, self.cpus, self.memory_bytes)
        total = Usage()
        for m in self.members:
            total = total.plus(usage_of(m.gpus, m.cpus, m.memory_bytes))
        return total

    @property
    def client_request_id(self) -> str:
        """The request id as its caller wrote it (without the principal's scope)."""
        return self.request_id.rpartition("/")[2]


@dataclass(frozen=True)
class PendingRequest:
    """A request waiting in the queue (queue/<id>): what it asks for, whose it is, and its place.
    ``id`` becomes the allocation's id when it is admitted."""

    id: str
    request_id: str  # scoped, as Allocation.request_id
    req: ResourceRequest
    ttl_s: int
    principal: str = ""
    tenant: str = ""
    owner: str = ""
    shape: str = ""
    priority: int = 0
    priority_class: str = ""
    created_ms: int = 0
    wait_until_ms: int = 0
    max_runtime_s: int = 0
    # The waiting lease, kept alive while a client waits (0 in tests of the pure plan).
    lease_id: int = 0
    preemptible: bool = False

    @property
    def pool(self) -> str:
        """Requests compete in pools of interchangeable GPUs: by model ("" = any model)."""
        return self.req.gpu_model


def request_usage(req: ResourceRequest) -> Usage:
    """What a request will count against its tenant's quota, as far as known before placement
    (the model only when it names one); a gang's: every node's."""
    gpus = req.gpus * req.nodes
    return Usage(gpus, {req.gpu_model: gpus} if req.gpu_model else {}, req.cpus * req.nodes,
                 req.memory_bytes * req.nodes)  # fmt: skip


def placed_usage(snapshot: Snapshot, p: Placement, req: ResourceRequest) -> Usage:
    """What a placed request counts against its tenant's quota: the models of the GPUs it got."""
    models: dict[str, int] = {}
    gpus = 0
    for m in p.members:
        by_index = {g.index: g.model for g in snapshot.nodes[m.node].info.gpus}
        for i in m.gpu_indexes:
            models[by_index.get(i, "")] = models.get(by_index.get(i, ""), 0) + 1
        gpus += len(m.gpu_indexes)
    n = len(p.members)
    return Usage(gpus, models, req.cpus * n, req.memory_bytes * n)


def usage_of(gpus: tuple[AllocatedGpu, ...], cpus: int, memory_bytes: int) -> Usage:
    models: dict[str, int] = {}
    for g in gpus:
        models[g.model] = models.get(g.model, 0) + 1
    return Usage(len(gpus), models, cpus, memory_bytes)


def scoped_request_id(principal: str, request_id: str) -> str:
    return f"{principal}/{request_id}"


def request_shape(req: ResourceRequest, ttl_seconds: int) -> str:
    """A canonical text of everything a request asks for; equal requests give equal text."""
    selector = ",".join(f"{k}={v}" for k, v in sorted(req.node_selector.items()))
    cpus = "auto" if req.cpus_auto else req.cpus
    memory = "auto" if req.memory_auto else req.memory_bytes
    gang = f";nodes={req.nodes};same={req.same_label}" if req.is_gang else ""
    return (
        f"gpus={req.gpus};cpus={cpus};memory={memory};model={req.gpu_model};"
        f"min_gpu_memory={req.min_gpu_memory_bytes};selector={selector};ttl={ttl_seconds}{gang}"
    )
