"""Container exits reported in heartbeats become container_exited events (issue 16, section 5), on a
real coordinator and etcd; the test plays the agents through the NodeService stub:

- an exit of a container of an allocation on the reporting node: exactly one container_exited
  event (allocation, node, tenant, "exit code N") and one audit entry;
- the same exit resent in the next heartbeat (the agent did not see the answer): still one event,
  still one entry (the key derives from the exit; it is written only if absent);
- an exit reported for an allocation on another node (NodeRestriction), or a malformed one: ignored,
  no event, no entry; the heartbeat itself is answered;
- a second exit of the same container (restarted, a later finish time) is an event of its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from gpulease.client import Client
from gpulease.v1 import coordinator_pb2 as pb
from tests.support import harness

SMALL = {"cpus": 1, "memory_bytes": 1 << 20}
CID = "ab" * 32


def exited(c: harness.Coordinator) -> list[Any]:
    req = pb.WatchEventsRequest(types=[pb.EVENT_TYPE_CONTAINER_EXITED], follow=False)
    return list(c.stub.WatchEvents(req, timeout=10))


def beat(c: harness.Coordinator, node: str, lease: int, *exits: pb.ContainerExit) -> None:
    c.stub.Heartbeat(pb.HeartbeatRequest(node=node, lease_id=lease, exits=exits), timeout=10)


def exit_keys(etcd: harness.Etcd, prefix: str) -> list[str]:
    return [k for k in harness.etcd_keys(etcd.url, prefix) if k.startswith("audit/") and ".exit." in k]


def test_exit_reported_in_heartbeats_is_one_event(
    etcd: harness.Etcd, start_coordinator: Callable[..., harness.Coordinator], prefix: str
) -> None:
    c = start_coordinator(heartbeat=1)
    lease1 = harness.register(c.stub, "n1", gpus=1, cpus=8)
    lease2 = harness.register(c.stub, "n2", gpus=1, cpus=8)
    harness.wait_nodes_up(c.stub, {"n1", "n2"})
    a = c.stub.Allocate(pb.AllocateRequest(gpus=1, ttl_seconds=60, owner="alice", **SMALL)).allocation
    b = c.stub.Allocate(pb.AllocateRequest(gpus=1, ttl_seconds=60, owner="bob", **SMALL)).allocation
    assert {a.node, b.node} == {"n1", "n2"}
    mine, other = (a, b) if a.node == "n1" else (b, a)
    lease_mine, lease_other = (lease1, lease2) if mine.node == "n1" else (lease2, lease1)
    finished = int(time.time() * 1000) - 500
    ex = pb.ContainerExit(allocation_id=mine.id, container_id=CID, exit_code=3, finished_unix_ms=finished)

    beat(c, "n1", lease_mine, ex)
    harness.wait_until(lambda: exited(c), 10, "a container_exited event")
    # Resent (the answer was lost), and again in a later heartbeat with nothing new.
    beat(c, "n1", lease_mine, ex)
    beat(c, "n1", lease_mine, ex)
    # Another node's allocation, reported by n1; a malformed report: ignored, the heartbeat answered.
    foreign = pb.ContainerExit(allocation_id=other.id, container_id="cd" * 32, exit_code=0, finished_unix_ms=finished)
    bad = pb.ContainerExit(allocation_id=mine.id, container_id="../x", exit_code=0, finished_unix_ms=finished)
    beat(c, "n1", lease_mine, foreign, bad)
    # A marker that everything above was applied: n2's own exit, reported by n2.
    theirs = pb.ContainerExit(
        allocation_id=other.id, container_id="ef" * 32, error="OOM killed", finished_unix_ms=finished
    )
    beat(c, "n2", lease_other, theirs)
    harness.wait_until(lambda: len(exited(c)) >= 2, 10, "n2's container_exited event")

    events = exited(c)
    assert len(events) == 2, events
    first, second = events
    assert (first.allocation_id, first.node, first.tenant) == (mine.id, "n1", mine.tenant)
    assert first.detail == f"container {CID[:12]}: exit code 3"
    assert (second.allocation_id, second.node) == (other.id, "n2")
    assert second.detail == f"container {'ef' * 6}: exit code unknown; OOM killed"
    assert len(exit_keys(etcd, prefix)) == 2

    # The same container exiting again later (restarted): an event of its own.
    again = pb.ContainerExit(allocation_id=mine.id, container_id=CID, exit_code=1, finished_unix_ms=finished + 5_000)
    beat(c, "n1", lease_mine, again, ex)
    harness.wait_until(lambda: len(exited(c)) >= 3, 10, "the second exit's event")
    assert [e.detail.rsplit(": ", 1)[1] for e in exited(c)] == ["exit code 3", "exit code unknown; OOM killed",
                                                                  "exit code 1"]  # fmt: skip
    assert len(exit_keys(etcd, prefix)) == 3

    # The client names the type.
    with Client(c.address, timeout=5) as client:
        got = [e for e in client.events(types=["container_exited"])]
    assert [(e.type, e.allocation_id) for e in got] == [("container_exited", mine.id), ("container_exited", other.id),
                                                        ("container_exited", mine.id)]  # fmt: skip
