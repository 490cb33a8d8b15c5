"""The coordinator's API is split by audience (issue 12, point 2): users, agents and operators each
have a service of their own, so that who may call what can be decided per service."""

from __future__ import annotations

import grpc

from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import coordinator_pb2_grpc as pb_grpc
from tests.support import harness
from tests.support.harness import rpc_error

AUDIENCES = {
    "CoordinatorService": {
        "Allocate", "WaitAllocate", "ListPending", "Release", "CancelRequest", "KeepAlive", "GetAllocation",
        "ListAllocations",
        "ListNodes", "GetClusterSummary", "RunContainer", "WaitContainer", "StreamLogs", "StopContainer",
        "ListContainers", "WhoAmI", "ListQuotas", "ListPriorityClasses", "ListReservations",
        "WatchEvents",
    },
    "NodeService": {"RegisterNode", "Heartbeat", "ListNodeAllocations", "GetNodeAllocation"},
    "AdminService": {
        "CordonNode", "DeleteNode", "GetStats", "CreateToken", "ListTokens", "RevokeToken", "ReadAudit",
        "SetQuota", "DeleteQuota", "SetPriorityClass", "DeletePriorityClass", "CreateReservation",
        "DeleteReservation",
    },
}  # fmt: skip


def test_each_audience_has_its_own_service_and_rpc_names_are_unique() -> None:
    services = pb.DESCRIPTOR.services_by_name
    assert {name: {m.name for m in s.methods} for name, s in services.items()} == AUDIENCES
    names = [m.name for s in services.values() for m in s.methods]
    assert len(names) == len(set(names)), "clients and test tooling route calls by RPC name"


def test_an_agent_call_is_not_served_as_a_user_call(coordinator: harness.Coordinator) -> None:
    call = coordinator.channel.unary_unary(
        "/gpulease.v1.CoordinatorService/RegisterNode",
        request_serializer=pb.RegisterNodeRequest.SerializeToString,
        response_deserializer=pb.RegisterNodeResponse.FromString,
    )
    err = rpc_error(lambda: call(pb.RegisterNodeRequest(node="n1", address="127.0.0.1:1")))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED
    assert coordinator.stub.ListNodes(pb.ListNodesRequest()).nodes == []  # nothing registered


def test_the_node_service_reads_a_node_s_own_allocations(coordinator: harness.Coordinator) -> None:
    harness.register(coordinator.stub, "n1", gpus=2)
    harness.wait_nodes_up(coordinator.stub, {"n1"})
    a = coordinator.stub.Allocate(pb.AllocateRequest(gpus=1)).allocation
    nodes = pb_grpc.NodeServiceStub(coordinator.channel)
    listed = nodes.ListNodeAllocations(pb.ListAllocationsRequest(node="n1")).allocations
    assert [x.id for x in listed] == [a.id]
    assert nodes.GetNodeAllocation(pb.GetAllocationRequest(allocation_id=a.id)).allocation.revision == a.revision
    err = rpc_error(lambda: nodes.ListNodeAllocations(pb.ListAllocationsRequest()))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "node" in (err.details() or "")
