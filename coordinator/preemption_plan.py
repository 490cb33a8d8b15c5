"""Preemption's decision, as a pure function of one snapshot: which running allocations to stop so
that one pending request can start, on which node, and why (issue 15, preemption part 1).

No I/O and no clock (``now_ms`` is an argument), like placement and the queue plan. Stopping the
victims (SIGTERM, grace, SIGKILL), recording ``Preempted(by, cause)`` and re-queueing them is the
caller's.

Inputs
    ``snapshot``: the cluster; ``request``: the preemptor; ``allocations``: *every* live allocation
    the quotas count (one ``Candidate`` each, the protected ones too: they count toward their
    tenant's usage and decide which allocations are borrowed); ``nominal``: tenant -> nominal GPU
    quota (a tenant absent from it has no quota: it never borrows and never reclaims; an operator
    who wants "all borrowed" gives it 0); ``claimed``: (node, GPU index) pairs already held for
    other preemptors (``claimed_gpus`` of their plans), which count as taken.

Borrowed
    A tenant's allocations are counted oldest first (``created_ms``, then id); an allocation whose
    running total passes the tenant's nominal quota is *borrowed* (it holds GPUs beyond nominal,
    at least in part); the others are *guaranteed*. Since new allocations are younger than the ones
    running, a guaranteed allocation stays guaranteed for as long as it lives (quotas unchanged).

Who may be chosen (a victim)
    Never: an allocation that is not ``preemptible``, or has run less than its ``min_runtime_s``.
    Cause ``priority``: strictly lower priority than the request, and either of the request's own
    tenant, or of another tenant and borrowed (or of a tenant without quota) while the request's
    tenant stays within its nominal quota with the request's GPUs (or has no quota). Another
    tenant's guaranteed GPUs are never taken by priority, and a tenant borrowing cannot take
    another tenant's work by priority (Kueue's default, ``borrowWithinCohort: Never``).
    Cause ``reclaim``: the request asks for GPUs, its tenant has a quota and stays within it with
    them (used + asked <= nominal), and the victim is a borrowed allocation of another tenant
    (which is therefore above its nominal quota before), whatever its priority.
    Cause ``fair-share``: reserved for a later part; never chosen now.
    One preemption has one cause: all its victims qualify for it.

No cycles
    If allocation X preempted Y, Y's re-queued request (same priority and tenant) can never
    preempt X: for ``priority``, X's priority is higher than Y's; if X's tenant differs from Y's,
    X was admitted within its quota (guaranteed, so forever guaranteed: neither reclaimable nor
    taken by another tenant's priority) or its tenant has no quota (never borrowed). For
    ``reclaim``, X was admitted within its quota likewise. This holds while allocations are
    created with increasing ``created_ms`` and quotas do not change; a property test simulates it.

Picking victims (Kueue's)
    Per node and cause, the candidates are ordered borrowed first, then lowest priority, then
    youngest, then id, and taken in that order until the request fits on that node (placement's
    own fit rule, ``place`` on the node with the victims' GPUs, CPUs and memory given back); then a
    reverse pass drops every victim without which it still fits, so no victim of the result is
    superfluous. All victims are on the node the request will run on. Among nodes (and the two
    causes) the cheapest plan wins: lowest highest-victim priority, then fewest victims, then fewest
    GPUs stopped, then least work lost (sum of victims' run times), then ``reclaim`` before
    ``priority``, then node name.

Reserved for the preemptor (contract)
    ``Preemption.gpu_indexes`` are the GPUs the preemptor will take on ``Preemption.node``
    (placement's choice there once the victims are gone). From the decision until the preemptor's
    allocation commits (or its pending request leaves the queue), the caller keeps them claimed:
    every other plan must see them as held (``hold_claims(snapshot, claimed_gpus(p))``; the queue
    plan for everyone else, and ``plan_preemption(..., claimed=...)`` for other preemptors), so
    that a re-queued victim or a request behind cannot take them back (Kueue #13662). Only the GPUs
    are claimed: the victims' CPUs and memory are not held; the admission's commit re-checks them.
    The preemptor's own claim is not passed when planning for the preemptor itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from gpulease.coordinator.domain import NodeView, Overlay, PendingRequest, ResourceRequest, Snapshot
from gpulease.coordinator.placement import place
from gpulease.errors import InsufficientResources, Unsatisfiable

__all__ = [
    "Candidate",
    "Cause",
    "NoPreemption",
    "Preemption",
    "PreemptionDecision",
    "borrowed_ids",
    "claimed_gpus",
    "hold_claims",
    "plan_preemption",
    "tenant_usage",
]


class Cause(StrEnum):
    PRIORITY = "priority"
    RECLAIM = "reclaim"
    # Not decided yet (a later part of issue 15): plan_preemption never returns it.
    FAIR_SHARE = "fair-share"


@dataclass(frozen=True)
class Candidate:
    """A live allocation as preemption sees it."""

    alloc_id: str
    node: str
    gpus: frozenset[int]  # GPU indexes on its node
    cpus: int
    memory_bytes: int
    tenant: str
    priority: int
    preemptible: bool
    created_ms: int
    # Its class's minimum runtime: it is not chosen before created_ms + min_runtime_s.
    min_runtime_s: int = 0


@dataclass(frozen=True)
class Preemption:
    """Stop ``victims`` (allocation ids, on ``node``) for ``cause``; the preemptor then takes
    ``gpu_indexes`` on ``node``, claimed for it until it commits."""

    node: str
    victims: tuple[str, ...]
    cause: Cause
    gpu_indexes: tuple[int, ...]


@dataclass(frozen=True)
class NoPreemption:
    reason: str


PreemptionDecision = Preemption | NoPreemption


def tenant_usage(allocations: Iterable[Candidate]) -> dict[str, int]:
    """GPUs held per tenant."""
    used: dict[str, int] = {}
    for a in allocations:
        used[a.tenant] = used.get(a.tenant, 0) + len(a.gpus)
    return used


def borrowed_ids(allocations: Iterable[Candidate], nominal: Mapping[str, int]) -> frozenset[str]:
    """Ids of the borrowed allocations: counted oldest first per tenant with a quota, those whose
    running total of GPUs passes the tenant's nominal quota."""
    by_tenant: dict[str, list[Candidate]] = {}
    for a in allocations:
        if a.tenant in nominal:
            by_tenant.setdefault(a.tenant, []).append(a)
    out: set[str] = set()
    for tenant, allocs in by_tenant.items():
        total = 0
        for a in sorted(allocs, key=lambda a: (a.created_ms, a.alloc_id)):
            total += len(a.gpus)
            if total > nominal[tenant]:
                out.add(a.alloc_id)
    return frozenset(out)


