"""Placement of several requests at once, still a pure function of one snapshot.

Each request is placed on the snapshot as updated by the requests placed before it, so one
etcd transaction can commit the whole batch without two of its allocations overlapping.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import replace

from gpulease.coordinator import reservations
from gpulease.coordinator.domain import (
    NodeView,
    Overlay,
    Placement,
    ResourceRequest,
    Snapshot,
    placed_usage,
    request_usage,
)
from gpulease.coordinator.gang_placement import place_gang
from gpulease.coordinator.placement import place
from gpulease.coordinator.placement_index import PlacementIndex, placement_on
from gpulease.coordinator.quota import NO_USAGE, Usage, over_quota
from gpulease.errors import InsufficientResources, QuotaExceeded, Unsatisfiable

PlacementError = InsufficientResources | Unsatisfiable


class TenantTally:
    """What requests placed so far (in a batch or a queue pass) add to each tenant's usage, and the
    quota rule applied on top of the snapshot's usage: before placement with what is known (GPU
    count, the named model, CPUs, memory), after it with the models of the GPUs chosen."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        self._added: dict[str, Usage] = {}

    def _used(self, tenant: str) -> Usage:
        return self._snapshot.quotas.usage_of(tenant).plus(self._added.get(tenant, NO_USAGE))

    def before(self, tenant: str, req: ResourceRequest) -> str | None:
        if not tenant:
            return None
        quota, _ = self._snapshot.quotas.quota_for(tenant)
        return over_quota(tenant, quota, self._used(tenant), request_usage(req))

    def after(self, tenant: str, p: Placement, req: ResourceRequest) -> str | None:
        """The model check for a request that named no model; None when it may have the GPUs."""
        if not tenant:
            return None
        quota, _ = self._snapshot.quotas.quota_for(tenant)
        if quota is None or not quota.models or req.gpu_model:
            return None
        return over_quota(tenant, quota, self._used(tenant), placed_usage(self._snapshot, p, req))

    def add(self, tenant: str, p: Placement, req: ResourceRequest) -> None:
        if tenant:
            self._added[tenant] = self._added.get(tenant, NO_USAGE).plus(placed_usage(self._snapshot, p, req))


def place_one(
    snapshot: Snapshot,
    req: ResourceRequest,
    index: PlacementIndex | None,
    excluded: frozenset[str] = frozenset(),
    unindexed: frozenset[str] = frozenset(),
) -> Placement:
    """place(), through the index when it can answer (it must agree with place(); tests check).

    `excluded` names nodes that `snapshot` already hides; the index, which knows every node, is
    told to skip them too. `unindexed` names nodes that `snapshot` shows otherwise than the index
    does (reservations of other tenants): the index answers for the others, and the best fit is
    chosen between its answer and those nodes as `snapshot` shows them."""
    if req.is_gang:  # several nodes: the gang placement (the index answers one node at a time)
        return place_gang(snapshot, req)
    name = index.find(req, excluded | unindexed) if index is not None else None
    if name is not None:
        if not unindexed:
            return placement_on(snapshot.nodes[name], req, snapshot.revision)
        among = {n: snapshot.nodes[n] for n in unindexed | {name} if n in snapshot.nodes}
        return place(replace(snapshot, nodes=among), req)
    return place(snapshot, req)


def place_for(
    snapshot: Snapshot,
    req: ResourceRequest,
    index: PlacementIndex | None,
    tenant: str,
    now_ms: int,
    excluded: frozenset[str] = frozenset(),
) -> Placement:
    """place_one() on the snapshot as ``tenant`` may use it at ``now_ms`` (reservations of other
    tenants withhold their GPUs: coordinator/reservations.py). When only those reservations are in
    the way, InsufficientResources says so: 'reserved for team-b until 18:00:00 UTC (...)'."""
    seen = reservations.visible_to(snapshot, tenant, now_ms)
    if seen is snapshot:
        return place_one(snapshot, req, index, excluded)
    try:
        return place_one(seen, req, index, excluded, reservations.reserved_nodes(snapshot, tenant, now_ms))
    except InsufficientResources as exc:
        why = reservations.reason(snapshot, tenant, now_ms)
        try:
            place_one(snapshot, req, index, excluded)
        except (InsufficientResources, Unsatisfiable):
            raise exc from None
        raise InsufficientResources(f"{why}; the GPUs that would fit it are held for that reservation") from exc


def count_placed(
    nodes: Mapping[str, NodeView], changed: dict[str, NodeView], p: Placement, req: ResourceRequest
) -> None:
    """Record a placement on an overlay (``changed`` over ``nodes``): its GPUs held and its CPUs and
    memory used, on every member node of a gang (each member asks for ``req``'s per-node figures)."""
    for m in p.members:
        v = changed.get(m.node) or nodes[m.node]
        changed[m.node] = replace(
            v,
            gpus_held=v.gpus_held | frozenset(m.gpu_indexes),
            cpus_used=v.cpus_used + req.cpus,
            memory_used=v.memory_used + req.memory_bytes,
        )


