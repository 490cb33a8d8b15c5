"""Event derivation and the ring buffer (coordinator/events.py), fed watch events by hand: no etcd.

- a release (ending audit entry, then the delete) is RELEASED; a delete with no such entry is
  EXPIRED; alive/cordoned creations and deletions are node events, a re-put is none; a node record
  whose GPU turns unhealthy (and healthy again) is one GPU event; a load seeds state quietly;
- since_revision replays only newer events, older than the buffer starts with a history gap;
- a subscriber that falls behind gets OVERFLOW as its last message and the log never blocks.
"""

from __future__ import annotations

import asyncio
import json

from gpulease.coordinator.domain import AllocatedGpu, Allocation, GpuInfo, NodeInfo
from gpulease.coordinator.events import EventLog, EventType, to_json
from gpulease.coordinator.keys import Keys
from gpulease.coordinator.records import encode_alloc, encode_node
from gpulease.coordinator.store import KV, Event

K = Keys("/p/")


class Feed:
    def __init__(self) -> None:
        self.rev = 10
        self.versions: dict[str, int] = {}

    def put(self, key: str, value: bytes = b"") -> Event:
        self.rev += 1
        v = self.versions[key] = self.versions.get(key, 0) + 1
        return Event("put", KV(key, value, self.rev, self.rev, v, 0))

    def delete(self, key: str) -> Event:
        self.rev += 1
        self.versions.pop(key, None)
        return Event("delete", KV(key, b"", 0, self.rev, 0, 0))


def alloc(alloc_id: str) -> bytes:
    a = Allocation(id=alloc_id, node="n1", gpus=(AllocatedGpu(2, "GPU-2"),), cpus=1, memory_bytes=1, ttl_seconds=30,
                   lease_id=7, revision=0, principal="alice", tenant="team-a")  # fmt: skip
    return encode_alloc(a)


def node(healthy: bool) -> bytes:
    gpus = (GpuInfo(0, "GPU-0", "m", 1), GpuInfo(1, "GPU-1", "m", 1, healthy=healthy, health_detail="" if healthy
                                                  else "XID 79"))  # fmt: skip
    return encode_node(NodeInfo(name="n1", address="a", gpus=gpus, cpus_total=1, memory_total_bytes=1))


def test_derivation() -> None:
    log, f = EventLog(K), Feed()
    log.load(10, [])
    log.apply([f.put(K.node("n1"), node(True)), f.put(K.alive("n1"))])
    log.apply([f.put(K.alive("n1"))])  # re-registered while alive: no event
    log.apply([f.put(K.alloc("a1"), alloc("a1"))])
    log.apply([f.put(K.audit("0000000000001-a1.release"), b"{}"), f.delete(K.alloc("a1"))])
    log.apply([f.put(K.alloc("a2"), alloc("a2"))])
    log.apply([f.delete(K.alloc("a2"))])  # no release entry: its lease expired
    log.apply([f.put(K.cordoned("n1")), f.delete(K.cordoned("n1"))])
    log.apply([f.put(K.node("n1"), node(False))])
    log.apply([f.put(K.node("n1"), node(False))])  # unchanged health: no event
    log.apply([f.put(K.node("n1"), node(True))])
    log.apply([f.delete(K.alive("n1"))])
    events = log.recent()
    assert [e.type.value for e in events] == [
        "node_up", "allocated", "released", "allocated", "expired", "node_cordoned", "node_uncordoned",
        "gpu_unhealthy", "gpu_healthy", "node_down",
    ]  # fmt: skip
    assert [e.revision for e in events] == sorted(e.revision for e in events)
    released, expired = events[2], events[4]
    assert (released.allocation_id, released.tenant, released.principal, released.node, released.gpus) == (
        "a1", "team-a", "alice", "n1", ("2",))  # fmt: skip
    assert expired.allocation_id == "a2" and "expired" in expired.detail
    assert events[7].gpus == ("1",) and "XID 79" in events[7].detail
    assert json.loads(to_json(events[1]))["type"] == "allocated"

    # A reload seeds state quietly (an allocation deleted later is described) and marks the hole.
    f.rev += 5
    log.load(f.rev, [KV(K.alloc("a3"), alloc("a3"), f.rev, f.rev, 1, 0)])
    log.apply([f.delete(K.alloc("a3"))])
    assert [e.type.value for e in log.recent()[-2:]] == ["resync", "expired"]
    assert log.recent()[-1].tenant == "team-a"


async def _collect(log: EventLog, since: int, n: int) -> list[EventType]:
    out = []
    async for ev in log.subscribe(since, follow=False):
        out.append(ev.type)
    return out[:n]


def test_replay_gap_and_overflow() -> None:
    async def main() -> None:
        log, f = EventLog(K, capacity=3, queue_size=2), Feed()
        log.load(10, [])
        for i in range(4):
            log.apply([f.put(K.cordoned(f"n{i}"))])
        # The first event (revision 11) fell out of the buffer: since 10 is older than it.
        assert await _collect(log, 10, 9) == [EventType.HISTORY_GAP] + [EventType.NODE_CORDONED] * 3
        assert await _collect(log, 13, 9) == [EventType.NODE_CORDONED]

        got = []
        sub = log.subscribe(f.rev)

        async def read() -> None:
            async for ev in sub:
                got.append(ev)

        task = asyncio.ensure_future(read())
        await asyncio.sleep(0)
        for i in range(5):  # the reader gets no turn: it falls behind
            log.apply([f.put(K.cordoned(f"m{i}"))])
        await asyncio.wait_for(task, 2)
        assert [e.type for e in got] == [EventType.NODE_CORDONED] * 2 + [EventType.OVERFLOW]
        assert f"since_revision={got[1].revision}" in got[2].detail

    asyncio.run(main())
