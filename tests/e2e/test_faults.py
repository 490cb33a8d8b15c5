"""Leases and liveness: what frees itself, what stays, and what a dead agent looks like."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc

from gpulease.dev.cluster import LocalCluster
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import types_pb2 as tpb
from tests.support import harness
from tests.support.harness import rpc_error


def test_lease_expiry_frees_gpus_within_ttl_plus_3s(coordinator: harness.Coordinator) -> None:
    s = coordinator.stub
    harness.register(s, "node-a", gpus=4)
    harness.wait_nodes_up(s, {"node-a"})
    a = s.Allocate(pb.AllocateRequest(gpus=3, ttl_seconds=5)).allocation
    granted = time.monotonic()
    assert harness.summary(s).totals.gpus_free == 1
    # No keepalive: etcd deletes every key of the allocation when the lease lapses.
    harness.wait_until(lambda: harness.summary(s).totals.gpus_free == 4, 5 + 3 - (time.monotonic() - granted),
                       "GPUs freed by lease expiry")  # fmt: skip
    err = rpc_error(lambda: s.GetAllocation(pb.GetAllocationRequest(allocation_id=a.id)))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert rpc_error(lambda: s.KeepAlive(pb.KeepAliveRequest(allocation_id=a.id))).code() == grpc.StatusCode.NOT_FOUND
    assert s.ListAllocations(pb.ListAllocationsRequest()).allocations == []


def test_keepalive_holds_gpus_past_the_ttl(coordinator: harness.Coordinator) -> None:
    s = coordinator.stub
    harness.register(s, "node-a", gpus=2)
    harness.wait_nodes_up(s, {"node-a"})
    a = s.Allocate(pb.AllocateRequest(gpus=2, ttl_seconds=5)).allocation
    for _ in range(8):  # 8 s: well past the 5 s TTL
        time.sleep(1)
        assert s.KeepAlive(pb.KeepAliveRequest(allocation_id=a.id)).ttl_seconds == 5
    assert s.GetAllocation(pb.GetAllocationRequest(allocation_id=a.id)).allocation.id == a.id
    assert harness.summary(s).totals.gpus_free == 0


def test_killed_agent_goes_down_and_gets_no_placements(
    start_coordinator: Callable[..., harness.Coordinator], local_cluster: LocalCluster
) -> None:
    c = start_coordinator(node_ttl=3, heartbeat=1)
    small = local_cluster.add_agent("small", 2, cpus=16, memory="64GiB").process
    big = local_cluster.add_agent("big", 4, cpus=16, memory="64GiB").process
    harness.wait_nodes_up(c.stub, {"small", "big"})
    assert c.stub.Allocate(pb.AllocateRequest(gpus=1)).allocation.node == "small"  # best fit
    small.kill()
    killed = time.monotonic()
    harness.wait_until(lambda: harness.node_states(c.stub)["small"] == tpb.NODE_STATE_DOWN,
                       3 + 3, "killed agent's node shown as down")  # fmt: skip
    assert time.monotonic() - killed >= 1, "a node must not be declared down before its lease can lapse"
    # It would still be the best fit (1 free GPU), but it is down: placements go elsewhere.
    for _ in range(3):
        assert c.stub.Allocate(pb.AllocateRequest(gpus=1)).allocation.node == "big"
    row = {r.name: r for r in harness.summary(c.stub).nodes}["small"]
    assert row.state == tpb.NODE_STATE_DOWN and row.gpus_free == 0
    big.kill()
    harness.wait_until(lambda: harness.node_states(c.stub)["big"] == tpb.NODE_STATE_DOWN, 6, "big down")
    err = rpc_error(lambda: c.stub.Allocate(pb.AllocateRequest(gpus=1)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "down" in err.details()
    # A restarted agent registers again and takes placements again.
    local_cluster.add_agent("small", 2, cpus=16, memory="64GiB")
    harness.wait_nodes_up(c.stub, {"small"})
    assert c.stub.Allocate(pb.AllocateRequest(gpus=1)).allocation.node == "small"


def test_live_agent_is_never_marked_down(start_coordinator: Callable[..., harness.Coordinator],
                                         local_cluster: LocalCluster) -> None:  # fmt: skip
    c = start_coordinator(node_ttl=3, heartbeat=1)
    local_cluster.add_agent("steady", 1, cpus=16, memory="64GiB")
    harness.wait_nodes_up(c.stub, {"steady"})
    for _ in range(20):  # 6 s: two node TTLs
        assert harness.node_states(c.stub)["steady"] == tpb.NODE_STATE_UP
        time.sleep(0.3)
