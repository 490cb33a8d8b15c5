"""Issue 11, defect 2: GPUs are claimed by UUID, the physical GPU, not by index.

A GPU that falls off the bus re-numbers the others at the next boot. Claims by index followed
the index to another physical GPU: two live allocations shared one GPU. Against a real
coordinator process and etcd.
"""

from __future__ import annotations

import grpc

from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import types_pb2 as tpb
from tests.support import harness
from tests.support.harness import GiB, rpc_error


def inventory(uuids: list[str]) -> tpb.NodeInventory:
    return tpb.NodeInventory(
        gpus=[
            tpb.Gpu(index=i, uuid=u, model="H100", memory_total_bytes=80 * GiB, healthy=True)
            for i, u in enumerate(uuids)
        ],
        cpus_total=32,
        memory_total_bytes=256 * GiB,
    )


def register(s: object, uuids: list[str]) -> None:
    s.RegisterNode(pb.RegisterNodeRequest(node="n1", address="127.0.0.1:1", inventory=inventory(uuids)))  # type: ignore[attr-defined]


def test_a_held_gpu_stays_held_when_a_reboot_renumbers_it(coordinator: harness.Coordinator) -> None:
    s = coordinator.stub
    register(s, ["GPU-U0", "GPU-U1"])
    harness.wait_nodes_up(s, {"n1"})
    a1 = s.Allocate(pb.AllocateRequest(gpus=1)).allocation
    a2 = s.Allocate(pb.AllocateRequest(gpus=1)).allocation
    assert [(g.index, g.uuid) for g in a2.gpus] == [(1, "GPU-U1")]
    s.Release(pb.ReleaseRequest(allocation_id=a1.id))
    # GPU-U0 falls off the bus and the host reboots: GPU-U1 is index 0 now, a new GPU-U2 index 1.
    register(s, ["GPU-U1", "GPU-U2"])

    def first_uuid() -> str:
        return str(s.ListNodes(pb.ListNodesRequest()).nodes[0].inventory.gpus[0].uuid)

    harness.wait_until(lambda: first_uuid() == "GPU-U1", 5, "the re-registered inventory")
    node = s.ListNodes(pb.ListNodesRequest()).nodes[0]
    assert list(node.allocated_gpu_indexes) == [0]  # GPU-U1, held by a2, under its new index
    b = s.Allocate(pb.AllocateRequest(gpus=1)).allocation
    assert [(g.index, g.uuid) for g in b.gpus] == [(1, "GPU-U2")]
    err = rpc_error(lambda: s.Allocate(pb.AllocateRequest(gpus=1)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    live = s.ListAllocations(pb.ListAllocationsRequest()).allocations
    uuids = [g.uuid for a in live for g in a.gpus]
    assert sorted(uuids) == ["GPU-U1", "GPU-U2"]  # every physical GPU in at most one allocation


def test_gpu_uuids_are_checked_and_a_gpu_without_one_is_never_handed_out(coordinator: harness.Coordinator) -> None:
    s = coordinator.stub
    for bad, why in (("GPU/../x", "UUID"), ("0003", "UUID")):
        err = rpc_error(lambda bad=bad: register(s, [bad]))  # type: ignore[misc]
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and why in (err.details() or "")
    err = rpc_error(lambda: register(s, ["GPU-A", "GPU-A"]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "twice" in (err.details() or "")
    assert s.ListNodes(pb.ListNodesRequest()).nodes == []  # nothing was stored
    # NVML could not read one GPU's UUID: the node registers, that GPU is unhealthy and never placed.
    register(s, ["", "GPU-B"])
    harness.wait_nodes_up(s, {"n1"})
    gpus = s.ListNodes(pb.ListNodesRequest()).nodes[0].inventory.gpus
    assert [(g.index, g.healthy) for g in gpus] == [(0, False), (1, True)]
    assert "no UUID" in gpus[0].health_detail
    assert [g.uuid for g in s.Allocate(pb.AllocateRequest(gpus=1)).allocation.gpus] == ["GPU-B"]
    assert rpc_error(lambda: s.Allocate(pb.AllocateRequest(gpus=1))).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
