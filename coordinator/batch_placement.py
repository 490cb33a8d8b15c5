"""Placement of several requests at once, still a pure function of one snapshot.

Each request is placed on the snapshot as updated by the requests placed before it, so one
etcd transaction can commit the whole batch without two of its allocations overlapping.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace

from coordinator.domain import NodeView, Placement, ResourceRequest, Snapshot
from coordinator.placement import place
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


def place_batch(
    snapshot: Snapshot, requests: Sequence[tuple[ResourceRequest, frozenset[str]]]
) -> list[Placement | PlacementError]:
    """One result per (request, excluded nodes) pair, in order: a Placement or the error placing it."""
    changed: dict[str, NodeView] = {}
    out: list[Placement | PlacementError] = []
    for req, excluded in requests:
        nodes: Mapping[str, NodeView] = snapshot.nodes
        if changed or excluded:
            nodes = _Overlay(snapshot.nodes, changed, excluded)
        try:
            p = place(Snapshot(snapshot.revision, nodes), req)
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
        out.append(p)
    return out
