"""Commit batching: one etcd transaction in flight per coordinator, carrying every allocation
that queued up while the previous one was in flight.

Why: allocations that land on the same node all compare that node's reservation range, so
concurrent single-allocation transactions from one coordinator would mostly fail each other
(one winner per node per round). Placing the queued requests together on one snapshot and
committing them in one transaction removes those conflicts, and amortises an etcd round trip
over many allocations. Correctness still rests on the compares alone: replicas, each with its
own batcher, race only through etcd.

After a successful commit, the next round waits until the view has seen it, so the next
placement never reuses what was just taken.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from coordinator.batch_placement import place_batch
from coordinator.committer import Committed, Committer, Item, Rejected, txn_size
from coordinator.domain import Allocation, Placement, ResourceRequest, Snapshot
from coordinator.store import LeaseNotFound, OutcomeUnknown
from gpulease.errors import Conflict, GpuLeaseError, InvalidRequest, Unavailable

log = logging.getLogger(__name__)

# (allocation, reused)
Outcome = tuple[Allocation, bool]
Lookup = Callable[[str], Awaitable[Allocation | None]]


class SnapshotSource(Protocol):
    def snapshot(self) -> Snapshot: ...

    async def wait_for_revision(self, revision: int, timeout: float) -> bool: ...


@dataclass(frozen=True)
class BatchPolicy:
    max_rounds: int = 20  # rejected commits one request may take part in before Conflict
    # How long a node where this coordinator lost a commit race stays avoided by every request
    # (while other nodes fit): long enough for replicas to settle on different nodes.
    contested_for: float = 1.0
    max_txn_ops: int = 128  # etcd's default --max-txn-ops
    catch_up_timeout: float = 1.0


@dataclass(eq=False)
class _Pending:
    req: ResourceRequest
    draft: Allocation
    fut: asyncio.Future[Outcome]
    excluded: frozenset[str] = frozenset()
    # Nodes where this request lost a commit race: placed elsewhere while anything else fits.
    avoid: frozenset[str] = frozenset()
    rejections: int = 0
    placement: Placement | None = field(default=None)


class Batcher:
    def __init__(
        self,
        source: SnapshotSource,
        committer: Committer,
        *,
        by_request_id: Lookup,
        by_id: Lookup,
        policy: BatchPolicy = BatchPolicy(),
    ) -> None:
        self._source = source
        self._committer = committer
        self._by_request_id = by_request_id
        self._by_id = by_id
        self._policy = policy
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._contested: dict[str, float] = {}  # node -> until when (loop time) it is avoided
        self.commits = 0  # etcd transactions sent
        self.rejections = 0
        self.committed = 0  # allocations committed

    def submit(self, req: ResourceRequest, draft: Allocation) -> asyncio.Future[Outcome]:
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(req, draft, fut))
        return fut

    async def run(self) -> None:
        carry: list[_Pending] = []
        try:
            while True:
                if not carry:
                    carry.append(await self._queue.get())
                while not self._queue.empty():
                    carry.append(self._queue.get_nowait())
                try:
                    await self._round(carry)
                except Exception as exc:  # a bug must not wedge every later allocation
                    log.exception("commit round failed")
                    for p in carry:
                        _fail(p, exc if isinstance(exc, GpuLeaseError) else Unavailable(f"internal error: {exc}"))
                carry = [p for p in carry if not p.fut.done()]
        finally:
            for p in carry:
                _fail(p, Unavailable("the coordinator is shutting down; retry against another replica"))

    async def _round(self, pending: list[_Pending]) -> None:
        snapshot = self._source.snapshot()
        contested = self._still_contested()
        results = place_batch(snapshot, [(p.req, p.excluded) for p in pending], getattr(self._source, "index", None),
                              [p.avoid | contested for p in pending])  # fmt: skip
        chosen: list[_Pending] = []
        request_ids: set[str] = set()
        for p, result in zip(pending, results, strict=True):
            if isinstance(result, GpuLeaseError):
                # It may not fit *because* this request id already holds its GPUs.
                existing = await self._by_request_id(p.draft.request_id)
                _resolve(p, (existing, True)) if existing else _fail(p, result)
                continue
            p.placement = result
            # Same request id twice in one txn would be a duplicate key: the later one waits a round.
            if p.draft.request_id in request_ids:
                continue
            if txn_size([Item(q.placement, q.draft) for q in (*chosen, p)]) > self._policy.max_txn_ops:  # type: ignore[arg-type]
                if not chosen:
                    _fail(p, InvalidRequest(
                        f"this request needs more than {self._policy.max_txn_ops} etcd operations; "
                        "ask for fewer GPUs per allocation or raise etcd's --max-txn-ops"))  # fmt: skip
                continue
            request_ids.add(p.draft.request_id)
            chosen.append(p)
        if chosen:
            await self._commit(chosen, snapshot)

    async def _commit(self, chosen: list[_Pending], snapshot: Snapshot) -> None:
        items = [Item(p.placement, p.draft) for p in chosen]  # type: ignore[arg-type]
        self.commits += 1
        try:
            result = await self._committer.commit(items, snapshot)
        except OutcomeUnknown as exc:
            # The txn may still commit. The request keys tell; when they are absent, revoking the
            # leases (done by each allocate() on failure) makes a late commit impossible.
            for p in chosen:
                found = await self._by_request_id(p.draft.request_id)
                if found:
                    _resolve(p, (found, found.id != p.draft.id))
                else:
                    _fail(p, exc)
            return
        except LeaseNotFound:
            # Some lease lapsed before the commit (etcd stalled longer than a TTL): start over.
            for p in chosen:
                _fail(p, Conflict("an allocation lease expired before it could commit; retry the request"))
            return
        if isinstance(result, Committed):
            self.committed += len(result.allocations)
            for p, alloc in zip(chosen, result.allocations, strict=True):
                _resolve(p, (alloc, False))
            await self._source.wait_for_revision(result.revision, self._policy.catch_up_timeout)
            return
        assert isinstance(result, Rejected)
        self.rejections += 1
        until = asyncio.get_running_loop().time() + self._policy.contested_for
        self._contested.update(dict.fromkeys(result.conflicted, until))
        for p in chosen:
            holder = result.taken.get(p.draft.request_id)
            if holder:
                existing = await self._by_id(holder)
                if existing:
                    _resolve(p, (existing, True))
                    continue
            if p.placement and p.placement.node in result.unusable:
                p.excluded |= {p.placement.node}
            elif p.placement and p.placement.node in result.conflicted:
                # Best fit sends every replica to the same node; whoever lost there goes to
                # the next best instead of racing for it again (livelock under steady load).
                p.avoid |= {p.placement.node}
            p.rejections += 1
            if p.rejections >= self._policy.max_rounds:
                _fail(p, Conflict(
                    f"gave up after {p.rejections} conflicting commits (heavy contention for the same nodes); "
                    "retry the request"))  # fmt: skip
        await self._source.wait_for_revision(result.revision, self._policy.catch_up_timeout)

    def _still_contested(self) -> frozenset[str]:
        if not self._contested:
            return frozenset()
        now = asyncio.get_running_loop().time()
        self._contested = {node: until for node, until in self._contested.items() if until > now}
        return frozenset(self._contested)


def _resolve(p: _Pending, outcome: Outcome) -> None:
    if not p.fut.done():
        p.fut.set_result(outcome)


def _fail(p: _Pending, exc: BaseException) -> None:
    if not p.fut.done():
        p.fut.set_exception(exc)
