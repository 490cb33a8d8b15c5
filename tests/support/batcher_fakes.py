"""Fakes for the commit loop (coordinator/batcher.py) in isolation: a placement source over a fixed
snapshot, a committer that rejects a chosen number of commits, and the lookups a Batcher needs.
Used by tests/unit/test_batcher.py and tests/etcd/test_request_twins.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from types import MappingProxyType

from gpulease.coordinator.committer import CommitResult, Committed, Item, Rejected, gpus_of
from gpulease.coordinator.domain import Allocation, GpuInfo, NodeInfo, NodeView, ResourceRequest, Snapshot


def node(name: str, gpus: int = 8, held: frozenset[int] = frozenset()) -> NodeView:
    info = NodeInfo(name, "h:1", tuple(GpuInfo(i, f"{name}-{i}", "M", 1) for i in range(gpus)), 64, 2**40)
    return NodeView(info, up=True, record_revision=1, gpus_held=held)


class FakeSource:
    index = None  # place by the pure scan

    def __init__(self, *nodes: NodeView) -> None:
        self.snap = Snapshot(10, MappingProxyType({n.name: n for n in nodes}))
        self.waited: list[int] = []

    def snapshot(self) -> Snapshot:
        return self.snap

    async def wait_for_revision(self, revision: int, timeout: float) -> bool:
        self.waited.append(revision)
        return True

    async def caught_up(self, revision: int, timeout: float) -> bool:
        return await self.wait_for_revision(revision, timeout)


class FakeCommitter:
    """Rejects the first `reject` commits, then commits; records every batch it saw."""

    def __init__(self, reject: int = 0, *, rejection: Rejected | None = None, raise_: Exception | None = None):
        self.reject = reject
        self.rejection = rejection or Rejected(revision=42)
        self.raise_ = raise_
        self.batches: list[list[Item]] = []
        self.revision = 100

    async def commit(self, items: Sequence[Item], snapshot: Snapshot) -> CommitResult:
        self.batches.append(list(items))
        if self.raise_:
            raise self.raise_
        if len(self.batches) <= self.reject:
            return self.rejection
        self.revision += 1
        return Committed(
            tuple(
                replace(i.draft, node=i.placement.node, gpus=gpus_of(i.placement, snapshot), revision=self.revision)
                for i in items
            ),
            self.revision,
        )


def draft(n: int, request_id: str | None = None) -> Allocation:
    return Allocation(id=f"{n:016x}", node="", gpus=(), cpus=1, memory_bytes=1, ttl_seconds=60, lease_id=n,
                      revision=0, request_id=request_id or f"req-{n}")  # fmt: skip


async def no_lookup(_: str) -> Allocation | None:
    return None


async def claim_as_is(alloc: Allocation) -> Allocation | None:
    return alloc


async def never_committed(_: Allocation) -> Allocation | None:
    return None


ONE = ResourceRequest(gpus=1, cpus=1, memory_bytes=1)
