"""Calendar reservations (issue 15, section 6): the one rule of what a reservation withholds from
other tenants, as a pure function of a snapshot, a tenant and the time (no I/O, no clock).

A reservation (etcd ``reservations/<name>``, on a lease that ends shortly after its window) holds
``k`` GPUs on a node for one tenant from ``start`` to ``end``. While it is active, every *other*
tenant sees ``k`` minus what the reserving tenant already holds on that node as held: specific free
GPUs (of the reservation's model, the highest free indexes first), so placement, the placement
index's fall-back scan, the queue plan and its reasons all judge the same thing. The reserving
tenant sees the node as it is. Nothing is ever held in etcd for a reservation: it only narrows what
other tenants may be placed on.

Every place that decides for a tenant applies ``visible_to`` before placing: batch placement (per
request), the queue plan (per pending request) and the Allocate pre-check. The allocation
transaction compares the ``reservations/`` range against the snapshot's revision, so a reservation
written after a placement fails its commit (coordinator/committer.py).

Creation (``choose_nodes``): with nodes named, their GPUs (of the model) not reserved already by
overlapping reservations are filled in the order named; without, the coordinator picks the best fit
for N GPUs: the one node with the fewest such GPUs that has N, else the fewest nodes (largest first,
the last one the smallest that covers the rest). The per-node counts are recorded, so every
replica enforces the same thing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from gpulease.coordinator.domain import NodeView, Overlay, Reservation, Snapshot
from gpulease.errors import InvalidRequest

__all__ = ["blocked_gpus", "choose_nodes", "clock", "reason", "reserved_nodes", "visible_to"]


def _against(book_reservations: Iterable[Reservation], tenant: str, now_ms: int) -> list[Reservation]:
    """Active reservations of tenants other than ``tenant``, by name (a deterministic order)."""
    return sorted((r for r in book_reservations if r.tenant != tenant and r.active(now_ms)), key=lambda r: r.name)


def reserved_nodes(snapshot: Snapshot, tenant: str, now_ms: int) -> frozenset[str]:
    """Nodes that carry active reservations of other tenants (what the placement index cannot judge)."""
    return frozenset(n for r in _against(snapshot.reservations.reservations, tenant, now_ms) for n in r.gpus)


def _matches(model: str, gpu_model: str) -> bool:
    return not model or gpu_model.casefold() == model.casefold()


def blocked_gpus(snapshot: Snapshot, tenant: str, now_ms: int) -> dict[str, frozenset[int]]:
    """Per node, the free GPU indexes that active reservations of other tenants withhold from ``tenant``.

    On each node, reservations are taken by name; each withholds its k GPUs there minus what its
    tenant still holds on the node beyond earlier reservations of the same tenant (a credit used up
    in that order), chosen among the node's free GPUs of its model, highest index first."""
    book = snapshot.reservations
    against = _against(book.reservations, tenant, now_ms)
    if not against:
        return {}
    out: dict[str, frozenset[int]] = {}
    credit: dict[tuple[str, str], int] = {}
    for r in against:
        for node, k in sorted(r.gpus.items()):
            view = snapshot.nodes.get(node)
            if view is None:
                continue
            key = (node, r.tenant)
            left = credit.setdefault(key, book.holding(node, r.tenant))
            used = min(left, k)
            credit[key] = left - used
            owed = k - used
            if owed <= 0:
                continue
            taken = out.get(node, frozenset())
            free = sorted(
                (g.index for g in view.info.gpus
                 if g.index in view.free_indexes and g.index not in taken and _matches(r.model, g.model)),
                reverse=True,
            )  # fmt: skip
            out[node] = taken | frozenset(free[:owed])
    return {n: s for n, s in out.items() if s}


def visible_to(snapshot: Snapshot, tenant: str, now_ms: int) -> Snapshot:
    """``snapshot`` as ``tenant`` may use it at ``now_ms``: the GPUs other tenants' active
    reservations withhold count as held. The same snapshot when nothing is withheld; never changed."""
    blocked = blocked_gpus(snapshot, tenant, now_ms)
    if not blocked:
        return snapshot
    changed: dict[str, NodeView] = {
        node: replace(snapshot.nodes[node], gpus_held=snapshot.nodes[node].gpus_held | indexes)
        for node, indexes in blocked.items()
    }
    return replace(snapshot, nodes=Overlay(snapshot.nodes, changed, frozenset()))