def place_batch(
    snapshot: Snapshot,
    requests: Sequence[tuple[ResourceRequest, frozenset[str]]],
    index: PlacementIndex | None = None,
    avoid: Sequence[frozenset[str]] | None = None,
    tenants: Sequence[str] | None = None,
    now_ms: int = 0,
) -> list[Placement | PlacementError]:
    """One result per (request, excluded nodes) pair, in order: a Placement or the error placing it.

    `avoid[i]`, when given, names nodes request i should stay off if any other node fits (nodes
    another replica keeps winning); unlike excluded nodes, they are used when nothing else fits.
    `tenants[i]`, when given, is request i's tenant: a request its tenant's quota (counting the
    batch's earlier members) does not allow fails with QuotaExceeded. Each request is placed on the
    snapshot as its tenant may use it at `now_ms` (0: before every reservation's window), the batch's
    earlier members counted as their tenants' holdings under reservations.

    With an index (the view's, in step with snapshot), the batch's own placements are applied to
    it tentatively so later members see them, and undone before returning.
    """
    changed: dict[str, NodeView] = {}
    out: list[Placement | PlacementError] = []
    tally = TenantTally(snapshot)
    book = snapshot.reservations
    try:
        for i, (req, excluded) in enumerate(requests):
            tenant = tenants[i] if tenants else ""
            over = tally.before(tenant, req)
            if over is not None:
                out.append(QuotaExceeded(over))
                continue
            soft = avoid[i] - excluded if avoid else frozenset()
            p: Placement | None = None
            # With an index, avoid only when it says (cheaply) that another node fits; a filtered
            # request it cannot answer keeps the avoided nodes rather than pay for two scans.
            if soft and (index is None or req.is_gang or index.find(req, excluded | soft) is not None):
                with contextlib.suppress(InsufficientResources, Unsatisfiable):
                    p = _place_in_batch(replace(snapshot, reservations=book), changed, req, excluded | soft,
                                        index, tenant, now_ms)  # fmt: skip
            if p is None:  # nothing to avoid, or nothing else fits: the avoided nodes are eligible
                try:
                    p = _place_in_batch(replace(snapshot, reservations=book), changed, req, excluded, index,
                                        tenant, now_ms)  # fmt: skip
                except (InsufficientResources, Unsatisfiable) as exc:
                    out.append(exc)
                    continue
            over = tally.after(tenant, p, req)
            if over is not None:
                out.append(QuotaExceeded(over))
                continue
            tally.add(tenant, p, req)
            for m in p.members:
                book = book.plus(m.node, tenant, len(m.gpu_indexes))
            count_placed(snapshot.nodes, changed, p, req)
            if index is not None:
                for name in p.nodes:
                    index.update(name, changed[name])
            out.append(p)
    finally:
        if index is not None:
            for name in changed:
                index.update(name, snapshot.nodes.get(name))
    return out


def check_batch(snapshot: Snapshot, placements: Sequence[tuple[Placement, ResourceRequest]]) -> None:
    """The invariant a commit relies on, checked once per commit before it is sent: on every node
    of the batch (every member node of a gang), the GPUs chosen are free and distinct, and reserved CPUs and memory (the
    snapshot's plus the batch's) stay within the node's totals. Placement guarantees this; a
    failure is a bug, raised as AssertionError so that nothing is committed."""
    changed: dict[str, tuple[set[int], int, int]] = {}
    members = [(m, req) for p, req in placements for m in p.members]
    if any(len(set(p.nodes)) != len(p.nodes) for p, _ in placements):
        raise AssertionError("a gang places two members on one node")
    for p, req in members:
        view = snapshot.nodes[p.node]
        gpus, cpus, memory = changed.setdefault(p.node, (set(view.gpus_held), view.cpus_used, view.memory_used))
        clash = gpus & set(p.gpu_indexes)
        if clash or len(set(p.gpu_indexes)) != len(p.gpu_indexes):
            raise AssertionError(f"batch places held or repeated GPU(s) {sorted(clash)} on {p.node}")
        gpus |= set(p.gpu_indexes)
        cpus, memory = cpus + req.cpus, memory + req.memory_bytes
        if cpus > view.info.cpus_total or memory > view.info.memory_total_bytes:
            raise AssertionError(
                f"batch reserves {cpus} CPUs / {memory} bytes on {p.node}, which has "
                f"{view.info.cpus_total} / {view.info.memory_total_bytes}"
            )
        changed[p.node] = (gpus, cpus, memory)


def _place_in_batch(
    snapshot: Snapshot,
    changed: Mapping[str, NodeView],
    req: ResourceRequest,
    excluded: frozenset[str],
    index: PlacementIndex | None,
    tenant: str,
    now_ms: int,
) -> Placement:
    nodes: Mapping[str, NodeView] = snapshot.nodes
    if changed or excluded:
        nodes = Overlay(snapshot.nodes, changed, excluded)
    return place_for(replace(snapshot, nodes=nodes), req, index, tenant, now_ms, excluded)
