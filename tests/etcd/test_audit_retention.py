"""The audit log's retention is bounded by age and by count (etcd must not grow without end), and
reading filters by time and actor, oldest first."""

from __future__ import annotations

import time

from gpulease.coordinator.audit import AuditLog, AuditPolicy, entry_put
from gpulease.coordinator.keys import Keys
from gpulease.coordinator.store import Store
from tests.support import harness


async def test_sweep_keeps_the_newest_within_age_and_count(etcd: harness.Etcd, prefix: str) -> None:
    store = Store([etcd.url])
    await store.start()
    keys = Keys(prefix)
    try:
        now_ms = int(time.time() * 1000)
        day = 86400 * 1000
        # 5 entries 10 days old, then 30 fresh ones from two actors.
        for i in range(5):
            put = entry_put(keys, "user:old", "allocate", f"a{i}")
            await store.put(keys.audit(f"{now_ms - 10 * day + i:013d}-old{i}"), put.value)
        for i in range(30):
            put = entry_put(keys, "user:alice" if i % 2 else "user:bob", "release", f"b{i}")
            await store.put(keys.audit(f"{now_ms - 1000 + i:013d}-new{i:02d}"), put.value)
        log = AuditLog(store, keys, AuditPolicy(max_age_s=7 * 86400, max_entries=20))
        assert len(await log.read(limit=0)) == 35
        removed = await log.sweep()
        assert removed == 5 + 10  # the old ones by age, then the oldest fresh ones by count
        kept = await log.read(limit=0)
        assert [e.target for e in kept] == [f"b{i}" for i in range(10, 30)]  # oldest first
        assert all(e.revision > 0 for e in kept)
        alice = await log.read(actor="user:alice", limit=0)
        assert {e.actor for e in alice} == {"user:alice"} and len(alice) == 10
        assert [e.target for e in await log.read(limit=3)] == ["b27", "b28", "b29"]  # the newest 3
        assert await log.read(since_ms=now_ms + 60_000) == []
        assert await log.sweep() == 0
    finally:
        await store.close()
