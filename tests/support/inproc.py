"""A coordinator's core (store, view, allocation and node services) in the test's own event loop,
against the real etcd, so that a test can put a hook exactly where an interleaving must happen:
a store whose watch holds events back, a committer that pauses or loses its answer.

Everything else is the production code, wired as coordinator/main.py wires it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from gpulease.coordinator.allocations import AllocateInput, AllocationPolicy, AllocationService
from gpulease.coordinator.committer import CommitResult, Committer, EtcdCommitter, Item
from gpulease.coordinator.domain import Allocation, GpuInfo, NodeInfo, Snapshot
from gpulease.coordinator.keys import Keys, range_end
from gpulease.coordinator.liveness import LivenessPolicy
from gpulease.coordinator.nodes import NodeService
from gpulease.coordinator.records import decode_res
from gpulease.coordinator.store import Store, WatchBatch
from gpulease.coordinator.view import ClusterView

GiB = 2**30


def node_info(name: str, gpus: int = 4, *, cpus: int = 4, memory: int = 64 * GiB,
              uuids: Sequence[str] | None = None) -> NodeInfo:  # fmt: skip
    uuids = uuids or [f"GPU-{name}-{i}" for i in range(gpus)]
    return NodeInfo(
        name=name,
        address="127.0.0.1:1",
        gpus=tuple(GpuInfo(i, uuid, "H100", 80 * GiB) for i, uuid in enumerate(uuids)),
        cpus_total=cpus,
        memory_total_bytes=memory,
    )


class HoldingStore(Store):
    """A real store whose watch can be held: `hold_open` delays opening the stream, and
    `hold_events` keeps batches that carry events from reaching the view until released."""

    def __init__(self, urls: Sequence[str], **kw: object) -> None:
        super().__init__(urls, **kw)  # type: ignore[arg-type]
        self.open_gate = asyncio.Event()
        self.open_gate.set()
        self.event_gate = asyncio.Event()
        self.event_gate.set()
        self.batches: list[WatchBatch] = []

    async def watch(self, prefix: str, range_end: bytes, start_revision: int) -> AsyncIterator[WatchBatch]:
        await self.open_gate.wait()
        async for batch in super().watch(prefix, range_end, start_revision):
            if batch.events:
                await self.event_gate.wait()
            self.batches.append(batch)
            yield batch


@dataclass
class HookedCommitter:
    """The real committer, with a coroutine run before each commit (its 1-based number given)."""

    inner: Committer
    before: Callable[[int], object] | None = None
    commits: int = 0

    async def commit(self, items: Sequence[Item], snapshot: Snapshot) -> CommitResult:
        self.commits += 1
        if self.before is not None:
            result = self.before(self.commits)
            if asyncio.iscoroutine(result):
                await result
        return await self.inner.commit(items, snapshot)


@dataclass
class Core:
    store: Store
    keys: Keys
    view: ClusterView
    allocations: AllocationService
    nodes: NodeService
    committer: HookedCommitter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def allocate(self, gpus: int = 1, **kw: object) -> Allocation:
        alloc, _ = await self.allocations.allocate(AllocateInput(gpus=gpus, **kw))  # type: ignore[arg-type]
        return alloc

    async def reserved(self, node: str) -> tuple[int, int]:
        """(CPUs, memory) reserved on `node`, summed from etcd itself."""
        prefix = self.keys.res_prefix(node)
        _, kvs = await self.store.get_prefix(prefix, range_end(prefix))
        pairs = [decode_res(kv.value) for kv in kvs]
        return sum(c for c, _ in pairs), sum(m for _, m in pairs)

    async def keys_under(self, kind: str) -> list[str]:
        prefix = f"{self.keys.prefix}{kind}/"
        _, kvs = await self.store.get_prefix(prefix, range_end(prefix))
        return [kv.key[len(prefix) :] for kv in kvs]


@contextlib.asynccontextmanager
async def core(
    etcd_urls: Sequence[str], prefix: str, *, store: Store | None = None, policy: AllocationPolicy | None = None
) -> AsyncIterator[Core]:
    store = store or Store(etcd_urls)
    await store.start()
    keys = Keys(prefix)
    view = ClusterView(store, keys)
    committer = HookedCommitter(EtcdCommitter(store, keys))
    allocations = AllocationService(store, view, keys, committer, policy or AllocationPolicy())
    nodes = NodeService(store, view, keys, LivenessPolicy(heartbeat_interval=2, node_ttl=60))
    c = Core(store, keys, view, allocations, nodes, committer)
    c.tasks = [asyncio.create_task(t.run()) for t in (view, allocations, nodes)]
    try:
        await asyncio.wait_for(view.synced.wait(), 10)
        yield c
    finally:
        for t in c.tasks:
            t.cancel()
        await asyncio.gather(*c.tasks, return_exceptions=True)
        await allocations.close()
        await store.close()


async def until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll a condition of this process's own state (bounded); fail naming `what`."""
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
