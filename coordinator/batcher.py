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
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from gpulease.coordinator import tombstones
from gpulease.coordinator.batch_placement import check_batch, place_batch
from gpulease.coordinator.committer import Committed, Committer, Item, Rejected, txn_size
from gpulease.coordinator.domain import Allocation, Placement, ResourceRequest, Snapshot
from gpulease.coordinator.placement_index import PlacementIndex
from gpulease.coordinator.store import LeaseNotFound, OutcomeUnknown
from gpulease.errors import Conflict, GpuLeaseError, InvalidRequest, Unavailable

log = logging.getLogger(__name__)

# (allocation, reused)
Outcome = tuple[Allocation, bool]
Lookup = Callable[[str], Awaitable[Allocation | None]]
# An allocation handed to a retry is first claimed (see coordinator/settle.py); None: it ended.
Claim = Callable[[Allocation], Awaitable[Allocation | None]]
# The final outcome of a draft whose commit is in doubt (Settler.decide); raises while in doubt.
Decide = Callable[[Allocation], Awaitable[Allocation | None]]


class InDoubt(Unavailable):
    """The commit may or may not have happened and etcd did not say within the settle timeout.
    The caller must hand the draft to the settler, never revoke its lease blindly: a retry may
    already hold the allocation."""


class LeftQueue(Conflict):
    """A pending request was no longer in the queue when its admission was committed."""


class SnapshotSource(Protocol):
    @property
    def index(self) -> PlacementIndex | None:
        """Kept in step with snapshot(); None: place by the pure scan alone."""

    def snapshot(self) -> Snapshot: ...

    async def wait_for_revision(self, revision: int, timeout: float) -> bool: ...

    async def caught_up(self, revision: int, timeout: float) -> bool: ...


@dataclass(frozen=True)
class BatchPolicy:
    max_rounds: int = 20  # rejected commits one request may take part in before Conflict
    # How long a node where this coordinator lost a commit race stays avoided by every request
    # (while other nodes fit): long enough for replicas to settle on different nodes.
    contested_for: float = 1.0
    max_txn_ops: int = 128  # etcd's default --max-txn-ops
    catch_up_timeout: float = 1.0
    # How long an in-doubt commit is settled before the caller hears UNAVAILABLE (and the
    # settler takes over in the background).
    settle_timeout: float = 5.0


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
    # Admits the pending request queue/<draft.id> (see committer.Item.queued).
    queued: bool = False


