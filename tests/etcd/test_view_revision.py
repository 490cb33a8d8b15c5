"""Issue 11, defect 1: the view's revision is the last event it applied, never a header's.

etcd stamps a watch's `created` response, and each part of a long catch-up, with its current
revision, ahead of the events delivered so far. A view that took that number as "applied up to"
placed on state it had not seen and passed the `res/` compare with it: 6 CPUs on a 4-CPU node.
"""

from __future__ import annotations

import asyncio

import pytest

from gpulease.coordinator.keys import range_end
from gpulease.coordinator.store import Put, Store
from gpulease.errors import InsufficientResources
from tests.support import harness
from tests.support.inproc import HoldingStore, core, node_info
from tests.support.tcp_proxy import TcpProxy


async def test_a_watch_opened_in_the_past_never_oversubscribes(etcd: harness.Etcd, prefix: str) -> None:
    async with core([etcd.url], prefix) as a:
        await a.nodes.register(node_info("n1", gpus=4, cpus=4))
        assert await a.view.wait_for_revision(await a.store.put(f"{prefix}sync", b""), 5)
        w = await a.allocate(gpus=1, cpus=1)  # GPU 0, 1 CPU
        b_store = HoldingStore([etcd.url])
        b_store.open_gate.clear()  # replica B loads the prefix now; its watch is not open yet
        async with core([etcd.url], prefix, store=b_store) as b:
            assert b.view.node("n1").gpus_held == {0}  # type: ignore[union-attr]
            # Replica A releases W and gives GPU 0 and 3 of n1's 4 CPUs to X.
            assert await a.view.wait_for_revision(await a.allocations.release(w.id), 5)
            x = await a.allocate(gpus=1, cpus=3)
            assert (x.node, x.gpus[0].index) == ("n1", 0)
            # B's watch opens after X: its `created` answer names a revision past X, and X's events
            # are held back until B's second commit is on its way.
            b_store.event_gate.clear()
            b_store.open_gate.set()
            await asyncio.sleep(0.3)  # the `created` answer has arrived (it is not held)

            def release_events(n: int) -> None:
                if n == 2:
                    b_store.event_gate.set()

            b.committer.before = release_events
            # B still counts W's 1 CPU and GPU 0: it places Y on GPU 1 with 3 CPUs. Only the `res/`
            # compare, fed by the view's revision, can refuse that.
            with pytest.raises(InsufficientResources):
                await b.allocate(gpus=1, cpus=3)
            assert (await b.reserved("n1"))[0] == 3
            assert b.committer.commits >= 2  # B did try on its stale view, and etcd refused it
            # The view's revision only ever names an event it applied.
            assert all(batch.revision == batch.events[-1].kv.mod_revision for batch in b_store.batches)
            assert b.view.revision == max(batch.revision for batch in b_store.batches)


async def test_a_broken_watch_resumes_after_its_last_event(etcd: harness.Etcd, prefix: str) -> None:
    """Defect 1b: a stream that breaks during a catch-up resumes from the last event delivered,
    not from the header's revision + 1 (which skipped the events in between, for good)."""
    writer = Store([etcd.url])
    await writer.start()
    port = int(etcd.url.rsplit(":", 1)[1])
    proxy = TcpProxy("127.0.0.1", port)
    watcher = Store([proxy.url])
    await watcher.start()
    try:
        start = await writer.put(f"{prefix}start", b"")
        # More than 1,000 revisions: etcd sends the catch-up in parts ~100 ms apart, each part's
        # header naming the current revision.
        # The etcd is shared: other tests' leases may expire in between, so the expected revisions
        # are those of our own writes, not a contiguous range.
        written: list[int] = []
        for chunk in range(0, 2400, 100):
            puts = (writer.put(f"{prefix}k/{i:05d}", b"v") for i in range(chunk, chunk + 100))
            written += await asyncio.gather(*puts)
        last = await writer.txn([], [Put(f"{prefix}end", b"")])
        written.append(last.revision)
        received: list[int] = []
        with pytest.raises(TimeoutError):  # the stream never ends by itself: stop at the deadline
            async with asyncio.timeout(15):
                async for batch in watcher.watch(prefix, range_end(prefix), start + 1):
                    assert not batch.resync
                    assert batch.revision == batch.events[-1].kv.mod_revision
                    received.extend(ev.kv.mod_revision for ev in batch.events)
                    if len(received) == len(batch.events):
                        proxy.cut()  # right after the first part: the rest is still on its way
                    if received[-1] >= last.revision:
                        break
                raise TimeoutError  # reached the end: leave the same way as a timeout
        assert received == sorted(written)
        assert proxy.accepted >= 2  # the stream really was reopened
    finally:
        await watcher.close()
        await writer.close()
        proxy.close()


async def test_a_snapshot_stays_as_it_was_taken(etcd: harness.Etcd, prefix: str) -> None:
    """A commit round awaits between placing and committing and reads its snapshot afterwards:
    events applied meanwhile must not show through (copy on write)."""
    async with core([etcd.url], prefix) as c:
        await c.nodes.register(node_info("n1", gpus=4))
        assert await c.view.wait_for_revision(await c.store.put(f"{prefix}sync", b""), 5)
        before = c.view.snapshot()
        alloc = await c.allocate(gpus=2)
        assert await c.view.wait_for_revision(alloc.revision, 5)
        assert before.nodes["n1"].gpus_held == frozenset() and before.revision < alloc.revision
        assert c.view.snapshot().nodes["n1"].gpus_held == {0, 1}
