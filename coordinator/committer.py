"""Turns a placement into one etcd transaction whose compares make a wrong commit impossible.

Compares (all must hold at commit time, or nothing is written):
  reqs/<request_id>     version == 0     the request id has no live allocation (idempotency)
  gpus/<node>/<i>       version == 0     each chosen GPU is free (no double allocation)
  res/<node>/...        mod_revision < snapshot+1 over the whole range: no CPU/memory was
                        reserved on the node since the snapshot placement judged free capacity
                        by (deletions only free capacity, so they may pass)
  nodes/<node>          mod_revision == what placement saw (same GPUs, same capacity)
  alive/<node>          version > 0      the node is up
  cordoned/<node>       version == 0     the node is not cordoned
Success writes the allocation record, one key per GPU, the reservation and the request key,
all on the allocation's lease. Failure reads back what the compares looked at, so the caller
can tell a reused request id from a conflict and knows which revision its view must reach.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

from coordinator.domain import AllocatedGpu, Allocation, Placement, Snapshot
from coordinator.keys import Keys, range_end
from coordinator.records import encode_alloc, encode_res
from coordinator.store import Cmp, Get, Put, Store


@dataclass(frozen=True)
class Committed:
    allocation: Allocation


@dataclass(frozen=True)
class RequestTaken:
    """The request id already belongs to a live allocation."""

    allocation_id: str


@dataclass(frozen=True)
class Rejected:
    """A compare failed: the view was stale. Retry once the view reaches `revision`."""

    revision: int
    # The node is down or cordoned in etcd: don't pick it again for this request.
    node_unusable: bool


CommitResult = Committed | RequestTaken | Rejected


class Committer(Protocol):
    async def commit(self, placement: Placement, draft: Allocation, snapshot: Snapshot) -> CommitResult: ...


def gpus_of(placement: Placement, snapshot: Snapshot) -> tuple[AllocatedGpu, ...]:
    by_index = {g.index: g for g in snapshot.nodes[placement.node].info.gpus}
    return tuple(AllocatedGpu(i, by_index[i].uuid, by_index[i].model) for i in placement.gpu_indexes)


class EtcdCommitter:
    def __init__(self, store: Store, keys: Keys) -> None:
        self._store = store
        self._keys = keys

    async def commit(self, placement: Placement, draft: Allocation, snapshot: Snapshot) -> CommitResult:
        k, node, lease = self._keys, placement.node, draft.lease_id
        alloc = replace(draft, node=node, gpus=gpus_of(placement, snapshot))
        res_prefix = k.res_prefix(node)
        compares = [
            Cmp(k.req(alloc.request_id), "version", "==", 0),
            *(Cmp(k.gpu(node, i), "version", "==", 0) for i in placement.gpu_indexes),
            Cmp(res_prefix, "mod", "<", placement.snapshot_revision + 1, range_end(res_prefix)),
            Cmp(k.node(node), "mod", "==", placement.node_record_revision),
            Cmp(k.alive(node), "version", ">", 0),
            Cmp(k.cordoned(node), "version", "==", 0),
        ]
        success = [
            Put(k.alloc(alloc.id), encode_alloc(alloc), lease),
            *(Put(k.gpu(node, i), alloc.id.encode(), lease) for i in placement.gpu_indexes),
            Put(k.res(node, alloc.id), encode_res(alloc.cpus, alloc.memory_bytes), lease),
            Put(k.req(alloc.request_id), alloc.id.encode(), lease),
        ]
        failure = [
            Get(k.req(alloc.request_id)),
            Get(k.alive(node)),
            Get(k.cordoned(node)),
            Get(k.node(node)),
            Get(k.gpu(node, 0), range_end(f"{k.prefix}gpus/{node}/")),
            Get(res_prefix, range_end(res_prefix)),
        ]
        out = await self._store.txn(compares, success, failure)
        if out.succeeded:
            return Committed(replace(alloc, revision=out.revision))
        req, alive, cordoned = out.reads[0], out.reads[1], out.reads[2]
        if req:
            return RequestTaken(req[0].value.decode())
        seen = [kv.mod_revision for read in out.reads for kv in read]
        return Rejected(max(seen, default=out.revision), node_unusable=not alive or bool(cordoned))