class Batcher:
    def __init__(
        self,
        source: SnapshotSource,
        committer: Committer,
        *,
        by_request_id: Lookup,
        by_id: Lookup,
        claim: Claim,
        decide: Decide,
        policy: BatchPolicy = BatchPolicy(),
    ) -> None:
        self._source = source
        self._committer = committer
        self._by_request_id = by_request_id
        self._by_id = by_id
        self._claim = claim
        self._decide = decide
        self._policy = policy
        # Request ids queued or in a commit here: a twin arriving meanwhile joins the queue
        # instead of being answered from a view that does not show the twin yet.
        self._request_ids: dict[str, int] = {}
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._contested: dict[str, float] = {}  # node -> until when (loop time) it is avoided
        self.commits = 0  # etcd transactions sent
        self.rejections = 0
        self.committed = 0  # allocations committed

    def submit(
        self, req: ResourceRequest, draft: Allocation, excluded: frozenset[str] = frozenset(), queued: bool = False
    ) -> asyncio.Future[Outcome]:
        """Place and commit ``draft``, never on ``excluded`` nodes (reserved for requests ahead of it
        in the queue); ``queued``: it admits the pending request of the same id."""
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        rid = draft.request_id
        self._request_ids[rid] = self._request_ids.get(rid, 0) + 1
        fut.add_done_callback(lambda _: self._forget(rid))
        self._queue.put_nowait(_Pending(req, draft, fut, excluded=excluded, queued=queued))
        return fut

    def has_request(self, request_id: str) -> bool:
        return request_id in self._request_ids

    def _forget(self, request_id: str) -> None:
        left = self._request_ids.get(request_id, 0) - 1
        if left > 0:
            self._request_ids[request_id] = left
        else:
            self._request_ids.pop(request_id, None)

    async def _reuse(self, existing: Allocation | None) -> Allocation | None:
        return await self._claim(existing) if existing else None

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
                    # It may have failed after its transaction was sent: settle, never revoke blindly.
                    for p in carry:
                        _fail(p, InDoubt(f"internal error in a commit round ({exc}); retry with the same request id"))
                carry = [p for p in carry if not p.fut.done()]
        finally:
            for p in carry:
                _fail(p, Unavailable("the coordinator is shutting down; retry against another replica"))

    async def _round(self, pending: list[_Pending]) -> None:
        # One member per request id per round, chosen before placement: a twin placed in the same
        # round would take capacity from the overlay, fail, and find no committed allocation under
        # its id (issue 11, defect 4). It waits a round and then gets its twin's allocation.
        request_ids: set[str] = set()
        candidates: list[_Pending] = []
        for p in pending:
            if p.draft.request_id not in request_ids:
                request_ids.add(p.draft.request_id)
                candidates.append(p)
        snapshot = self._source.snapshot()
        contested = self._still_contested()
        results = place_batch(snapshot, [(p.req, p.excluded) for p in candidates],
                              self._source.index,
                              [p.avoid | contested for p in candidates],
                              [p.draft.tenant for p in candidates],
                              now_ms=int(time.time() * 1000))  # fmt: skip
        chosen: list[_Pending] = []
        failed: list[tuple[_Pending, GpuLeaseError]] = []
        for p, result in zip(candidates, results, strict=True):
            if isinstance(result, GpuLeaseError):
                failed.append((p, result))
                continue
            items = [Item(q.placement, q.draft, q.queued) for q in chosen if q.placement]
            items.append(Item(result, p.draft, p.queued))
            if txn_size(items) > self._policy.max_txn_ops:
                if not chosen:
                    _fail(p, InvalidRequest(
                        f"this request needs more than {self._policy.max_txn_ops} etcd operations; "
                        "ask for fewer GPUs per allocation or raise etcd's --max-txn-ops"))  # fmt: skip
                    continue
                # Stop here: this member and every later one wait a round. Later members were placed
                # on an overlay that counted this one, so their results (fits and failures alike)
                # are discarded rather than acted on.
                break
            p.placement = result
            chosen.append(p)
        try:
            # Here, before any await: the snapshot's node map is the view's own, which moves on
            # while this coroutine waits (the commit's compares, not the map, pin what was placed).
            check_batch(snapshot, [(p.placement, p.req) for p in chosen])  # type: ignore[misc]
        except AssertionError as exc:  # nothing was sent: these requests fail, nothing is held
            log.error("invariant broken, commit not sent: %s", exc)
            for p in chosen:
                _fail(p, Unavailable(f"internal error (nothing was allocated): {exc}; retry the request"))
            chosen = []
        for p, err in failed:
            # It may not fit *because* this request id already holds its GPUs.
            existing = await self._reuse(await self._by_request_id(p.draft.request_id))
            _resolve(p, (existing, True)) if existing else _fail(p, err)
        if chosen:
            await self._commit(chosen, snapshot)

    async def _commit(self, chosen: list[_Pending], snapshot: Snapshot) -> None:
        items = [Item(p.placement, p.draft, p.queued) for p in chosen]  # type: ignore[arg-type]
        self.commits += 1
        try:
            result = await self._committer.commit(items, snapshot)
        except OutcomeUnknown as exc:
            # The txn may have committed, or may still commit: settle each member before answering.
            await self._settle_in_doubt(chosen, exc)
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
            if p.draft.id in result.left_queue:
                _fail(p, LeftQueue(f"pending request {p.draft.id} is no longer in the queue (it timed out, or its "
                                   "client left and its waiting lease lapsed)"))  # fmt: skip
                continue
            holder = result.taken.get(p.draft.request_id)
            if holder is not None and tombstones.is_tombstone(holder.encode()):
                _fail(p, tombstones.released(p.draft.client_request_id))
                continue
            if holder:
                existing = await self._reuse(await self._by_id(holder))
                if existing:
                    _resolve(p, (existing, True))
                    continue
            placed = frozenset(p.placement.nodes) if p.placement else frozenset()
            if placed & result.unusable:
                p.excluded |= placed & result.unusable
            elif placed & result.conflicted:
                # Best fit sends every replica to the same node; whoever lost there goes to
                # the next best instead of racing for it again (livelock under steady load).
                p.avoid |= placed & result.conflicted
            p.rejections += 1
            if p.rejections >= self._policy.max_rounds:
                _fail(p, Conflict(
                    f"gave up after {p.rejections} conflicting commits (heavy contention for the same nodes); "
                    "retry the request"))  # fmt: skip
        # Whatever failed a compare is at or below the answer's revision, but there may be no event
        # under the prefix at that revision (a foreign write): caught_up() proves it with a marker.
        await self._source.caught_up(result.revision, self._policy.catch_up_timeout)

    async def _settle_in_doubt(self, chosen: list[_Pending], cause: OutcomeUnknown) -> None:
        """Answer each member of an in-doubt commit with its final outcome, asking etcd again (with
        backoff) for up to settle_timeout; members still in doubt then fail with InDoubt."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._policy.settle_timeout
        delay = 0.05
        waiting = list(chosen)
        while True:
            still: list[_Pending] = []
            for p in waiting:
                try:
                    async with asyncio.timeout(max(0.05, deadline - loop.time())):
                        holder = await self._decide(p.draft)
                        if holder is not None and holder.id != p.draft.id:
                            holder = await self._reuse(holder)
                            if holder is None:  # the other allocation ended meanwhile: decide again
                                still.append(p)
                                continue
                except (TimeoutError, GpuLeaseError) as exc:
                    log.debug("in-doubt allocation %s not settled yet: %s", p.draft.id, exc)
                    still.append(p)
                    continue
                if holder is None:
                    _fail(p, Unavailable(f"{cause.message}; nothing was allocated, retry the request"))
                else:
                    _resolve(p, (holder, holder.id != p.draft.id))
            waiting = still
            if not waiting or loop.time() + delay >= deadline:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        for p in waiting:
            _fail(p, InDoubt(
                f"{cause.message}; whether the allocation was made is not known yet: retry with the same "
                "request id (an allocation nobody takes is released)"))  # fmt: skip

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
