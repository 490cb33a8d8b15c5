"""An index for the common placement: any GPU model, no label or GPU-memory filter.

Schedulable nodes are bucketed by how many GPUs they have free (healthy, not held, not in
foreign use), and each bucket is sorted by (free CPUs, free memory, name): exactly the order
in which best-fit prefers them. Finding a node is then a bisect in the lowest bucket that
can take the request, instead of a scan of every node (6-13 ms at 1,000-10,000 nodes).

It is a cache of the view, never an authority: `place()` (the pure scan) stays the reference,
a property test checks that both choose the same node, and anything the index cannot answer
(filters, no fit, errors to explain) falls back to the scan.
"""

from __future__ import annotations

from sortedcontainers import SortedList

from gpulease.coordinator.domain import NodeView, Placement, ResourceRequest

_Key = tuple[int, int, str]  # (cpus_free, memory_free, name)


def free_gpu_count(view: NodeView) -> int:
    return len(view.free_indexes)


class PlacementIndex:
    def __init__(self) -> None:
        self._buckets: dict[int, SortedList] = {}
        self._where: dict[str, tuple[int, _Key]] = {}

    def __len__(self) -> int:
        return len(self._where)

    def update(self, name: str, view: NodeView | None) -> None:
        """Reflect a node's new view (None: the node is gone)."""
        old = self._where.pop(name, None)
        if old is not None:
            self._buckets[old[0]].remove(old[1])
        if view is None or not view.schedulable:
            return
        free = free_gpu_count(view)
        key = (view.cpus_free, view.memory_free, name)
        self._buckets.setdefault(free, SortedList()).add(key)
        self._where[name] = (free, key)

    def find(self, req: ResourceRequest, excluded: frozenset[str] = frozenset()) -> str | None:
        """Best-fit node for an unfiltered request, skipping `excluded`, or None (then the full
        scan decides)."""
        if req.gpu_model or req.min_gpu_memory_bytes or req.node_selector:
            return None
        for free in sorted(b for b, keys in self._buckets.items() if b >= req.gpus and keys):
            keys = self._buckets[free]
            # First key with enough CPUs; keys with equal CPUs are ordered by memory, so
            # starting at (need_cpus, need_mem) skips the ones short of memory at that CPU count.
            for _cpus_free, mem_free, name in keys.irange((req.cpus, req.memory_bytes, "")):
                if mem_free >= req.memory_bytes and name not in excluded:
                    return str(name)
        return None


def placement_on(view: NodeView, req: ResourceRequest, snapshot_revision: int) -> Placement:
    """The lowest free eligible GPU indexes on a node the index chose (same rule as place())."""
    free = sorted(view.free_indexes)
    return Placement(
        node=view.name,
        gpu_indexes=tuple(free[: req.gpus]),
        node_record_revision=view.record_revision,
        snapshot_revision=snapshot_revision,
    )