def claimed_gpus(p: Preemption) -> frozenset[tuple[str, int]]:
    """The (node, GPU index) pairs held for p's preemptor until it commits."""
    return frozenset((p.node, i) for i in p.gpu_indexes)


def hold_claims(snapshot: Snapshot, claims: Iterable[tuple[str, int]]) -> Snapshot:
    """``snapshot`` with the claimed GPUs counted as held (nodes the snapshot lacks are ignored)."""
    per_node: dict[str, set[int]] = {}
    for node, index in claims:
        if node in snapshot.nodes:
            per_node.setdefault(node, set()).add(index)
    if not per_node:
        return snapshot
    changed = {
        node: replace(snapshot.nodes[node], gpus_held=snapshot.nodes[node].gpus_held | frozenset(indexes))
        for node, indexes in per_node.items()
    }
    # replace(): the snapshot's other fields (its revision, the quota book) stay as they are.
    return replace(snapshot, nodes=Overlay(snapshot.nodes, changed, frozenset()))


@dataclass(frozen=True)
class _Plan:
    key: tuple[int, int, int, int, int, str]
    preemption: Preemption


_CAUSE_RANK = {Cause.RECLAIM: 0, Cause.PRIORITY: 1}


def plan_preemption(
    snapshot: Snapshot,
    request: PendingRequest,
    allocations: Sequence[Candidate],
    *,
    now_ms: int,
    nominal: Mapping[str, int] | None = None,
    claimed: Iterable[tuple[str, int]] = (),
) -> PreemptionDecision:
    """The cheapest preemption that lets ``request`` start on one node, or why there is none.

    See the module docstring for the rules. ``NoPreemption`` also when the request fits without
    preempting anything (say where), so a caller never stops work for nothing."""
    nominal = nominal or {}
    req = request.req
    held_for_others = frozenset(claimed)
    view = hold_claims(snapshot, held_for_others)
    try:
        p = place(view, req)
    except (InsufficientResources, Unsatisfiable):
        pass
    else:
        return NoPreemption(f"fits without preemption (on {p.node})")

    used = tenant_usage(allocations)
    borrowed = borrowed_ids(allocations, nominal)
    tenant = request.tenant
    # The request's tenant stays within its quota with the request's GPUs (or has no quota).
    within_after = tenant not in nominal or used.get(tenant, 0) + req.gpus <= nominal[tenant]
    may_reclaim = req.gpus > 0 and tenant in nominal and within_after

    # Who each cause may choose, per node; and, among those a cause would want, what protects the
    # others (to explain a refusal).
    eligible: dict[tuple[Cause, str], list[Candidate]] = {}
    t_not_preemptible = t_young = t_guaranteed = t_cross_blocked = 0
    for a in allocations:
        if a.node not in view.nodes:
            continue
        other = a.tenant != tenant
        lower = a.priority < request.priority
        reclaimable = may_reclaim and other and a.alloc_id in borrowed
        if not lower and not reclaimable:
            continue
        if not a.preemptible:
            t_not_preemptible += 1
            continue
        if now_ms - a.created_ms < a.min_runtime_s * 1000:
            t_young += 1
            continue
        if reclaimable:
            eligible.setdefault((Cause.RECLAIM, a.node), []).append(a)
        if lower:
            guaranteed = a.tenant in nominal and a.alloc_id not in borrowed
            if not other or (not guaranteed and within_after):
                eligible.setdefault((Cause.PRIORITY, a.node), []).append(a)
            elif guaranteed:
                t_guaranteed += 1
            else:
                t_cross_blocked += 1

    claims: dict[str, set[int]] = {}
    for node_name, index in held_for_others:
        claims.setdefault(node_name, set()).add(index)
    best: _Plan | None = None
    for (cause, node), cands in sorted(eligible.items(), key=lambda kv: (kv[0][1], _CAUSE_RANK[kv[0][0]])):
        if best is not None and best.key[:2] < (min(c.priority for c in cands), 1):
            continue  # no plan here can beat it: it would stop at least one of these
        fit = _Fit(snapshot.revision, snapshot.nodes[node], frozenset(claims.get(node, ())), req)
        plan = _plan_on(fit, cause, cands, borrowed, now_ms)
        if plan is not None and (best is None or plan.key < best.key):
            best = plan
    if best is not None:
        return best.preemption
    return NoPreemption(
        _why_not(request, may_reclaim, t_not_preemptible, t_young, t_guaranteed, t_cross_blocked, used, nominal)
    )


