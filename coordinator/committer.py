"""Turns placements into one etcd transaction whose compares make a wrong commit impossible.

For each allocation in the batch, and each node it lands on (every member node of a gang: one
transaction claims them all or nothing), the compares are:
  reqs/<request_id>     version == 0     the request id has no live allocation (idempotency)
  gpus/<node>/<uuid>    version == 0     each chosen GPU is free (no double allocation); by UUID,
                                         and nodes/<node> below pins the index->UUID map used
  res/<node>/...        mod_revision < snapshot+1 over the whole range: no CPU/memory was
                        reserved on the node since the snapshot that judged its free capacity
                        (deletions only free capacity, so they may pass)
  nodes/<node>          mod_revision == what placement saw (same GPUs, same capacity)
  alive/<node>          version > 0      the node is up
  cordoned/<node>       version == 0     the node is not cordoned
  drain/<node>/...      mod_revision < snapshot+1 over the whole range: no GPU of the node began
                        draining (its allocation ran a container) since the snapshot
  queue/<id>            version > 0      (admitting a pending request) it is still pending
And for each tenant of the batch:
  quotas/<tenant>, quotas/*   mod_revision == what the snapshot saw (0: none): the quota judged is
                        the quota in force
  usage/<tenant>/...    mod_revision < snapshot+1 over the whole range, when a quota limits the
                        tenant: no allocation of the tenant was added since the snapshot that
                        judged its usage, so two replicas cannot both take its last GPUs
And once per transaction:
  reservations/...      mod_revision < snapshot+1 over the whole range: no calendar reservation was
                        created (or rewritten) since the snapshot placement judged by, so a placement
                        on GPUs a new reservation withholds from its tenant fails and is placed again
                        (coordinator/reservations.py). Only reservation *writes* are compared: a
                        window that opens between placement and commit (the clock, not etcd, moved)
                        is not, a known approximation of at most one commit round. Deletions pass
                        (they only free capacity), as for res/.
Success writes, per allocation, its record, one key per GPU, its reservation and its request
key, each on the allocation's own lease (and its usage/<tenant>/<id>), and its audit entry
(an admission also deletes queue/<id>, queued/ and a preemption claim claims/<id>) (no lease: it outlives the
allocation). Failure reads back what the compares looked at, so
the caller can tell a reused request id from a conflict and which revision its view must reach.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from gpulease.coordinator.audit import entry_put
from gpulease.coordinator.domain import AllocatedGpu, Allocation, Member, Placement, Snapshot
from gpulease.coordinator.keys import Keys, range_end
from gpulease.coordinator.quota import DEFAULT_TENANT_KEY
from gpulease.coordinator.records import encode_alloc, encode_res, encode_usage
from gpulease.coordinator.store import Cmp, Delete, Get, Op, Put, Store


@dataclass(frozen=True)
class Item:
    placement: Placement
    # id, lease, request id, cpus, memory, ttl, owner; node and GPUs come from the placement.
    draft: Allocation
    # Admitting a pending request (queue/<draft.id>): the commit compares that it is still pending
    # (its client has not left, nobody admitted it) and removes it with its queued/ key.
    queued: bool = False


@dataclass(frozen=True)
class Committed:
    allocations: tuple[Allocation, ...]
    revision: int


@dataclass(frozen=True)
class Rejected:
    """A compare failed: the view was stale. Retry once the view has caught up with `revision`
    (etcd's revision when it answered: whatever failed a compare is at or below it)."""

    revision: int
    # request id -> id of the live allocation that already holds it
    taken: Mapping[str, str] = field(default_factory=dict)
    # nodes that etcd says are down or cordoned: don't pick them again for these requests
    unusable: frozenset[str] = frozenset()
    # nodes whose GPUs, reservations or record changed after the snapshot: another commit (most
    # likely another replica's, placing by the same policy) got there first
    conflicted: frozenset[str] = frozenset()
    # pending requests (by id) of the batch that are no longer in the queue
    left_queue: frozenset[str] = frozenset()


CommitResult = Committed | Rejected


class Committer(Protocol):
    async def commit(self, items: Sequence[Item], snapshot: Snapshot) -> CommitResult: ...


def gpus_of(placement: Placement, snapshot: Snapshot) -> tuple[AllocatedGpu, ...]:
    """The GPUs of one member's placement (its own node), by index as the snapshot names them."""
    by_index = {g.index: g for g in snapshot.nodes[placement.node].info.gpus}
    return tuple(AllocatedGpu(i, by_index[i].uuid, by_index[i].model) for i in placement.gpu_indexes)


def placed(draft: Allocation, placement: Placement, snapshot: Snapshot) -> Allocation:
    """The draft with its node(s) and GPUs: a gang lists every member, the first one's as its node."""
    members = tuple(Member(m.node, gpus_of(m, snapshot), draft.cpus, draft.memory_bytes) for m in placement.members)
    first = members[0]
    return replace(draft, node=first.node, gpus=first.gpus, gang=members if len(members) > 1 else ())


def txn_size(items: Sequence[Item]) -> int:
    """The largest of the txn's compare, success and failure lists (etcd caps each: --max-txn-ops)."""
    members = [m for i in items for m in i.placement.members]
    nodes = {m.node for m in members}
    gpus = sum(len(m.gpu_indexes) for m in members)
    queued = sum(1 for i in items if i.queued)
    with_tenant = [i for i in items if i.draft.tenant]
    tenants = len({i.draft.tenant for i in with_tenant})
    compares = len(items) + gpus + 5 * len(nodes) + queued + 2 * tenants + (1 if tenants else 0) + 1
    # per allocation: record, request key, audit entry; per member: reservation; per GPU: its key
    puts = 3 * len(items) + len(members) + len(with_tenant) + gpus + 3 * queued
    reads = len(items) + 5 * len(nodes) + queued
    return max(compares, puts, reads)


def gang_txn_size(nodes: int, gpus_per_node: int, *, tenant: bool = True) -> int:
    """The operations one request of ``nodes`` x ``gpus_per_node`` needs in its own transaction at most
    (as a queue admission, which adds the most): what prepare() checks against etcd's limit."""
    more = tuple(Placement(f"n{i}", tuple(range(gpus_per_node)), 0, 0) for i in range(1, nodes))
    p = Placement("n0", tuple(range(gpus_per_node)), 0, 0, more)
    draft = Allocation("x", "", (), 0, 0, 0, 0, 0, tenant="t" if tenant else "")
    return txn_size([Item(p, draft, queued=True)])


class EtcdCommitter:
    def __init__(self, store: Store, keys: Keys) -> None:
        self._store = store
        self._keys = keys

    async def commit(self, items: Sequence[Item], snapshot: Snapshot) -> CommitResult:
        k = self._keys
        allocs = [placed(i.draft, i.placement, snapshot) for i in items]
        compares: list[Cmp] = []
        success: list[Op] = []
        nodes: dict[str, Placement] = {}
        for item, a in zip(items, allocs, strict=True):
            lease = a.lease_id
            compares.append(Cmp(k.req(a.request_id), "version", "==", 0))
            success.append(Put(k.alloc(a.id), encode_alloc(a), lease))
            # A gang: every member node's keys, all in this one transaction (all or nothing).
            for p, m in zip(item.placement.members, a.members, strict=True):
                nodes.setdefault(p.node, p)
                compares.extend(Cmp(k.gpu(m.node, g.uuid), "version", "==", 0) for g in m.gpus)
                success.extend(Put(k.gpu(m.node, g.uuid), a.id.encode(), lease) for g in m.gpus)
                success.append(Put(k.res(m.node, a.id), encode_res(m.cpus, m.memory_bytes), lease))
            success.append(Put(k.req(a.request_id), a.id.encode(), lease))
            if a.tenant:
                success.append(Put(k.usage(a.tenant, a.id), encode_usage(a.usage), lease))
            detail = (f"node={','.join(a.nodes)} gpus={sum(len(m.gpus) for m in a.members)} "
                      f"request={a.client_request_id}")  # fmt: skip
            success.append(entry_put(k, a.principal, "allocate", a.id, tenant=a.tenant, detail=detail,
                                     unique=f"{a.id}.allocate"))  # fmt: skip
            if item.queued:
                compares.append(Cmp(k.queue(a.id), "version", ">", 0))
                success += [Delete(k.queue(a.id)), Delete(k.queued(a.request_id)), Delete(k.claim(a.id))]
        failure: list[Op] = [Get(k.req(a.request_id)) for a in allocs]
        for node, p in nodes.items():
            res = k.res_prefix(node)
            drains = k.drain_prefix(node)
            compares += [
                Cmp(res, "mod", "<", p.snapshot_revision + 1, range_end(res)),
                # GPUs whose containers may still run (coordinator/draining.py), as for res/.
                Cmp(drains, "mod", "<", p.snapshot_revision + 1, range_end(drains)),
                Cmp(k.node(node), "mod", "==", p.node_record_revision),
                Cmp(k.alive(node), "version", ">", 0),
                Cmp(k.cordoned(node), "version", "==", 0),
            ]
            gpus = k.gpus_prefix(node)
            failure += [Get(k.alive(node)), Get(k.cordoned(node)), Get(k.node(node)),
                        Get(gpus, range_end(gpus)), Get(res, range_end(res))]  # fmt: skip
        book = snapshot.quotas
        tenants = sorted({a.tenant for a in allocs if a.tenant})
        if tenants:
            compares.append(Cmp(k.quota(DEFAULT_TENANT_KEY), "mod", "==", book.revision(DEFAULT_TENANT_KEY)))
        for tenant in tenants:
            compares.append(Cmp(k.quota(tenant), "mod", "==", book.revision(tenant)))
            if book.limited(tenant):
                usage = k.usage_prefix(tenant)
                compares.append(Cmp(usage, "mod", "<", snapshot.revision + 1, range_end(usage)))
        # Reservations written after the snapshot: placement did not apply them. (Time passing into a
        # window between placement and commit is not caught here; see the docstring.)
        held_for = k.reservations_prefix()
        compares.append(Cmp(held_for, "mod", "<", snapshot.revision + 1, range_end(held_for)))
        queued = [a.id for item, a in zip(items, allocs, strict=True) if item.queued]
        failure += [Get(k.queue(i)) for i in queued]
        out = await self._store.txn(compares, success, failure)
        if out.succeeded:
            return Committed(tuple(replace(a, revision=out.revision) for a in allocs), out.revision)
        taken = {a.request_id: r[0].value.decode() for a, r in zip(allocs, out.reads, strict=False) if r}
        per_node = out.reads[len(allocs) : len(allocs) + 5 * len(nodes)]
        still = out.reads[len(allocs) + 5 * len(nodes) :]
        left_queue = frozenset(i for i, read in zip(queued, still, strict=True) if not read)
        unusable = frozenset(node for j, node in enumerate(nodes) if not per_node[5 * j] or per_node[5 * j + 1])
        conflicted = frozenset(
            node
            for j, (node, p) in enumerate(nodes.items())
            if any(kv.mod_revision > p.snapshot_revision for read in per_node[5 * j + 2 : 5 * j + 5] for kv in read)
        )
        # out.revision, not the newest key read: a compare can fail on a deletion (a node record
        # removed), which no read shows, and the view must have seen that too.
        return Rejected(out.revision, taken, unusable, conflicted, left_queue)
