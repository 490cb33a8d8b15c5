"""Allocation service: validate, grant a lease, hand the request to the batcher, and the rest
of the allocation lifecycle (get, list, keepalive, release).

Placement runs on the (possibly stale) view; the committer's transaction is the final arbiter
and the batcher retries rejected commits a bounded number of times. Every path that does not
end in a commit revokes the lease it granted, so an error never leaves partial state behind.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import logging
import secrets
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from coordinator import validation
from coordinator.batch_placement import place_one
from coordinator.batcher import Batcher, BatchPolicy
from coordinator.committer import Committer
from coordinator.domain import Allocation, Placement, ResourceRequest, Snapshot
from coordinator.keys import Keys, range_end
from coordinator.lease_pool import LeasePool, needs_renewal
from coordinator.records import decode_alloc
from coordinator.store import Get, Store
from coordinator.view import ClusterView
from gpulease.errors import AllocationNotFound, InsufficientResources, Unsatisfiable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AllocationPolicy:
    default_ttl: int = 60
    default_cpus_per_gpu: int = 1
    default_memory_per_gpu: int = 4 * 2**30
    max_commit_rounds: int = 20
    max_txn_ops: int = 128


@dataclass(frozen=True)
class AllocateInput:
    gpus: int
    cpus: int | None = None
    memory_bytes: int | None = None
    gpu_model: str = ""
    min_gpu_memory_bytes: int = 0
    node_selector: MappingProxyType[str, str] | dict[str, str] | None = None
    ttl_seconds: int = 0
    owner: str = ""
    request_id: str = ""


def new_allocation_id() -> str:
    # Time-ordered (ms since epoch) plus randomness: sorts by creation, never collides in practice.
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(5)}"


class AllocationService:
    def __init__(
        self, store: Store, view: ClusterView, keys: Keys, committer: Committer, policy: AllocationPolicy
    ) -> None:
        self._store = store
        self._view = view
        self._keys = keys
        self._policy = policy
        self._background: set[asyncio.Task[None]] = set()
        self._leases = LeasePool(store)
        self._batcher = Batcher(
            view,
            committer,
            by_request_id=self._by_request_id,
            by_id=self._by_id,
            policy=BatchPolicy(max_rounds=policy.max_commit_rounds, max_txn_ops=policy.max_txn_ops),
        )

    @property
    def batcher(self) -> Batcher:
        return self._batcher

    async def run(self) -> None:
        """The commit loop; runs until cancelled."""
        await self._batcher.run()

    async def allocate(self, inp: AllocateInput) -> tuple[Allocation, bool]:
        """Returns (allocation, reused). reused=True when request_id matched a live allocation."""
        self._view.ensure_synced()
        req = validation.resource_request(
            gpus=inp.gpus,
            cpus=inp.cpus,
            memory_bytes=inp.memory_bytes,
            gpu_model=inp.gpu_model,
            min_gpu_memory_bytes=inp.min_gpu_memory_bytes,
            node_selector=inp.node_selector or {},
            default_cpus_per_gpu=self._policy.default_cpus_per_gpu,
            default_memory_per_gpu=self._policy.default_memory_per_gpu,
        )
        ttl = validation.ttl(inp.ttl_seconds, self._policy.default_ttl)
        owner = validation.owner(inp.owner)
        alloc_id = new_allocation_id()
        request_id = validation.request_id(inp.request_id) if inp.request_id else alloc_id

        # Placement before the lease: a request that cannot fit costs no etcd write.
        try:
            self._place(req, self._view.snapshot())
        except (InsufficientResources, Unsatisfiable):
            existing = await self._by_request_id(request_id)
            if existing:
                return existing, True
            raise

        lease, age = await self._leases.take(ttl)
        draft = Allocation(
            id=alloc_id, node="", gpus=(), cpus=req.cpus, memory_bytes=req.memory_bytes, ttl_seconds=ttl,
            lease_id=lease, revision=0, owner=owner, request_id=request_id,
            created_unix_ms=int(time.time() * 1000),
        )  # fmt: skip
        fut = self._batcher.submit(req, draft)
        # Whatever happens to this call, the lease is revoked unless it carries the allocation.
        # A cancelled client must not revoke a lease its batch is committing (that would fail the
        # whole batch), so the decision waits for the batch's answer.
        fut.add_done_callback(functools.partial(self._settle_lease, ttl, lease, alloc_id, needs_renewal(ttl, age)))
        return await asyncio.shield(fut)

    def _settle_lease(
        self, ttl: int, lease: int, alloc_id: str, renew: bool, fut: asyncio.Future[tuple[Allocation, bool]]
    ) -> None:
        self._leases.replenish(ttl)
        if fut.cancelled() or fut.exception() is not None or fut.result()[0].id != alloc_id:
            self._in_background(self._revoke_quietly(lease))
        elif renew:
            # A pooled lease granted up to a couple of seconds ago: restart its full TTL now.
            self._in_background(self._renew_quietly(lease))

    def _in_background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _renew_quietly(self, lease: int) -> None:
        try:
            await self._store.keepalive_once(lease)
        except Exception as exc:  # the allocation then expires up to the pool's max age early
            log.warning("could not renew pooled lease %x after commit: %s", lease, exc)

    def _place(self, req: ResourceRequest, snapshot: Snapshot) -> Placement:
        return place_one(snapshot, req, self._view.index)

    async def _revoke_quietly(self, lease: int) -> None:
        try:
            await self._store.revoke(lease)
        except Exception as exc:  # it expires by itself within its TTL anyway
            log.warning("could not revoke lease %x after a failed allocate: %s", lease, exc)

    async def _by_request_id(self, request_id: str) -> Allocation | None:
        kv = await self._store.get(self._keys.req(request_id))
        return await self._by_id(kv.value.decode()) if kv else None

    async def _by_id(self, alloc_id: str) -> Allocation | None:
        kv = await self._store.get(self._keys.alloc(alloc_id))
        return decode_alloc(kv.value, kv.create_revision) if kv else None

    # --- the rest of the allocation lifecycle -------------------------------------------

    async def get(self, alloc_id: str) -> Allocation:
        """Linearizable: agents use this to check fencing tokens."""
        alloc = await self._by_id(validation.allocation_id(alloc_id))
        if alloc is None:
            raise AllocationNotFound(f"allocation {alloc_id} is not live (released, expired or never existed)")
        return alloc

    async def release(self, alloc_id: str) -> int:
        """Revision of the release, or 0 when the allocation was not live (release is idempotent)."""
        # The view usually knows the lease, saving a read; a stale entry is harmless (revoking a
        # lease that is already gone answers 0), a missing one (just created) falls back to etcd.
        alloc = self._view.allocation(validation.allocation_id(alloc_id)) or await self._by_id(alloc_id)
        if alloc is None:
            return 0
        # Revoking the lease deletes every key of the allocation in one step.
        return await self._store.revoke(alloc.lease_id)

    async def keep_alive(self, alloc_id: str) -> int:
        validation.allocation_id(alloc_id)
        alloc = self._view.allocation(alloc_id) or await self._by_id(alloc_id)
        if alloc is None:
            raise AllocationNotFound(f"allocation {alloc_id} is not live (released, expired or never existed)")
        ttl = await self._store.keepalive_once(alloc.lease_id)
        if ttl <= 0:
            raise AllocationNotFound(f"allocation {alloc_id} has expired: its lease lapsed")
        return ttl

    async def list(self, node: str = "", owner: str = "") -> list[Allocation]:
        """Live allocations, read linearizably from etcd (agents vouch for containers with this)."""
        if node:
            allocs = await self._on_node(validation.node_name(node))
        else:
            prefix = self._keys.allocs_prefix()
            _, kvs = await self._store.get_prefix(prefix, range_end(prefix))
            allocs = [decode_alloc(kv.value, kv.create_revision) for kv in kvs]
        return sorted(
            (a for a in allocs if (not node or a.node == node) and (not owner or a.owner == owner)),
            key=lambda a: (a.revision, a.id),
        )

    async def _on_node(self, node: str) -> builtins.list[Allocation]:
        # Every agent asks for its node's allocations every few seconds: read that node's
        # reservation keys (one per allocation there), then their records in one transaction,
        # so the cost follows the node's allocations, not the cluster's.
        prefix = self._keys.res_prefix(node)
        _, res = await self._store.get_prefix(prefix, range_end(prefix))
        if not res:
            return []
        ids = [kv.key[len(prefix) :] for kv in res]
        out = await self._store.txn([], [Get(self._keys.alloc(i)) for i in ids])
        return [decode_alloc(kvs[0].value, kvs[0].create_revision) for kvs in out.reads if kvs]