@dataclass(frozen=True)
class _Fit:
    """Whether req fits on one node once some victims are gone (placement's rule, on that node
    alone), with the GPUs claimed for other preemptors held even when a victim holds them."""

    revision: int
    node: NodeView
    claimed: frozenset[int]
    req: ResourceRequest

    def gpus(self, victims: Sequence[Candidate]) -> tuple[int, ...] | None:
        """The GPUs placement would give req on the node; None if it does not fit."""
        node = self.node
        freed = frozenset(i for v in victims for i in v.gpus)
        trial = replace(
            node,
            gpus_held=(node.gpus_held - freed) | self.claimed,
            cpus_used=max(0, node.cpus_used - sum(v.cpus for v in victims)),
            memory_used=max(0, node.memory_used - sum(v.memory_bytes for v in victims)),
        )
        try:
            p = place(Snapshot(self.revision, {node.name: trial}), self.req)
        except (InsufficientResources, Unsatisfiable):
            return None
        return p.gpu_indexes


def _plan_on(
    fit: _Fit, cause: Cause, cands: Sequence[Candidate], borrowed: frozenset[str], now_ms: int
) -> _Plan | None:
    """Greedy in preference order until it fits, then drop every victim not needed (reverse pass)."""
    ordered = sorted(cands, key=lambda a: (a.alloc_id not in borrowed, a.priority, -a.created_ms, a.alloc_id))
    if fit.gpus(ordered) is None:
        return None  # not even with all of them gone
    victims: list[Candidate] = []
    for a in ordered:
        victims.append(a)
        if fit.gpus(victims) is not None:
            break
    # The last one taken is needed (the others alone did not fit); placement's fit is monotone in
    # what is freed, so a victim kept here is needed in the final set too.
    for a in reversed(victims[:-1]):
        rest = [v for v in victims if v is not a]
        if fit.gpus(rest) is not None:
            victims = rest
    gpu_indexes = fit.gpus(victims)
    assert gpu_indexes is not None  # the greedy loop stops at a fit; the reverse pass keeps one
    key = (
        max(v.priority for v in victims),
        len(victims),
        sum(len(v.gpus) for v in victims),
        sum(max(0, now_ms - v.created_ms) for v in victims),
        _CAUSE_RANK[cause],
        fit.node.name,
    )
    ids = tuple(sorted(v.alloc_id for v in victims))
    return _Plan(key, Preemption(fit.node.name, ids, cause, gpu_indexes))


def _why_not(
    request: PendingRequest,
    may_reclaim: bool,
    not_preemptible: int,
    young: int,
    guaranteed: int,
    cross_blocked: int,
    used: Mapping[str, int],
    nominal: Mapping[str, int],
) -> str:
    req = request.req
    whom = "no preemptible allocation of lower priority"
    if may_reclaim:
        whom += " and none borrowed by another tenant"
    head = f"{whom} frees room for {_what(req)} on one node"
    protected = []
    if not_preemptible:
        protected.append(f"{not_preemptible} not preemptible")
    if young:
        protected.append(f"{young} within their minimum runtime")
    if guaranteed:
        protected.append(f"{guaranteed} within their tenant's nominal quota")
    if cross_blocked:
        t = request.tenant
        protected.append(
            f"{cross_blocked} of other tenants, while tenant '{t}' would exceed its nominal quota "
            f"({used.get(t, 0)} + {req.gpus} > {nominal.get(t, 0)} GPUs)"
        )
    return f"{head} (protected: {', '.join(protected)})" if protected else head


def _what(req: ResourceRequest) -> str:
    parts = [f"{req.gpus} GPU{'' if req.gpus == 1 else 's'}"]
    if req.gpu_model:
        parts[0] += f" of model '{req.gpu_model}'"
    parts.append(f"{req.cpus} CPU{'' if req.cpus == 1 else 's'}")
    gib, rest = divmod(req.memory_bytes, 1 << 30)
    parts.append(f"{gib} GiB of memory" if not rest else f"{req.memory_bytes} bytes of memory")
    return ", ".join(parts)
