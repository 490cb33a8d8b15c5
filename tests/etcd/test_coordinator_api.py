"""Every CoordinatorService RPC and every documented error, against a real coordinator and etcd."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from gpulease.coordinator.store import Store
from gpulease.dev.cluster import LocalCluster
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import types_pb2 as tpb
from tests.support import harness
from tests.support.harness import GiB, rpc_error

ALLOC_KEYS = ("allocs/", "gpus/", "res/", "reqs/")


def alloc_keys(etcd: harness.Etcd, prefix: str) -> list[str]:
    return [k for k in harness.etcd_keys(etcd.url, prefix) if k.startswith(ALLOC_KEYS)]


@pytest.fixture
def two_nodes(coordinator: harness.Coordinator) -> harness.Coordinator:
    harness.register(coordinator.stub, "node-a", gpus=8)
    harness.register(coordinator.stub, "node-b", gpus=4, model="NVIDIA A100-SXM4-40GB", gpu_memory=40 * GiB,
                     labels={"zone": "b"})  # fmt: skip
    harness.wait_nodes_up(coordinator.stub, {"node-a", "node-b"})
    return coordinator


def test_allocate_returns_gpus_revision_and_updates_summary(two_nodes: harness.Coordinator) -> None:
    s = two_nodes.stub
    resp = s.Allocate(pb.AllocateRequest(gpus=2, cpus=4, memory_bytes=16 * GiB, owner="alice", ttl_seconds=30))
    a = resp.allocation
    assert not resp.reused
    # Best fit: node-b (4 GPUs) is left with fewer free GPUs than node-a would be.
    assert a.node == "node-b"
    assert [g.index for g in a.gpus] == [0, 1]
    assert [g.uuid for g in a.gpus] == ["GPU-node-b-0", "GPU-node-b-1"]
    assert (a.cpus, a.memory_bytes, a.ttl_seconds, a.owner) == (4, 16 * GiB, 30, "alice")
    assert a.revision > 0 and a.node_address.startswith("127.0.0.1:")
    rows = {r.name: r for r in harness.summary(s).nodes}
    assert (rows["node-b"].gpus_free, rows["node-b"].cpus_free) == (2, 28)
    assert rows["node-b"].memory_free_bytes == 240 * GiB
    assert harness.summary(s).totals.gpus_free == 10


def test_defaults_reserve_cpus_and_memory_per_gpu(two_nodes: harness.Coordinator) -> None:
    a = two_nodes.stub.Allocate(pb.AllocateRequest(gpus=3)).allocation
    assert (a.cpus, a.memory_bytes, a.ttl_seconds) == (3, 12 * GiB, 60)


def test_filters_model_memory_and_labels(two_nodes: harness.Coordinator) -> None:
    s = two_nodes.stub
    assert s.Allocate(pb.AllocateRequest(gpus=1, gpu_model="NVIDIA H100 80GB HBM3")).allocation.node == "node-a"
    assert s.Allocate(pb.AllocateRequest(gpus=1, min_gpu_memory_bytes=80 * GiB)).allocation.node == "node-a"
    assert s.Allocate(pb.AllocateRequest(gpus=1, node_selector={"zone": "b"})).allocation.node == "node-b"
    err = rpc_error(lambda: s.Allocate(pb.AllocateRequest(gpus=1, gpu_model="Tesla K80")))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "K80" in err.details()


def test_release_is_idempotent_and_frees_everything(etcd: harness.Etcd, prefix: str,
                                                    two_nodes: harness.Coordinator) -> None:  # fmt: skip
    s = two_nodes.stub
    a = s.Allocate(pb.AllocateRequest(gpus=4, request_id="job-1")).allocation
    assert len(alloc_keys(etcd, prefix)) == 1 + 4 + 1 + 1
    first = s.Release(pb.ReleaseRequest(allocation_id=a.id))
    assert first.released and first.revision > a.revision
    second = s.Release(pb.ReleaseRequest(allocation_id=a.id))
    assert not second.released and second.revision == 0
    # Only the request key is left, as the release's tombstone (issue 17): "job-1" holds nothing.
    [left] = alloc_keys(etcd, prefix)
    assert left.startswith("reqs/") and left.endswith("/job-1")
    assert harness.summary(s).totals.gpus_free == 12


def test_get_list_and_keepalive(two_nodes: harness.Coordinator) -> None:
    s = two_nodes.stub
    a = s.Allocate(pb.AllocateRequest(gpus=1, owner="alice", ttl_seconds=20)).allocation
    b = s.Allocate(pb.AllocateRequest(gpus=8, owner="bob")).allocation
    got = s.GetAllocation(pb.GetAllocationRequest(allocation_id=a.id)).allocation
    assert got == a
    assert [x.id for x in s.ListAllocations(pb.ListAllocationsRequest()).allocations] == [a.id, b.id]
    assert [x.id for x in s.ListAllocations(pb.ListAllocationsRequest(owner="bob")).allocations] == [b.id]
    assert [x.id for x in s.ListAllocations(pb.ListAllocationsRequest(node=a.node)).allocations] == [a.id]
    assert 15 <= s.KeepAlive(pb.KeepAliveRequest(allocation_id=a.id)).ttl_seconds <= 20


def test_idempotent_retry_gives_one_allocation(etcd: harness.Etcd, prefix: str,
                                               two_nodes: harness.Coordinator) -> None:  # fmt: skip
    s = two_nodes.stub
    req = pb.AllocateRequest(gpus=2, request_id="dag.task:run-1+00:00")
    first = s.Allocate(req)
    again = s.Allocate(req)
    assert again.reused and not first.reused
    assert again.allocation.id == first.allocation.id
    assert [g.index for g in again.allocation.gpus] == [g.index for g in first.allocation.gpus]
    assert len(s.ListAllocations(pb.ListAllocationsRequest()).allocations) == 1
    assert sum(k.startswith("gpus/") for k in alloc_keys(etcd, prefix)) == 2


def test_idempotent_retry_when_cluster_is_full(two_nodes: harness.Coordinator) -> None:
    s = two_nodes.stub
    first = s.Allocate(pb.AllocateRequest(gpus=8, request_id="big"))
    # The node is now full because of this very request: a retry must still find it.
    assert s.Allocate(pb.AllocateRequest(gpus=8, request_id="big")).allocation.id == first.allocation.id


def test_list_nodes_and_cordon(two_nodes: harness.Coordinator) -> None:
    s = two_nodes.stub
    nodes = {n.name: n for n in s.ListNodes(pb.ListNodesRequest()).nodes}
    assert nodes["node-b"].inventory.labels == {"zone": "b"}
    assert len(nodes["node-a"].inventory.gpus) == 8 and nodes["node-a"].state == tpb.NODE_STATE_UP
    node = s.CordonNode(pb.CordonNodeRequest(node="node-b", cordoned=True)).node
    assert node.state == tpb.NODE_STATE_CORDONED and node.cordoned
    # Cordoned: no placements there even though it is the best fit.
    assert s.Allocate(pb.AllocateRequest(gpus=1)).allocation.node == "node-a"
    row = {r.name: r for r in harness.summary(s).nodes}["node-b"]
    assert row.state == tpb.NODE_STATE_CORDONED and row.gpus_free == 0 and row.gpus_total == 4
    assert s.CordonNode(pb.CordonNodeRequest(node="node-b", cordoned=False)).node.state == tpb.NODE_STATE_UP
    assert s.Allocate(pb.AllocateRequest(gpus=1)).allocation.node == "node-b"
    err = rpc_error(lambda: s.CordonNode(pb.CordonNodeRequest(node="nope", cordoned=True)))
    assert err.code() == grpc.StatusCode.NOT_FOUND and harness.reason(err) == "NODE_NOT_FOUND"


def test_heartbeat_renews_and_reregisters_after_lapse(coordinator: harness.Coordinator, etcd: harness.Etcd,
                                                      prefix: str) -> None:  # fmt: skip
    s = coordinator.stub
    lease = harness.register(s, "node-h", gpus=2)
    hb = s.Heartbeat(pb.HeartbeatRequest(node="node-h", lease_id=lease))
    assert hb.lease_id == lease and hb.heartbeat_interval_seconds == 2
    # A lease id the coordinator never gave out changes nothing: the node's key is on this
    # replica's session (coordinator/liveness.py), and the answer names it.
    assert s.Heartbeat(pb.HeartbeatRequest(node="node-h", lease_id=12345)).lease_id == lease

    # The node went down (its alive key is gone, as a sweep leaves it): the next heartbeat
    # registers it again, on the session.
    async def mark_down() -> None:
        store = Store([etcd.url])
        await store.start()
        try:
            await store.delete(f"{prefix}alive/node-h")
        finally:
            await store.close()

    asyncio.run(mark_down())
    harness.wait_until(lambda: harness.node_states(s).get("node-h") == tpb.NODE_STATE_DOWN, 5, "node-h down")
    again = s.Heartbeat(pb.HeartbeatRequest(node="node-h", lease_id=lease))
    assert again.lease_id == lease
    harness.wait_until(lambda: harness.node_states(s).get("node-h") == tpb.NODE_STATE_UP, 5, "node-h up again")
    # Inventory changes are written through.
    s.Heartbeat(pb.HeartbeatRequest(node="node-h", lease_id=again.lease_id, address="127.0.0.1:9",
                                     inventory=harness.inventory(4, node="node-h")))  # fmt: skip
    harness.wait_until(
        lambda: {n.name: len(n.inventory.gpus) for n in s.ListNodes(pb.ListNodesRequest()).nodes}.get("node-h") == 4,
        5, "new inventory of node-h",
    )  # fmt: skip
    err = rpc_error(lambda: s.Heartbeat(pb.HeartbeatRequest(node="ghost", lease_id=0)))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "RegisterNode" in err.details()


HUGE = 2**40
BAD_REQUESTS = [
    ("zero gpus", pb.AllocateRequest(gpus=0), "gpus must be at least 1"),
    ("negative gpus", pb.AllocateRequest(gpus=-2), "gpus must be at least 1, got -2"),
    ("huge gpus", pb.AllocateRequest(gpus=2**31 - 1), "more than the limit"),
    ("zero cpus", pb.AllocateRequest(gpus=1, cpus=0), "cpus must be at least 1"),
    ("negative cpus", pb.AllocateRequest(gpus=1, cpus=-1), "cpus must be at least 1"),
    ("huge cpus", pb.AllocateRequest(gpus=1, cpus=2**31 - 1), "cpus of 2147483647 is more than the limit"),
    ("zero memory", pb.AllocateRequest(gpus=1, memory_bytes=0), "memory must be at least 1 bytes"),
    ("negative memory", pb.AllocateRequest(gpus=1, memory_bytes=-5), "memory must be at least 1"),
    ("huge memory", pb.AllocateRequest(gpus=1, memory_bytes=HUGE * HUGE // HUGE * 2**20), "more than the limit"),
    ("ttl too short", pb.AllocateRequest(gpus=1, ttl_seconds=4), "ttl of 4s is out of range"),
    ("ttl too long", pb.AllocateRequest(gpus=1, ttl_seconds=86401), "out of range"),
    ("negative ttl", pb.AllocateRequest(gpus=1, ttl_seconds=-1), "out of range"),
    ("owner too long", pb.AllocateRequest(gpus=1, owner="x" * 129), "owner is 129 characters long"),
    ("owner control chars", pb.AllocateRequest(gpus=1, owner="a\nb"), "control characters"),
    ("bad request id", pb.AllocateRequest(gpus=1, request_id="a b/c"), "request_id"),
    ("request id too long", pb.AllocateRequest(gpus=1, request_id="r" * 257), "request_id"),
    ("model too long", pb.AllocateRequest(gpus=1, gpu_model="m" * 200), "gpu_model is 200 characters"),
    ("bad selector key", pb.AllocateRequest(gpus=1, node_selector={"bad key": "v"}), "node_selector key"),
    ("negative gpu memory", pb.AllocateRequest(gpus=1, min_gpu_memory_bytes=-1), "min_gpu_memory"),
]


@pytest.mark.parametrize(("request_", "message"), [(r, m) for _, r, m in BAD_REQUESTS],
                         ids=[i for i, _, _ in BAD_REQUESTS])  # fmt: skip
def test_bad_allocate_requests_are_invalid_argument_and_write_nothing(
    etcd: harness.Etcd, prefix: str, two_nodes: harness.Coordinator, request_: pb.AllocateRequest, message: str
) -> None:
    err = rpc_error(lambda: two_nodes.stub.Allocate(request_))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert message in err.details()
    assert harness.reason(err) == "INVALID_REQUEST"
    assert alloc_keys(etcd, prefix) == []


def test_larger_than_any_node_is_failed_precondition(etcd: harness.Etcd, prefix: str,
                                                     two_nodes: harness.Coordinator) -> None:  # fmt: skip
    err = rpc_error(lambda: two_nodes.stub.Allocate(pb.AllocateRequest(gpus=9)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "has 8" in err.details() and "node-a" in err.details()
    err = rpc_error(lambda: two_nodes.stub.Allocate(pb.AllocateRequest(gpus=1, cpus=33)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "CPU" in err.details().upper()
    assert alloc_keys(etcd, prefix) == []


def test_busy_cluster_is_resource_exhausted(two_nodes: harness.Coordinator) -> None:
    s = two_nodes.stub
    s.Allocate(pb.AllocateRequest(gpus=8))
    err = rpc_error(lambda: s.Allocate(pb.AllocateRequest(gpus=5)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and harness.reason(err) == "INSUFFICIENT_RESOURCES"


def test_empty_cluster_says_no_nodes(coordinator: harness.Coordinator) -> None:
    err = rpc_error(lambda: coordinator.stub.Allocate(pb.AllocateRequest(gpus=1)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "no nodes" in err.details()


@pytest.mark.parametrize("rpc", ["GetAllocation", "KeepAlive"])
def test_unknown_allocation_is_not_found(coordinator: harness.Coordinator, rpc: str) -> None:
    request = pb.GetAllocationRequest if rpc == "GetAllocation" else pb.KeepAliveRequest
    err = rpc_error(lambda: getattr(coordinator.stub, rpc)(request(allocation_id="0123456789abcdef")))
    assert err.code() == grpc.StatusCode.NOT_FOUND and harness.reason(err) == "ALLOCATION_NOT_FOUND"
    assert "0123456789abcdef" in err.details()


@pytest.mark.parametrize("rpc", ["GetAllocation", "KeepAlive", "Release"])
def test_malformed_allocation_id_is_invalid_argument(coordinator: harness.Coordinator, rpc: str) -> None:
    request = {"GetAllocation": pb.GetAllocationRequest, "KeepAlive": pb.KeepAliveRequest,
               "Release": pb.ReleaseRequest}[rpc]  # fmt: skip
    err = rpc_error(lambda: getattr(coordinator.stub, rpc)(request(allocation_id="../../etc" + "x" * 100)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in err.details()


@pytest.mark.parametrize(
    ("node", "address", "message"),
    [("bad name!", "127.0.0.1:1", "not a valid node name"), ("n" * 64, "127.0.0.1:1", "not a valid node name"),
     ("ok", "no-port", "HOST:PORT"), ("ok", "h:99999", "HOST:PORT")],
)  # fmt: skip
def test_bad_registrations_are_refused(etcd: harness.Etcd, prefix: str, coordinator: harness.Coordinator,
                                       node: str, address: str, message: str) -> None:  # fmt: skip
    err = rpc_error(
        lambda: coordinator.stub.RegisterNode(
            pb.RegisterNodeRequest(node=node, address=address, inventory=harness.inventory(1))
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.details()
    assert harness.etcd_keys(etcd.url, prefix) == []


def test_unreachable_etcd_is_unavailable_with_url_hint(tmp_path: Path) -> None:
    from gpulease.dev import procs

    dead = f"http://127.0.0.1:{procs.free_port()}"
    with LocalCluster(tmp_path, etcd_url=dead).start(coordinators=0) as cluster:
        coordinator = cluster.add_coordinator(extra_args=["--etcd-timeout", "1"], wait=False)
        port = int(coordinator.address.rsplit(":", 1)[1])
        harness.wait_until(lambda: procs.port_is_free(port) is False, 15, "coordinator port")
        channel = cluster.channel(coordinator.address)
        stub = harness.pb_grpc.CoordinatorServiceStub(channel)
        unknown = pb.GetAllocationRequest(allocation_id="0123456789abcdef")
        for call in (lambda: stub.Allocate(pb.AllocateRequest(gpus=1), timeout=10),
                     lambda: stub.ListNodes(pb.ListNodesRequest(), timeout=10),
                     lambda: stub.GetAllocation(unknown, timeout=10)):  # fmt: skip
            err = rpc_error(call)
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
            assert dead in err.details() and "--etcd" in err.details()
        channel.close()
        assert coordinator.process.alive()  # bad input and a dead etcd never crash the coordinator


def test_stats_count_commits_and_allocations(two_nodes: harness.Coordinator) -> None:
    s = two_nodes.stub
    before = s.GetStats(pb.GetStatsRequest())
    for _ in range(3):
        s.Allocate(pb.AllocateRequest(gpus=1))
    after = s.GetStats(pb.GetStatsRequest())
    assert after.allocations_committed - before.allocations_committed == 3
    assert 1 <= after.commits - before.commits <= 3
    assert after.nodes == 2 and after.view_revision >= before.view_revision
