"""The queue's decisions, as a pure function of one snapshot: which pending requests may be
admitted now, and why each of the others waits.

No I/O and no clock (``now_ms`` is an argument), like placement: every replica computes the same
plan from the same snapshot, and the admission transaction re-checks what it relied on (the GPUs,
the node's capacity, and that the pending request still exists).

Ordering (``order``): priority (higher first), then the tenant's fair share (lower decayed usage
per unit of weight first, see coordinator/fair_share.py), then age (older first), then id.

Quotas: a request its tenant's quota does not allow now waits with the quota as its reason, and
does not block its pool (it could not start even on an empty cluster): requests behind it are
planned as if it were not there (Kueue does the same). Pools are GPU models ("" = any model): a
pending request blocks only requests of its own pool; requests of other pools are placed as if it
were not there, except on the GPUs it has reserved.

No starvation (Slurm's backfill with a head reservation): when the first request of a pool does not
fit, it *reserves* the node that frees soonest for it, by the declared runtimes of the allocations
holding it (their ``max_runtime``), with an estimated start T. A request behind it may then be
placed on that node only if it declares a runtime that ends before T; a request with no declared
runtime, or any request when T is unknown (a holder in the way declared none), never is. With
``strict_fifo`` a pool's requests behind a blocked head do not start at all.

Calendar reservations (coordinator/reservations.py): each request is planned on the snapshot as its
tenant may use it now. A request that would fit but for other tenants' reservations waits with the
reservation as its reason ('reserved for team-b until 18:00:00 UTC ...') and, like a request over
its quota, does not block its pool nor reserve a node (it could start elsewhere, or after the window).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

from gpulease.coordinator import reservations as calendar
from gpulease.coordinator.batch_placement import TenantTally, count_placed
from gpulease.coordinator.domain import NodeView, Overlay, PendingRequest, ResourceRequest, Snapshot
from gpulease.coordinator.gang_placement import place_request
from gpulease.coordinator.placement import place
from gpulease.coordinator.preemption_plan import hold_claims
from gpulease.errors import InsufficientResources, Unsatisfiable

# A plan considers at most this many pending requests (Slurm's default_queue_depth is 100): the
# rest wait for a later pass, with a reason that says so. Bounds the cost of one pass.
MAX_DEPTH = 200
# Nodes tried when looking for a head's reservation.
MAX_RESERVATION_CANDIDATES = 256


@dataclass(frozen=True)
class Holder:
    """An allocation in the way of a reservation: what it holds on its node and when it ends at the
    latest by its declared runtime (None: it declared none, so nobody knows)."""

    id: str
    gpu_indexes: frozenset[int]
    cpus: int
    memory_bytes: int
    ends_ms: int | None


@dataclass(frozen=True)
class Admit:
    """Place it now, staying off ``excluded`` (nodes reserved for requests ahead of it)."""

    excluded: frozenset[str] = frozenset()
    position: int = 1


@dataclass(frozen=True)
class Wait:
    reason: str
    position: int
    # When a reservation is made for this request: its node and estimated start (None: unknown).
    reserved_node: str = ""
    estimated_start_ms: int | None = None
    # The first request of its pool that does not fit (not one waiting for its quota or behind
    # another): the one preemption may make room for.
    head: bool = False


Decision = Admit | Wait


@dataclass(frozen=True)
class _Reservation:
    node: str
    for_id: str
    start_ms: int | None


def order(entries: Sequence[PendingRequest], shares: Mapping[str, float]) -> list[PendingRequest]:
    """Queue order: priority, then the tenant's fair share (lower usage per weight first), then age;
    the order a pass walks (FairOrder) when it admits nothing."""
    return list(FairOrder(entries, shares, {}))


class FairOrder:
    """``order``, as the plan consumes it: within a priority level, each next request is the oldest of
    the tenant whose share is lowest *now*, counting what this pass admitted (``admitted`` adds the
    request's GPUs over its tenant's weight). Without that, every GPU freed at once would go to the
    one tenant that was lowest when the pass began."""

    def __init__(self, entries: Sequence[PendingRequest], shares: Mapping[str, float],
                 weights: Mapping[str, float]) -> None:  # fmt: skip
        self._shares = dict(shares)
        self._weights = weights
        self._levels: dict[int, dict[str, list[PendingRequest]]] = {}
        for e in sorted(entries, key=lambda e: (e.created_ms, e.id), reverse=True):  # oldest last: pop()
            self._levels.setdefault(e.priority, {}).setdefault(e.tenant, []).append(e)

    def __iter__(self) -> Iterator[PendingRequest]:
        for priority in sorted(self._levels, reverse=True):
            tenants = self._levels[priority]
            # A heap of tenants by (share, oldest request): only the tenant just yielded can have
            # changed its share (``admitted``) when the consumer asks for the next one.
            heap = [(self._shares.get(t, 0.0), q[-1].created_ms, t) for t, q in tenants.items()]
            heapq.heapify(heap)
            while heap:
                _, _, tenant = heapq.heappop(heap)
                waiting = tenants[tenant]
                yield waiting.pop()
                if waiting:
                    heapq.heappush(heap, (self._shares.get(tenant, 0.0), waiting[-1].created_ms, tenant))

    def admitted(self, e: PendingRequest) -> None:
        self._shares[e.tenant] = self._shares.get(e.tenant, 0.0) + e.req.gpus / self._weights.get(e.tenant, 1.0)


def ends_ms(created_ms: int, max_runtime_s: int, ttl_s: int) -> int | None:
    """The latest an allocation can live with a declared runtime: its lease is not renewed past
    created + max_runtime, so it lapses at most one TTL later."""
    if max_runtime_s <= 0:
        return None
    return created_ms + (max_runtime_s + ttl_s) * 1000


def plan(
    snapshot: Snapshot,
    entries: Sequence[PendingRequest],
    *,
    now_ms: int,
    shares: Mapping[str, float] | None = None,
    weights: Mapping[str, float] | None = None,
    holders: Callable[[str], Sequence[Holder]] = lambda _node: (),
    strict_fifo: bool = False,
    claims: Mapping[str, frozenset[tuple[str, int]]] | None = None,
) -> dict[str, Decision]:
    """A decision per pending request id. Requests admitted earlier in the pass are counted on
    an overlay, so two admitted requests never need the same GPUs.

    ``claims``: pending id -> the (node, GPU index) pairs a preemption freed for it. Every other
    request plans as if they were held, and stays off their nodes (so that the commit, which
    places on the plain snapshot, cannot take them either)."""
    claims = claims or {}
    claimed_all = frozenset(pair for pairs in claims.values() for pair in pairs)
    base = snapshot
    shares = shares or {}
    tally = TenantTally(snapshot)
    book = snapshot.reservations  # with the pass's admissions counted as their tenants' holdings
    out: dict[str, Decision] = {}
    changed: dict[str, NodeView] = {}
    reservations: list[_Reservation] = []
    blocked: dict[str, str] = {}  # pool -> the id of its blocked head
    positions: dict[str, int] = {}
    admitted: list[PendingRequest] = []
    # Requests alike (same shape, tenant and priority) planned in the same state (nothing admitted
    # or reserved since, same nodes off limits) fail alike: the reason is worked out once. A full
    # cluster with 1,000 one-GPU requests waiting costs one placement per shape, not 1,000.
    failed: dict[tuple[object, ...], tuple[bool, str]] = {}
    fair = FairOrder(entries, shares, weights or {})
    for depth, e in enumerate(fair):
        positions[e.pool] = position = positions.get(e.pool, 0) + 1
        if depth >= MAX_DEPTH:
            out[e.id] = Wait(f"position {position} in the queue, beyond the {MAX_DEPTH} requests one pass "
                             "considers", position)  # fmt: skip
            continue
        if strict_fifo and e.pool in blocked:
            out[e.id] = Wait(f"behind request {blocked[e.pool]} (strict FIFO in pool {_pool(e.pool)})", position)
            continue
        own = claims.get(e.id, frozenset())
        held = claimed_all - own
        excluded = frozenset(r.node for r in reservations if not _ends_before(e, r, now_ms))
        if held:
            excluded |= frozenset(node for node, _ in held)
        memo = (_req_key(e.req), e.tenant, e.priority, excluded, held, len(admitted), len(reservations))
        known = failed.get(memo) if not own else None
        if known is not None and (known[0] or e.pool in blocked):
            out[e.id] = Wait(known[1], position)
            continue
        over = tally.before(e.tenant, e.req)
        if over is not None:
            failed[memo] = (True, over)
            out[e.id] = Wait(over, position)
            continue
        snapshot = hold_claims(base, held) if held else base
        snapshot = replace(snapshot, reservations=book)
        unreserved = replace(snapshot, nodes=Overlay(snapshot.nodes, changed, excluded))
        view = calendar.visible_to(unreserved, e.tenant, now_ms)
        try:
            p = place_request(view, e.req)
        except (InsufficientResources, Unsatisfiable) as exc:
            if view is not unreserved and _fits(unreserved, {}, e):  # only other tenants' reservations are in the way
                why = calendar.reason(unreserved, e.tenant, now_ms) or exc.message
                failed[memo] = (True, why)
                out[e.id] = Wait(why, position)
                continue
            reason = _why(snapshot, changed, e, exc, reservations, admitted, now_ms)
            failed[memo] = (False, reason)
            if e.pool in blocked:
                out[e.id] = Wait(reason, position)
                continue
            blocked[e.pool] = e.id
            taken = frozenset(r.node for r in reservations)
            seen_all = calendar.visible_to(replace(snapshot, nodes=Overlay(snapshot.nodes, changed, frozenset())),
                                           e.tenant, now_ms)  # fmt: skip
            held_for = _reserve(seen_all, {}, e, holders, taken, now_ms)
            if not held_for:
                out[e.id] = Wait(reason, position, head=True)
                continue
            reservations.extend(held_for)
            res = held_for[0]
            eta = f"estimated start {_clock(res.start_ms)} (an estimate from declared runtimes)" if res.start_ms \
                else "no estimated start (allocations in the way declared no runtime)"  # fmt: skip
            where = ", ".join(r.node for r in held_for)
            verb = "is" if len(held_for) == 1 else "are"
            out[e.id] = Wait(f"{reason}; {where} {verb} reserved for it, {eta}", position, res.node, res.start_ms,
                             head=True)  # fmt: skip
            continue
        over = tally.after(e.tenant, p, e.req)
        if over is not None:
            out[e.id] = Wait(over, position)
            continue
        tally.add(e.tenant, p, e.req)
        for m in p.members:
            book = book.plus(m.node, e.tenant, len(m.gpu_indexes))
        count_placed(snapshot.nodes, changed, p, e.req)
        out[e.id] = Admit(excluded, position)
        admitted.append(e)
        fair.admitted(e)
    return out


def _req_key(r: ResourceRequest) -> tuple[object, ...]:
    """What placement and the quota rule look at in a request, as a cheap hashable key."""
    selector = tuple(sorted(r.node_selector.items())) if r.node_selector else ()
    return (r.gpus, r.cpus, r.memory_bytes, r.gpu_model, r.min_gpu_memory_bytes, selector, r.nodes, r.same_label)


def _ends_before(e: PendingRequest, r: _Reservation, now_ms: int) -> bool:
    """May e backfill into r's node: it declares a runtime that ends before r's known start."""
    if r.start_ms is None:
        return False
    end = ends_ms(now_ms, e.max_runtime_s, e.ttl_s)
    return end is not None and end <= r.start_ms


def _why(
    snapshot: Snapshot,
    changed: Mapping[str, NodeView],
    e: PendingRequest,
    exc: InsufficientResources | Unsatisfiable,
    reservations: Sequence[_Reservation],
    ahead: Sequence[PendingRequest],
    now_ms: int = 0,
) -> str:
    """The most specific reason: requests ahead of it taking what it needs, a reservation in the
    way (another tenant's calendar reservation, or a queue head's), or what placement says is short."""
    if not _fits(snapshot, {}, e):
        return exc.message.removesuffix("; retry later or release allocations")
    alone = calendar.visible_to(snapshot, e.tenant, now_ms)
    if alone is not snapshot and not _fits(alone, {}, e):
        return calendar.reason(snapshot, e.tenant, now_ms) or exc.message
    if not _fits(snapshot, changed, e):
        higher = sum(1 for a in ahead if a.priority > e.priority)
        return (f"behind {len(ahead)} request(s) admitted ahead of it ({higher} of higher priority)"
                if higher else f"behind {len(ahead)} earlier request(s) admitted ahead of it")  # fmt: skip
    r = reservations[0]
    if r.start_ms is None:
        return f"held for request {r.for_id} (starvation protection): {r.node} is reserved for it"
    return (f"held for request {r.for_id} (starvation protection): {r.node} is reserved for it from "
            f"{_clock(r.start_ms)}; a max runtime ending before then would let it start now")  # fmt: skip


def _fits(snapshot: Snapshot, changed: Mapping[str, NodeView], e: PendingRequest) -> bool:
    try:
        nodes = Overlay(snapshot.nodes, changed, frozenset()) if changed else snapshot.nodes
        place_request(Snapshot(snapshot.revision, nodes), e.req)
    except (InsufficientResources, Unsatisfiable):
        return False
    return True


def _reserve(
    snapshot: Snapshot,
    changed: Mapping[str, NodeView],
    e: PendingRequest,
    holders: Callable[[str], Sequence[Holder]],
    taken: frozenset[str],
    now_ms: int,
) -> list[_Reservation]:
    """The node where e could start soonest once the allocations in its way end (by their declared
    runtimes), and when; a gang's N such nodes (sharing its same_label value), all from the start of
    the last of them; empty if no schedulable nodes could ever hold it."""
    member = e.req.per_node()
    starts: list[tuple[int, str, str]] = []  # (start, node, its same_label value)
    tried = 0
    for name in sorted(snapshot.nodes):
        if name in taken:
            continue
        view = changed.get(name) or snapshot.nodes[name]
        if not view.schedulable or len(view.usable_gpus) < member.gpus:
            continue
        group = view.info.labels.get(e.req.same_label) if e.req.same_label else ""
        if group is None:
            continue
        tried += 1
        if tried > MAX_RESERVATION_CANDIDATES:
            break
        start = _start_on(view, e, holders(name), snapshot.revision, now_ms)
        if start is not None:
            starts.append((start, name, group))
    best: tuple[int, list[str]] | None = None
    for group in sorted({g for _, _, g in starts}):
        soonest = sorted((s, n) for s, n, g in starts if g == group)[: e.req.nodes]
        if len(soonest) < e.req.nodes:
            continue
        key = (soonest[-1][0], [n for _, n in soonest])  # a gang starts when its last node frees
        if best is None or key[0] < best[0]:
            best = key
    if best is None:
        return []
    start, nodes = best
    return [_Reservation(node, e.id, None if start == _NEVER else start) for node in nodes]


_NEVER = 2**62


def _start_on(view: NodeView, e: PendingRequest, in_way: Sequence[Holder], revision: int, now_ms: int) -> int | None:
    """When e (one member, for a gang) fits on this node once holders end, soonest first (_NEVER when one
    of them declared no runtime); None when it never fits there, even empty."""
    ordered = sorted(in_way, key=lambda h: (h.ends_ms is None, h.ends_ms or 0, h.id))
    held, cpus, memory = set(view.gpus_held), view.cpus_used, view.memory_used
    start = now_ms
    for h in [None, *ordered]:
        if h is not None:
            held -= h.gpu_indexes
            cpus, memory = cpus - h.cpus, memory - h.memory_bytes
            start = _NEVER if h.ends_ms is None else max(start, h.ends_ms)
        trial = replace(view, gpus_held=frozenset(held), cpus_used=max(0, cpus), memory_used=max(0, memory))
        try:
            place(Snapshot(revision, {view.name: trial}), e.req.per_node())
        except (InsufficientResources, Unsatisfiable):
            continue
        return start
    return None


def _pool(pool: str) -> str:
    return repr(pool) if pool else "'any model'"


def _clock(ms: int) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(ms / 1000))
