"""WatchEvents against a real coordinator on the session's etcd (issue 16, section 5).

- each action produces exactly one event of its type, in revision order: allocate -> allocated,
  release -> released, an allocation left to expire -> expired (not released), a node registered
  -> node up, cordoned -> node cordoned, re-registered with a GPU unhealthy -> gpu unhealthy, its
  lease lapsing -> node down; a follow stream sees the same sequence as a later replay;
- since_revision replays only what is newer, and one older than the buffer starts with a
  history-gap marker; a type filter keeps only those types;
- `gpuctl events --json` prints the same events, one JSON object per line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable
from typing import Any

import grpc

from gpulease.client import Client
from gpulease.client.aio import AsyncClient
from gpulease.v1 import coordinator_pb2 as pb
from tests.support import gpuctl, harness

SMALL = {"cpus": 1, "memory_bytes": 1 << 20}


def replay(c: harness.Coordinator, since: int = 0, types: list[int] | None = None) -> list[Any]:
    return list(c.stub.WatchEvents(pb.WatchEventsRequest(since_revision=since, types=types or [], follow=False),
                                   timeout=10))  # fmt: skip


def names(events: list[Any]) -> list[str]:
    return [pb.EventType.Name(e.type).removeprefix("EVENT_TYPE_").lower() for e in events]


def test_each_action_one_event_in_revision_order(start_coordinator: Callable[..., harness.Coordinator]) -> None:
    c = start_coordinator(node_ttl=4, heartbeat=1)
    start = c.stub.GetClusterSummary(pb.GetClusterSummaryRequest())  # synced
    assert start is not None
    followed: list[Any] = []
    stream = c.stub.WatchEvents(pb.WatchEventsRequest(follow=True), timeout=60)

    def read() -> None:
        with contextlib.suppress(grpc.RpcError):  # cancelled at the end
            followed.extend(stream)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    lease = harness.register(c.stub, "n1", gpus=2, cpus=8)
    harness.wait_nodes_up(c.stub, {"n1"})
    a = c.stub.Allocate(pb.AllocateRequest(gpus=1, ttl_seconds=60, owner="alice", **SMALL)).allocation
    c.stub.Release(pb.ReleaseRequest(allocation_id=a.id))
    b = c.stub.Allocate(pb.AllocateRequest(gpus=1, ttl_seconds=5, **SMALL)).allocation  # never kept alive

    def expired() -> bool:  # the node heartbeats meanwhile (its lease is short), the allocation does not
        c.stub.Heartbeat(pb.HeartbeatRequest(node="n1", lease_id=lease))
        return "expired" in names(replay(c))

    harness.wait_until(expired, 20, "the allocation's expiry", interval=0.5)
    c.stub.CordonNode(pb.CordonNodeRequest(node="n1", cordoned=True))
    inv = harness.inventory(2, cpus=8, node="n1")
    inv.gpus[1].healthy = False
    inv.gpus[1].health_detail = "XID 79: fallen off the bus"
    c.stub.RegisterNode(pb.RegisterNodeRequest(node="n1", address="127.0.0.1:1", inventory=inv))
    harness.wait_until(lambda: "node_down" in names(replay(c)), 20, "node n1 down (no heartbeats)")

    events = replay(c)
    assert names(events) == ["node_up", "allocated", "released", "allocated", "expired", "node_cordoned",
                             "gpu_unhealthy", "node_down"]  # fmt: skip
    revisions = [e.revision for e in events]
    assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)
    up, alloc, released, alloc2, expired, cordoned, sick, down = events
    assert (up.node, down.node, cordoned.node, sick.node) == ("n1", "n1", "n1", "n1")
    assert (alloc.allocation_id, alloc.node, list(alloc.gpus), alloc.tenant) == (a.id, "n1", [str(a.gpus[0].index)],
                                                                                 a.tenant)  # fmt: skip
    assert released.allocation_id == a.id and released.detail.startswith("release")
    assert (alloc2.allocation_id, expired.allocation_id) == (b.id, b.id)
    assert list(sick.gpus) == ["1"] and "XID 79" in sick.detail
    assert all(e.time_unix_ms > 0 for e in events)

    harness.wait_until(lambda: len(followed) >= len(events), 10, "the follow stream to catch up")
    stream.cancel()
    assert [(e.type, e.revision) for e in followed] == [(e.type, e.revision) for e in events]

    # since_revision: only what is newer. Older than the buffer: a history-gap marker first.
    assert names(replay(c, since=alloc2.revision)) == ["expired", "node_cordoned", "gpu_unhealthy", "node_down"]
    # A replica started now holds nothing older than its load: it says so, then has nothing to replay.
    late = start_coordinator(node_ttl=4, heartbeat=1)
    harness.wait_until(lambda: late.stub.GetClusterSummary(pb.GetClusterSummaryRequest()), 10, "the late replica")
    gap = replay(late, since=alloc.revision)
    assert names(gap) == ["history_gap"] and gap[0].revision >= down.revision, gap
    assert replay(late, since=gap[0].revision) == []
    assert names(replay(c, types=[pb.EVENT_TYPE_NODE_UP, pb.EVENT_TYPE_NODE_DOWN])) == ["node_up", "node_down"]

    # The client, sync and async: the same events as models.
    with Client(c.address, timeout=10) as client:
        got = list(client.events())
    assert [(e.type, e.revision) for e in got] == list(zip(names(events), revisions, strict=True))
    assert got[1].allocation_id == a.id and got[1].gpus == tuple(alloc.gpus)

    async def follow_async() -> list[str]:
        async with AsyncClient(c.address, timeout=10) as aclient:
            out = []
            async for e in aclient.events(since=alloc.revision, follow=True, types=["released", "expired"]):
                out.append(e.type)
                if len(out) == 2:
                    break
            return out

    assert asyncio.run(follow_async()) == ["released", "expired"]

    # gpuctl events --json: one object per line, the same events.
    run = gpuctl.run(["--coordinator", c.address, "events", "--json"])
    assert run.rc == 0, run
    lines = [ln for ln in run.stdout.splitlines() if ln.strip()]
    printed = [json.loads(ln) for ln in lines]
    assert [p["type"] for p in printed] == names(events)
    assert [p["revision"] for p in printed] == revisions
    assert printed[1]["allocation_id"] == a.id and printed[1]["node"] == "n1"
    filtered = gpuctl.run(["--coordinator", c.address, "events", "--json", "--type", "expired",
                           "--since", str(alloc.revision)])  # fmt: skip
    assert filtered.rc == 0, filtered
    assert [json.loads(ln)["allocation_id"] for ln in filtered.stdout.splitlines() if ln.strip()] == [b.id]
