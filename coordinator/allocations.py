"""Allocation service: validate, place on the view, commit through etcd, retry on conflict.

The placement is computed from the (possibly stale) view; the committer's transaction is the
final arbiter. A rejected commit waits for the view to catch up and retries, a bounded number
of times. Every exit path that did not commit revokes the lease it granted, so an error never
leaves partial state behind.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from dataclasses import dataclass
from types import MappingProxyType

from coordinator import validation
from coordinator.committer import Committed, Committer, RequestTaken
from coordinator.domain import Allocation, Placement, ResourceRequest, Snapshot
from coordinator.keys import Keys, range_end
from coordinator.placement import place
from coordinator.records import decode_alloc
from coordinator.store import LeaseNotFound, OutcomeUnknown, Store
from coordinator.view import ClusterView
from gpulease.errors import AllocationNotFound, Conflict, InsufficientResources, Unsatisfiable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AllocationPolicy:
    default_ttl: int = 60
    default_cpus_per_gpu: int = 1
    default_memory_per_gpu: int = 4 * 2**30
    max_commit_attempts: int = 10
    # How long a rejected commit waits for the watch to deliver what the commit tripped on.
    catch_up_timeout: float = 1.0


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
        self._committer = committer
        self._policy = policy

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
        snapshot = self._view.snapshot()
        try:
            first = self._place(req, snapshot, frozenset())
        except (InsufficientResources, Unsatisfiable):
            existing = await self._by_request_id(request_id)
            if existing:
                return existing, True
            raise

        lease = await self._store.grant(ttl)
        draft = Allocation(
            id=alloc_id, node="", gpus=(), cpus=req.cpus, memory_bytes=req.memory_bytes, ttl_seconds=ttl,
            lease_id=lease, revision=0, owner=owner, request_id=request_id,
            created_unix_ms=int(time.time() * 1000),
        )  # fmt: skip
        committed = False
        try:
            result, reused = await self._commit_loop(req, draft, (snapshot, first))
            committed = not reused
            return result, reused
        finally:
            if not committed:
                await self._revoke_quietly(lease)

    async def _commit_loop(
        self, req: ResourceRequest, draft: Allocation, first: tuple[Snapshot, Placement]
    ) -> tuple[Allocation, bool]:
        excluded: frozenset[str] = frozenset()
        snapshot, placement = first
        for attempt in range(1, self._policy.max_commit_attempts + 1):
            if attempt > 1:
                snapshot = self._view.snapshot()
                try:
                    placement = self._place(req, snapshot, excluded)
                except (InsufficientResources, Unsatisfiable):
                    existing = await self._by_request_id(draft.request_id)
                    if existing:
                        return existing, True
                    raise
            try:
                result = await self._committer.commit(placement, draft, snapshot)
            except OutcomeUnknown:
                # The txn may still commit. Its request key tells; if it is absent, revoking the
                # lease (done by our caller) makes a late commit impossible: a Put on a revoked
                # lease fails the whole txn.
                existing = await self._by_request_id(draft.request_id)
                if existing and existing.id == draft.id:
                    return existing, False
                if existing:
                    return existing, True
                raise
            except LeaseNotFound:
                # Our lease expired before we could commit (etcd stalled for > ttl): start over.
                raise Conflict("the allocation's lease expired before it could commit; retry") from None
            if isinstance(result, Committed):
                return result.allocation, False
            if isinstance(result, RequestTaken):
                existing = await self._by_id(result.allocation_id)
                if existing:
                    return existing, True
                continue  # it ended between the txn and our read: the id is free again
            if result.node_unusable:
                excluded |= {placement.node}
            await self._view.wait_for_revision(result.revision, self._policy.catch_up_timeout)
            # Jitter keeps replicas that lost the same race from colliding again in lockstep.
            await asyncio.sleep(random.uniform(0, 0.002 * attempt))
        raise Conflict(
            f"gave up after {self._policy.max_commit_attempts} conflicting commits "
            "(heavy contention for the same nodes); retry the request"
        )

    @staticmethod
    def _place(req: ResourceRequest, snapshot: Snapshot, excluded: frozenset[str]) -> Placement:
        if excluded:
            nodes = {n: v for n, v in snapshot.nodes.items() if n not in excluded}
            snapshot = Snapshot(snapshot.revision, MappingProxyType(nodes))
        return place(snapshot, req)

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
        alloc = await self._by_id(validation.allocation_id(alloc_id))
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
        prefix = self._keys.allocs_prefix()
        _, kvs = await self._store.get_prefix(prefix, range_end(prefix))
        allocs = [decode_alloc(kv.value, kv.create_revision) for kv in kvs]
        return sorted(
            (a for a in allocs if (not node or a.node == node) and (not owner or a.owner == owner)),
            key=lambda a: (a.revision, a.id),
        )