def clock(ms: int) -> str:
    """'18:00:00 UTC' (as the queue's estimates are written)."""
    return time.strftime("%H:%M:%S UTC", time.gmtime(ms / 1000))


def reason(snapshot: Snapshot, tenant: str, now_ms: int) -> str | None:
    """'reserved for team-b until 18:00:00 UTC (reservation train: 4 GPUs on gpu-1)': the active
    reservations of other tenants that withhold GPUs from ``tenant`` now; None when none do."""
    blocked = blocked_gpus(snapshot, tenant, now_ms)
    if not blocked:
        return None
    parts = []
    for r in sorted(_against(snapshot.reservations.reservations, tenant, now_ms), key=lambda r: (r.end_ms, r.name)):
        on = sorted(n for n in r.gpus if n in blocked)
        if on:
            where = ", ".join(f"{r.gpus[n]} GPU{'s' if r.gpus[n] != 1 else ''} on {n}" for n in on)
            parts.append(f"reserved for {r.tenant} until {clock(r.end_ms)} (reservation {r.name}: {where})")
    return "; ".join(parts) or None


# --- creation ------------------------------------------------------------------------------------


def capacity(view: NodeView, model: str) -> int:
    """A node's GPUs a reservation of ``model`` could hold (healthy, of the model)."""
    return sum(1 for g in view.info.gpus if g.healthy and _matches(model, g.model))


def _overlapping(existing: Iterable[Reservation], start_ms: int, end_ms: int) -> dict[str, int]:
    """GPUs per node already reserved by reservations whose window overlaps [start, end)."""
    out: dict[str, int] = {}
    for r in existing:
        if r.start_ms < end_ms and start_ms < r.end_ms:
            for n, k in r.gpus.items():
                out[n] = out.get(n, 0) + k
    return out


def choose_nodes(
    nodes: Mapping[str, NodeView],
    gpus: int,
    model: str,
    named: Sequence[str],
    existing: Iterable[Reservation],
    start_ms: int,
    end_ms: int,
) -> dict[str, int]:
    """The per-node GPU counts of a new reservation (see the module's docstring); InvalidRequest,
    saying how many there are, when the named nodes (or the cluster) cannot hold ``gpus``."""
    taken = _overlapping(existing, start_ms, end_ms)
    of_model = f" of model {model!r}" if model else ""
    if named:
        missing = [n for n in named if n not in nodes]
        if missing:
            raise InvalidRequest(f"no registered node {', '.join(repr(n) for n in missing)}; see gpuctl nodes")
        room = {n: max(0, capacity(nodes[n], model) - taken.get(n, 0)) for n in named}
        have = sum(room.values())
        if have < gpus:
            also = " not reserved in that window" if any(taken.get(n) for n in named) else ""
            raise InvalidRequest(
                f"the named node(s) {', '.join(named)} have {have} GPUs{of_model}{also}; a reservation of {gpus} "
                f"does not fit: ask for at most {have} or name more nodes"
            )
        out: dict[str, int] = {}
        left = gpus
        for n in named:
            k = min(left, room[n])
            if k:
                out[n] = k
                left -= k
        return out
    room = {n: c for n, v in nodes.items() if (c := capacity(v, model) - taken.get(n, 0)) > 0}
    have = sum(room.values())
    if have < gpus:
        raise InvalidRequest(f"the cluster has {have} GPUs{of_model} not reserved in that window; a reservation of "
                             f"{gpus} does not fit: ask for at most {have}")  # fmt: skip
    single = sorted((c, n) for n, c in room.items() if c >= gpus)
    if single:
        return {single[0][1]: gpus}
    chosen: dict[str, int] = {}
    left = gpus
    for n, c in sorted(room.items(), key=lambda nc: (-nc[1], nc[0])):  # largest first: the fewest nodes
        if c >= left:  # the last node: the smallest one left that covers the rest
            last = min((d, m) for m, d in room.items() if m not in chosen and d >= left)[1]
            chosen[last] = left
            return chosen
        chosen[n] = c
        left -= c
    raise AssertionError("unreachable: the GPUs were counted above")
