"""The etcd store facade against a real etcd: reads larger than one gRPC message."""

from __future__ import annotations

import asyncio

from gpulease.coordinator.keys import range_end
from gpulease.coordinator.store import Store
from tests.support import harness


def test_prefix_reads_page_past_the_grpc_message_limit(etcd: harness.Etcd, prefix: str) -> None:
    async def run() -> None:
        store = Store([etcd.url])
        await store.start()
        try:
            value = b"x" * 3000
            keys = [f"{prefix}big/{i:05d}" for i in range(2000)]  # ~6 MB: more than gRPC's 4 MiB default
            for chunk in range(0, len(keys), 200):
                await asyncio.gather(*(store.put(k, value) for k in keys[chunk : chunk + 200]))
            await store.put(f"{prefix}zz-outside", b"y")
            rev, kvs = await store.get_prefix(f"{prefix}big/", range_end(f"{prefix}big/"), page=333)
            assert [kv.key for kv in kvs] == keys  # all of them, in order, none outside the range
            assert all(kv.value == value for kv in kvs) and rev >= max(kv.mod_revision for kv in kvs)
        finally:
            await store.close()

    asyncio.run(run())
