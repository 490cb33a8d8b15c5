"""Placement of several requests at once, still a pure function of one snapshot.

Each request is placed on the snapshot as updated by the requests placed before it, so one
etcd transaction can commit the whole batch without two of its allocations overlapping.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace

from coordinator.domain import NodeView, Placement, ResourceRequest, Snapshot
from coordinator.placement import place
from coordinator.placement_index import PlacementIndex, placement_on
from gpulease.errors import InsufficientResources, Unsatisfiable

PlacementError = InsufficientResources | Unsatisfiable


class _Overlay(Mapping[str, NodeView]):
    """base with some nodes replaced and some hidden, without copying base (10,000 nodes)."""

    def __init__(self, base: Mapping[str, NodeView], changed: Mapping[str, NodeView], hidden: frozenset[str]):
        self._base, self._changed, self._hidden = base, changed, hidden

    def __getitem__(self, key: str) -> NodeView:
        if key in self._hidden:
            raise KeyError(key)
        return self._changed.get(key) or self._base[key]

    def __iter__(self) -> Iterator[str]:
        return (k for k in self._base if k not in self._hidden)

    def __len__(self) -> int:
        return len(self._base) - sum(1 for k in self._hidden if k in self._base)


def place_one(snapshot: Snapshot, req: ResourceRequest, index: PlacementIndex | None) -> Placement:
    """place(), through the index when it can answer (it must agree with place(); tests check)."""
    name = index.find(req) if index is not None else None
    if name is not None:
        return placement_on(snapshot.nodes[name], req, snapshot.revision)
    return place(snapshot, req)


def place_batch(
    snapshot: Snapshot,
    requests: Sequence[tuple[ResourceRequest, frozenset[str]]],
    index: PlacementIndex | None = None,
) -> list[Placement | PlacementError]:
    """One result per (request, excluded nodes) pair, in order: a Placement or the error placing it.

    With an index (the view's, in step with snapshot), the batch's own placements are applied to
    it tentatively so later members see them, and undone before returning.
    """
    changed: dict[str, NodeView] = {}
    out: list[Placement | PlacementError] = []
    try:
        for req, excluded in requests:
            nodes: Mapping[str, NodeView] = snapshot.nodes
            if changed or excluded:
                nodes = _Overlay(snapshot.nodes, changed, excluded)
            try:
                p = place_one(Snapshot(snapshot.revision, nodes), req, None if excluded else index)
            except (InsufficientResources, Unsatisfiable) as exc:
                out.append(exc)
                continue
            v = nodes[p.node]
            changed[p.node] = replace(
                v,
                gpus_held=v.gpus_held | frozenset(p.gpu_indexes),
                cpus_used=v.cpus_used + req.cpus,
                memory_used=v.memory_used + req.memory_bytes,
            )
            if index is not None:
                index.update(p.node, changed[p.node])
            out.append(p)
    finally:
        if index is not None:
            for name in changed:
                index.update(name, snapshot.nodes.get(name))
    return out
