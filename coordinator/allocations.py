"""Allocation service: validate, grant a lease, hand the request to the batcher, and the rest
of the allocation lifecycle (get, list, keepalive, release).

Placement runs on the (possibly stale) view; the committer's transaction is the final arbiter
and the batcher retries rejected commits a bounded number of times. Every path that does not
end in a commit revokes the lease it granted, so an error never leaves partial state behind.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from gpulease.common.identity import LOCAL_ADMIN, Principal
from gpulease.common.logs import log_fields
from gpulease.coordinator import authz, priority_classes, tombstones, validation
from gpulease.coordinator.audit import entry_put
from gpulease.coordinator.batch_placement import TenantTally, place_for, place_one
from gpulease.coordinator.batcher import Batcher, BatchPolicy, InDoubt
from gpulease.coordinator.committer import Committer, gang_txn_size
from gpulease.coordinator.domain import (
    Allocation,
    PendingRequest,
    Placement,
    ResourceRequest,
    Snapshot,
    request_shape,
    request_usage,
    scoped_request_id,
)
from gpulease.coordinator.keys import Keys, range_end
from gpulease.coordinator.lease_pool import LeasePool, needs_renewal
from gpulease.coordinator.queue_plan import Decision, Wait
from gpulease.coordinator.quota import never_fits
from gpulease.coordinator.records import decode_alloc
from gpulease.coordinator.request_defaults import with_defaults
from gpulease.coordinator.settle import Settler
from gpulease.coordinator.store import Cmp, Delete, Get, LeaseNotFound, Op, Put, Store, StoreUnavailable, TxnOutcome
from gpulease.coordinator.tombstones import TombstoneLeases
from gpulease.coordinator.view import ClusterView
from gpulease.errors import (
    AllocationNotFound,
    AlreadyExists,
    Conflict,
    InsufficientResources,
    InvalidRequest,
    LifetimeReached,
    QuotaExceeded,
    RuntimeLimitReached,
    Unavailable,
    Unsatisfiable,
)

log = logging.getLogger(__name__)


# How long an answer waits for this replica's view to show its own write (never an error: past it,
# the answer goes out and the view catches up a moment later).
VIEW_WAIT_S = 1.0


DEFAULT_PRIORITY_CLASSES: Mapping[str, int] = MappingProxyType({"low": -100, "default": 0, "high": 100})


@dataclass(frozen=True)
class AllocationPolicy:
    default_ttl: int = 60
    default_cpus_per_gpu: int = 1
    default_memory_per_gpu: int = 4 * 2**30
    max_commit_rounds: int = 20
    max_txn_ops: int = 128
    settle_timeout: float = 5.0
    # Named priorities a request may ask for (higher goes first in the queue); "" = default_class.
    priority_classes: Mapping[str, int] = field(default_factory=lambda: DEFAULT_PRIORITY_CLASSES)
    default_class: str = "default"


@dataclass(frozen=True)
class Prepared:
    """A validated request: what it asks for, and the id its allocation (or pending request) gets."""

    id: str
    req: ResourceRequest
    ttl: int
    owner: str
    request_id: str  # scoped
    shape: str
    principal: str
    tenant: str
    priority: int
    priority_class: str
    max_runtime_s: int
    preemptible: bool = False
    # When the call arrived (time.monotonic()): an attempt older than tombstones.ATTEMPT_BOUND_S
    # never takes a lease, which bounds how long after it a tombstone must live.
    arrived: float = field(default_factory=time.monotonic)

    def pending(self, created_ms: int, wait_until_ms: int = 0, lease_id: int = 0) -> PendingRequest:
        return PendingRequest(
            id=self.id, request_id=self.request_id, req=self.req, ttl_s=self.ttl, principal=self.principal,
            tenant=self.tenant, owner=self.owner, shape=self.shape, priority=self.priority,
            priority_class=self.priority_class, created_ms=created_ms, wait_until_ms=wait_until_ms,
            max_runtime_s=self.max_runtime_s, lease_id=lease_id, preemptible=self.preemptible,
        )  # fmt: skip


# Whether a request may be placed now, given the pending requests (coordinator/waiting.py):
# Admit (with nodes reserved for requests ahead of it) or Wait (why). None: nothing is pending.
Gate = Callable[[PendingRequest], Decision | None]


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
    # The authenticated caller (from the connection, never from the request) and its tenant.
    principal: str = LOCAL_ADMIN.id
    tenant: str = LOCAL_ADMIN.tenant
    max_runtime_s: int = 0
    priority_class: str = ""
    preemptible: bool = False
    # A gang: this many nodes (0/1: one), each with gpus, cpus and memory_bytes; same_label: a label
    # every member node has with one value.
    nodes: int = 1
    same_label: str = ""


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
        self._leases = LeasePool(store)
        self._tombstones = TombstoneLeases(store)
        # Set by the waiting queue: fresh requests go through it while anything is pending.
        self.gate: Gate | None = None
        # Told when this replica admits a pending request, with when it was queued (metrics).
        self.on_admitted: Callable[[int], None] | None = None
        self.settler = Settler(store, keys)
        self._batcher = Batcher(
            view,
            committer,
            by_request_id=self.settler.by_request_id,
            by_id=self.settler.by_id,
            claim=self.settler.claim,
            decide=self.settler.decide,
            policy=BatchPolicy(
                max_rounds=policy.max_commit_rounds,
                max_txn_ops=policy.max_txn_ops,
                settle_timeout=policy.settle_timeout,
            ),
        )

    @property
    def batcher(self) -> Batcher:
        return self._batcher

    async def run(self) -> None:
        """The commit loop and the sweep of unsettled allocations; runs until cancelled."""
        sweep = asyncio.create_task(self.settler.run(), name="unsettled-sweep")
        try:
            await self._batcher.run()
        finally:
            sweep.cancel()
            await asyncio.gather(sweep, return_exceptions=True)

    async def close(self) -> None:
        """After run() has stopped and before the store closes: stop refilling the lease pool and
        drain the background revokes and settles."""
        await self._leases.close()
        await self.settler.close()

    def prepare(self, inp: AllocateInput) -> Prepared:
        """Validate a request (InvalidRequest says what to fix) and give it its id."""
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
        nodes, same_label = validation.gang(inp.nodes, inp.same_label)
        if nodes > 1:
            # Refused at once, never split: a gang is one transaction, and etcd caps its size.
            need = gang_txn_size(nodes, req.gpus)
            if need > self._policy.max_txn_ops:
                raise InvalidRequest(
                    f"a gang of {nodes} nodes x {req.gpus} GPUs needs {need} operations in one etcd transaction; "
                    f"etcd allows {self._policy.max_txn_ops} (etcd --max-txn-ops, coordinator setting "
                    "etcd_max_txn_ops): ask for fewer nodes or GPUs per node, or raise both limits together"
                )
            req = replace(req, nodes=nodes, same_label=same_label)
        cpus_share, memory_share = self._view.smallest_share_per_gpu()
        if (req.cpus_auto and self._policy.default_cpus_per_gpu > cpus_share) or (
            req.memory_auto and self._policy.default_memory_per_gpu > memory_share
        ):  # some node's share is under the default: cap it by the share of the nodes that could hold it
            req = with_defaults(req, self._view.snapshot().nodes.values())
        ttl = validation.ttl(inp.ttl_seconds, self._policy.default_ttl)
        max_runtime = validation.max_runtime(inp.max_runtime_s)
        klass = self.classes().resolve(inp.priority_class)
        quota, _ = self._view.quota_book().quota_for(inp.tenant)
        never = never_fits(inp.tenant, quota, request_usage(req))
        if never is not None:
            raise Unsatisfiable(f"{never}: more than the quota allows even with nothing held; an admin can raise "
                                "it (gpuctl quota set)")  # fmt: skip
        alloc_id = new_allocation_id()
        # Request ids belong to their caller: the same id from another principal is another request.
        request_id = scoped_request_id(
            inp.principal, validation.request_id(inp.request_id) if inp.request_id else alloc_id
        )
        shape = request_shape(req, ttl) + (f";max_runtime={max_runtime}" if max_runtime else "")
        shape += ";preemptible" if inp.preemptible else ""
        return Prepared(alloc_id, req, ttl, validation.owner(inp.owner), request_id, shape, inp.principal,
                        inp.tenant, klass.value, klass.name, max_runtime, inp.preemptible)  # fmt: skip

    def classes(self) -> priority_classes.Classes:
        """The priority classes in force: configured, then those stored in etcd over them."""
        return priority_classes.merged(self._policy.priority_classes, self._policy.default_class,
                                       self._view.table("priorities"))  # fmt: skip

    async def existing(self, request_id: str, shape: str) -> Allocation | None:
        """The live allocation of a request id, claimed for this caller (None: there is none)."""
        found = await self.settler.by_request_id(request_id)
        found = await self.settler.claim(found) if found else None
        return _same_shape(found, shape) if found else None

    async def allocate(self, inp: AllocateInput) -> tuple[Allocation, bool]:
        """Returns (allocation, reused). reused=True when request_id matched a live allocation."""
        return await self.allocate_prepared(self.prepare(inp))

    async def allocate_prepared(self, prep: Prepared) -> tuple[Allocation, bool]:
        """Place now or fail: InsufficientResources when nothing fits, or when requests pending in
        the queue come first (its message says why)."""
        excluded: frozenset[str] = frozenset()
        # Placement before the lease: a request that cannot fit costs no etcd write. Unless its
        # twin (same request id) is queued or committing here: then the batcher answers both alike.
        if not self._batcher.has_request(prep.request_id):
            try:
                excluded = self._admissible(prep)
            except (InsufficientResources, Unsatisfiable):
                existing = await self.existing(prep.request_id, prep.shape)
                if existing:
                    return existing, True
                raise
        return await self._commit(prep.pending(int(time.time() * 1000)), excluded, queued=False, arrived=prep.arrived)

    def _admissible(self, prep: Prepared) -> frozenset[str]:
        """Nodes it must stay off (reserved for pending requests ahead of it); raises when it cannot
        be placed now, or must wait behind pending requests."""
        snapshot = self._view.snapshot()
        decision = self.gate(prep.pending(int(time.time() * 1000))) if self.gate is not None else None
        if isinstance(decision, Wait):
            self.check_satisfiable(prep)  # Unsatisfiable first: such a request never waits
            raise InsufficientResources(f"{decision.reason} (requests are pending; wait in the queue with "
                                        "wait_seconds / gpuctl allocate --wait)")  # fmt: skip
        if decision is None:  # nothing pending: placement alone decides (the plan already placed it)
            tally = TenantTally(snapshot)
            over = tally.before(prep.tenant, prep.req)
            if over is not None:
                raise QuotaExceeded(f"{over}; wait in the queue (wait_seconds / gpuctl allocate --wait) to be admitted "
                                    "when the tenant's allocations free it")  # fmt: skip
            # As the tenant may use it now: other tenants' reservations withhold their GPUs (and say so).
            place_for(snapshot, prep.req, self._view.index, prep.tenant, int(time.time() * 1000))
            return frozenset()
        return decision.excluded

    def check_satisfiable(self, prep: Prepared) -> None:
        """Unsatisfiable when no node could ever hold the request (it must not wait); nothing else."""
        with contextlib.suppress(InsufficientResources):
            self._place(prep.req, self._view.snapshot())

    async def admit(self, pending: PendingRequest, excluded: frozenset[str]) -> tuple[Allocation, bool]:
        """Admit a pending request the queue chose: the same transaction as allocate(), which also
        compares that it is still pending and removes it from the queue."""
        alloc, reused = await self._commit(pending, excluded, queued=True)
        if alloc.id == pending.id and self.on_admitted is not None:
            self.on_admitted(pending.created_ms)
        return alloc, reused

    async def _commit(
        self, p: PendingRequest, excluded: frozenset[str], queued: bool, arrived: float | None = None
    ) -> tuple[Allocation, bool]:
        lease, granted_at = await self._leases.take(p.ttl_s)
        if arrived is not None and time.monotonic() - arrived > tombstones.ATTEMPT_BOUND_S:
            # Stalled (a paused process, a starved loop) past what tombstones allow for: its caller
            # has moved on, and a commit now could outlive the tombstone of a release meanwhile.
            self.settler.revoke_later(lease, p.ttl_s)
            raise Unavailable(f"this attempt waited more than {tombstones.ATTEMPT_BOUND_S}s on this coordinator "
                              "before it could commit; nothing was allocated, retry the request")  # fmt: skip
        draft = Allocation(
            id=p.id, node="", gpus=(), cpus=p.req.cpus, memory_bytes=p.req.memory_bytes, ttl_seconds=p.ttl_s,
            lease_id=lease, revision=0, owner=p.owner, request_id=p.request_id,
            created_unix_ms=int(time.time() * 1000), principal=p.principal, tenant=p.tenant, shape=p.shape,
            max_runtime_s=p.max_runtime_s, priority=p.priority, priority_class=p.priority_class,
            preemptible=p.preemptible,
        )  # fmt: skip
        fut = self._batcher.submit(p.req, draft, excluded, queued)
        # Whatever happens to this call, the lease is revoked unless it carries the allocation.
        # A cancelled client must not revoke a lease its batch is committing (that would fail the
        # whole batch), so the decision waits for the batch's answer.
        fut.add_done_callback(functools.partial(self._settle_lease, draft))
        alloc, reused = await asyncio.shield(fut)
        if reused:
            _same_shape(alloc, p.shape)
        if alloc.id == p.id:
            await self._full_ttl(alloc, granted_at)
            # Read your writes: a ListNodes or GetClusterSummary sent to this replica after the
            # answer shows the allocation (the batcher waits for the same event before its next round).
            await self._view.wait_for_revision(alloc.revision, VIEW_WAIT_S)
        return alloc, reused

    async def _full_ttl(self, alloc: Allocation, granted_at: float) -> None:
        """Make sure the caller gets the TTL it was promised, counted from now: the lease's clock
        started at its grant, and the queue, rejected rounds and a slow etcd all ran on it (issue 11,
        defect 6). Renew before answering when it lost more than 1 %; refuse when that fails."""
        age = time.monotonic() - granted_at
        if not needs_renewal(alloc.ttl_seconds, age):
            return
        if age > alloc.ttl_seconds / 4:
            log.info("allocation %s committed %.1fs after its lease was granted (TTL %ds); renewing it to the full "
                     "TTL before answering", alloc.id, age, alloc.ttl_seconds,
                     extra=log_fields(allocation_id=alloc.id, node=alloc.node))  # fmt: skip
        try:
            renewal = await self._store.keepalive(alloc.lease_id)
        except StoreUnavailable as exc:
            log.warning(
                "allocation %s: lease %.1fs old could not be renewed (%s); refusing it",
                alloc.id,
                age,
                exc,
                extra=log_fields(allocation_id=alloc.id),
            )
            self.settler.finish_later(alloc, "its lease could not be renewed to the full TTL before answering")
            raise Unavailable(
                f"the allocation committed, but its lease could not be renewed to the full {alloc.ttl_seconds}s TTL "
                f"({exc.message}); it is being released: retry with the same request id"
            ) from exc
        if renewal.ttl <= 0:
            log.warning(
                "allocation %s: its lease lapsed %.1fs after the grant, before the answer",
                alloc.id,
                age,
                extra=log_fields(allocation_id=alloc.id),
            )
            raise Conflict(
                f"the allocation's lease lapsed before it could be confirmed ({age:.1f}s after it was granted, "
                f"TTL {alloc.ttl_seconds}s; etcd or the queue was slow): retry the request"
            )

    def _settle_lease(self, draft: Allocation, fut: asyncio.Future[tuple[Allocation, bool]]) -> None:
        self._leases.replenish(draft.ttl_seconds)
        exc = None if fut.cancelled() else fut.exception()
        if fut.cancelled() or isinstance(exc, InDoubt):
            # It may have committed, and a retry may hold it by now: only the settler decides.
            self.settler.finish_later(draft, str(exc or "its commit was cancelled"))
        elif exc is not None or fut.result()[0].id != draft.id:
            # Never committed (or a rejection the decide step made final): nobody holds this lease.
            self.settler.revoke_later(draft.lease_id, draft.ttl_seconds)

    def _place(self, req: ResourceRequest, snapshot: Snapshot) -> Placement:
        return place_one(snapshot, req, self._view.index)

    # --- the rest of the allocation lifecycle -------------------------------------------

    async def get(self, alloc_id: str, by: Principal = LOCAL_ADMIN) -> Allocation:
        """Linearizable: agents use this to check fencing tokens."""
        alloc = await self.settler.by_id(validation.allocation_id(alloc_id))
        if alloc is None:
            raise AllocationNotFound(f"allocation {alloc_id} is not live (released, expired or never existed)")
        if by.node is not None:  # an agent reads only its own node's allocations, as seen on its node
            authz.check_node(by, alloc.nodes)
            return alloc.on(by.node)
        else:
            authz.check_owner(by, alloc.principal, f"allocation {alloc_id}")
        return alloc

    async def release(self, alloc_id: str, by: Principal = LOCAL_ADMIN, release_id: str = "") -> int:
        """Revision of the release, or 0 when the allocation was not live (release is idempotent).

        One transaction deletes the allocation's keys and writes its audit entry ("release" by its
        owner, "force-release" by an admin), compared on the allocation's create revision so that
        a release of an allocation that already ended writes nothing. Its request key becomes a
        tombstone (coordinator/tombstones.py): an attempt of the same request still in flight
        somewhere can no longer commit. The lease, which then carries nothing, is revoked in the
        background."""
        # The view usually knows the record, saving a read; a stale one fails the compare.
        alloc = self._view.allocation(validation.allocation_id(alloc_id)) or await self.settler.by_id(alloc_id)
        release_id = validation.release_id(release_id)
        if alloc is None:
            return await self._released_by(alloc_id, release_id, self._view.released_request(alloc_id))
        authz.check_owner(by, alloc.principal, f"allocation {alloc_id}")
        action = "release" if by.id == alloc.principal else "force-release"
        out = await self._end(alloc, [Cmp(self._keys.alloc(alloc.id), "create", "==", alloc.revision)],
                              entry_put(self._keys, by, action, alloc.id, unique=f"{alloc.id}.{action}",
                                        detail=f"owner={alloc.principal or '-'} node={alloc.node}"),
                              release_id)  # fmt: skip
        if not out.succeeded:  # ended meanwhile: by a release (an earlier attempt of this one?) or expiry
            await self._view.wait_for_revision(out.revision, VIEW_WAIT_S)
            return await self._released_by(alloc.id, release_id, alloc.request_id)
        self.settler.revoke_later(alloc.lease_id, alloc.ttl_seconds)
        # Read your writes, as for allocate(): the GPUs show as free once answered.
        await self._view.wait_for_revision(out.revision, VIEW_WAIT_S)
        return out.revision

    async def _released_by(self, alloc_id: str, release_id: str, request_id: str | None) -> int:
        """The revision of the release that ended the allocation when it was an earlier attempt of
        this very call (same release_id, found in its request key's tombstone); else 0. A Release
        sent again after its answer was lost is told "released", not "not live" (fault suite).

        ``request_id`` comes from this replica's view, which may lag (a stalled watch: the
        allocation as it last knew it) or have learned it from the tombstone itself (the view's
        index of released requests, which a reload or a fresh start rebuilds). etcd's tombstone
        decides, and its revision is the release's own (one transaction wrote both). No owner check
        here: the caller proves it is the call that released by naming its random release_id, and
        learns only the revision of a release it made."""
        if not release_id or not request_id:
            return 0
        kv = await self._store.get(self._keys.req(request_id))
        if kv is None or not tombstones.is_tombstone(kv.value) or tombstones.released_id(kv.value) != alloc_id:
            return 0
        return kv.mod_revision if tombstones.release_id(kv.value) == release_id else 0

    async def _end(
        self, alloc: Allocation, compares: builtins.list[Cmp], audit: Op, release_id: str = ""
    ) -> TxnOutcome:
        """Delete an allocation's keys and leave a tombstone in its request key, in one transaction."""
        for _ in range(2):  # a tombstone lease etcd lost (restored from a backup): once more with a new one
            grave = await self._tombstones.lease_for(alloc.ttl_seconds)
            try:
                return await self._store.txn(compares, [audit, *self._delete_ops(alloc, grave, release_id)])
            except LeaseNotFound:
                self._tombstones.forget(grave)
        raise Unavailable("etcd refused the tombstone lease twice; retry the release")

    async def cancel(self, request_id: str, ttl_s: int, by: Principal = LOCAL_ADMIN) -> tuple[str, int]:
        """Give up a request by its id, from any replica: whatever it holds is released, and no attempt
        of it still in flight anywhere can commit afterwards (its request key becomes a tombstone).
        Returns (the allocation released or "", the revision of the tombstone). Idempotent."""
        rid = scoped_request_id(by.id, validation.request_id(request_id))
        # The TTL the request asked for sizes its tombstone: bounded like any TTL (the per-caller
        # rate limit bounds how many a caller can make).
        ttl_s = validation.ttl(ttl_s, self._policy.default_ttl)
        key = self._keys.req(rid)
        for _ in range(8):  # the key moves only when an attempt commits or a release lands
            kv = await self._store.get(key)
            if kv is not None and tombstones.is_tombstone(kv.value):
                return "", kv.mod_revision
            holder = await self.settler.by_id(kv.value.decode()) if kv is not None and kv.value else None
            if holder is not None:
                revision = await self.release(holder.id, by)
                if revision:
                    return holder.id, revision
                continue
            # Nothing holds it (or a settler's block does): the tombstone takes the key as it is now.
            guard = Cmp(key, "mod", "==", kv.mod_revision) if kv is not None else Cmp(key, "version", "==", 0)
            grave = await self._tombstones.lease_for(ttl_s)
            out = await self._store.txn([guard], [Put(key, tombstones.value(""), grave)])
            if out.succeeded:
                return "", out.revision
        raise Conflict(f"request {request_id} kept changing while it was being cancelled; cancel it again")

    def _delete_ops(self, alloc: Allocation, tombstone: int, release_id: str = "") -> builtins.list[Op]:
        # The audit entry's put comes first: a watcher sees it before the deletes (same revision).
        k = self._keys
        req = k.req(alloc.request_id)
        ops: builtins.list[Op] = [Delete(key) for key in k.of_allocation(alloc) if key != req]
        return [*ops, Put(req, tombstones.value(alloc.id, release_id), tombstone), Delete(k.claimed(alloc.id))]

    async def keep_alive(self, alloc_id: str, by: Principal = LOCAL_ADMIN) -> int:
        validation.allocation_id(alloc_id)
        alloc = self._view.allocation(alloc_id) or await self.settler.by_id(alloc_id)
        if alloc is None:
            raise AllocationNotFound(f"allocation {alloc_id} is not live (released, expired or never existed)")
        authz.check_owner(by, alloc.principal, f"allocation {alloc_id}")
        if alloc.max_runtime_s and time.time() * 1000 >= alloc.created_unix_ms + alloc.max_runtime_s * 1000:
            raise RuntimeLimitReached(
                f"allocation {alloc_id} has run for its declared max runtime of {alloc.max_runtime_s}s: its lease "
                f"is no longer renewed and it ends within {alloc.ttl_seconds}s (its TTL)"
            )
        quota, _ = self._view.quota_book().quota_for(alloc.tenant)
        lifetime = quota.max_lifetime_s if quota is not None else 0
        if lifetime and time.time() * 1000 >= alloc.created_unix_ms + lifetime * 1000:
            raise LifetimeReached(
                f"allocation {alloc_id} has reached tenant {alloc.tenant}'s maximum allocation lifetime of "
                f"{lifetime}s: its lease is no longer renewed and it ends within {alloc.ttl_seconds}s (its TTL)"
            )
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
        # With a node: each allocation as seen on that node (a gang's member there).
        return sorted(
            (
                a.on(node) if node else a
                for a in allocs
                if (not node or node in a.nodes) and (not owner or a.owner == owner)
            ),
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


def _same_shape(alloc: Allocation, shape: str) -> Allocation:
    """A request id reused for a different request is refused, never handed the other allocation."""
    if alloc.shape and alloc.shape != shape:
        raise AlreadyExists(
            f"request id {alloc.client_request_id!r} is already used by allocation {alloc.id}, which asked for "
            f"{alloc.shape}; this request asks for {shape}. Use a new request id for a different request"
        )
    return alloc
