"""Checks a history of grants for overlaps: was one GPU ever held by two allocations at once?

The bench and the tests record every grant and release with its etcd revision, then ask this
module. Pure Python over revisions; no gRPC, no etcd, no client.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass


@dataclass(frozen=True)
class Grant:
    alloc_id: str
    node: str
    gpus: tuple[int, ...]
    granted: int
    released: int = 0


def double_allocations(grants: list[Grant]) -> list[str]:
    """Every time one GPU was held by two allocations at once, by etcd revision: each grant holds
    its GPUs over [granted, released), and released 0 means still held. Empty when correct."""
    spans: dict[tuple[str, int], list[tuple[int, int, str]]] = defaultdict(list)
    for g in grants:
        for i in g.gpus:
            spans[(g.node, i)].append((g.granted, g.released or 2**62, g.alloc_id))
    found: list[str] = []
    for (node, index), held in spans.items():
        held.sort()
        found += [
            f"GPU {node}/{index} held by {first} and {second} at once (revision {start} < {end})"
            for (_, end, first), (start, _, second) in itertools.pairwise(held)
            if start < end
        ]
    return found
