"""Client error mapping and failover against tiny in-process gRPC servers (no coordinator, no etcd)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import grpc
import pytest

from gpulease import errors
from gpulease.cli.main import main
from gpulease.client import Client
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import coordinator_pb2_grpc, types_pb2
from tests.support import harness

Failure = tuple[grpc.StatusCode, str | None, str]


class FakeCoordinator(coordinator_pb2_grpc.CoordinatorServiceServicer, coordinator_pb2_grpc.AdminServiceServicer):
    """Users' and operators' services (what a client calls): aborts every call with ``fail`` when
    set; records what reached it."""

    def __init__(self, fail: Failure | None = None, delay: float = 0.0) -> None:
        self.fail = fail
        self.delay = delay
        self.calls: list[str] = []
        self.request_ids: list[str] = []

    def _answer(self, method: str, context: grpc.ServicerContext) -> None:
        self.calls.append(method)
        time.sleep(self.delay)
        if self.fail is not None:
            code, reason, details = self.fail
            if reason is not None:
                context.set_trailing_metadata(((errors.REASON_METADATA_KEY, reason),))
            context.abort(code, details)

    def ListNodes(self, request: pb.ListNodesRequest, context: grpc.ServicerContext) -> pb.ListNodesResponse:
        self._answer("ListNodes", context)
        return pb.ListNodesResponse(nodes=[types_pb2.Node(name="node-0", state=types_pb2.NODE_STATE_UP)])

    def Allocate(self, request: pb.AllocateRequest, context: grpc.ServicerContext) -> pb.AllocateResponse:
        self.request_ids.append(request.request_id)
        self._answer("Allocate", context)
        alloc = types_pb2.Allocation(
            id="a1", node="node-0", request_id=request.request_id, ttl_seconds=request.ttl_seconds
        )
        alloc.gpus.add(index=0, uuid="GPU-0", model="sim")
        return pb.AllocateResponse(allocation=alloc)

    # The rest answer with empty responses, so every client method can be checked for error mapping.
    def Release(self, request: pb.ReleaseRequest, context: grpc.ServicerContext) -> pb.ReleaseResponse:
        self._answer("Release", context)
        return pb.ReleaseResponse(released=True)

    def KeepAlive(self, request: pb.KeepAliveRequest, context: grpc.ServicerContext) -> pb.KeepAliveResponse:
        self._answer("KeepAlive", context)
        return pb.KeepAliveResponse(ttl_seconds=60)

    def GetAllocation(
        self, request: pb.GetAllocationRequest, context: grpc.ServicerContext
    ) -> pb.GetAllocationResponse:
        self._answer("GetAllocation", context)
        return pb.GetAllocationResponse(allocation=types_pb2.Allocation(id=request.allocation_id))

    def ListAllocations(
        self, request: pb.ListAllocationsRequest, context: grpc.ServicerContext
    ) -> pb.ListAllocationsResponse:
        self._answer("ListAllocations", context)
        return pb.ListAllocationsResponse()

    def GetClusterSummary(
        self, request: pb.GetClusterSummaryRequest, context: grpc.ServicerContext
    ) -> pb.GetClusterSummaryResponse:
        self._answer("GetClusterSummary", context)
        return pb.GetClusterSummaryResponse(revision=7)

    def CordonNode(self, request: pb.CordonNodeRequest, context: grpc.ServicerContext) -> pb.CordonNodeResponse:
        self._answer("CordonNode", context)
        node = types_pb2.Node(name=request.node, cordoned=request.cordoned, state=types_pb2.NODE_STATE_CORDONED)
        return pb.CordonNodeResponse(node=node)


def closed_port_address() -> str:
    """An address nothing listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def raised_by(address: str | list[str], call: Callable[[Client], object]) -> errors.GpuLeaseError:
    with Client(address, timeout=5) as client, pytest.raises(errors.GpuLeaseError) as info:
        call(client)
    err = info.value
    # Callers never see gRPC: not the class, not a chained cause.
    assert not isinstance(err, grpc.RpcError)
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    return err


# Status codes without a reason (e.g. raised by gRPC itself) map by code.
@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidRequest),
        (grpc.StatusCode.OUT_OF_RANGE, errors.InvalidRequest),
        (grpc.StatusCode.FAILED_PRECONDITION, errors.Unsatisfiable),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.InsufficientResources),
        (grpc.StatusCode.NOT_FOUND, errors.AllocationNotFound),
        (grpc.StatusCode.ABORTED, errors.Conflict),
        (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDenied),
        (grpc.StatusCode.UNAUTHENTICATED, errors.Unauthenticated),
        (grpc.StatusCode.UNAVAILABLE, errors.Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceeded),
        (grpc.StatusCode.INTERNAL, errors.Internal),
        # gRPC's own failure of the call (gpulease.common.rpc_status): the coordinator did not answer.
        (grpc.StatusCode.UNKNOWN, errors.Unavailable),
        (grpc.StatusCode.UNIMPLEMENTED, errors.Internal),
        (grpc.StatusCode.ALREADY_EXISTS, errors.AlreadyExists),
        (grpc.StatusCode.DATA_LOSS, errors.Internal),
    ],
)
def test_status_code_maps_to_error_class(
    serve_fake: harness.ServeFake, code: grpc.StatusCode, expected: type[errors.GpuLeaseError]
) -> None:
    address = serve_fake(FakeCoordinator(fail=(code, None, "boom")))
    err = raised_by(address, lambda c: c.list_nodes())
    assert type(err) is expected
    if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN):
        assert err.message == "boom"


@pytest.mark.parametrize("cls", errors.ALL_ERRORS, ids=lambda c: c.__name__)
def test_reason_metadata_rebuilds_exact_class(serve_fake: harness.ServeFake, cls: type[errors.GpuLeaseError]) -> None:
    address = serve_fake(FakeCoordinator(fail=(grpc.StatusCode[cls.code], cls.reason, "server says no")))
    err = raised_by(address, lambda c: c.list_nodes())
    assert type(err) is cls
    assert err.message.startswith("server says no")


@pytest.mark.parametrize(
    ("code", "reason", "expected"),
    [
        (grpc.StatusCode.NOT_FOUND, "NODE_NOT_FOUND", errors.NodeNotFound),
        (grpc.StatusCode.NOT_FOUND, "ALLOCATION_LOST", errors.AllocationLost),
        (grpc.StatusCode.FAILED_PRECONDITION, "STALE_FENCING_TOKEN", errors.StaleFencingToken),
        # The reason wins even when the code disagrees with it.
        (grpc.StatusCode.INTERNAL, "INSUFFICIENT_RESOURCES", errors.InsufficientResources),
        # An unknown reason falls back to the code.
        (grpc.StatusCode.INVALID_ARGUMENT, "SOMETHING_NEW", errors.InvalidRequest),
    ],
)
def test_reason_beats_code(
    serve_fake: harness.ServeFake, code: grpc.StatusCode, reason: str, expected: type[errors.GpuLeaseError]
) -> None:
    address = serve_fake(FakeCoordinator(fail=(code, reason, "details")))
    assert type(raised_by(address, lambda c: c.list_nodes())) is expected


CLIENT_CALLS: dict[str, Callable[[Client], object]] = {
    "allocate": lambda c: c.allocate(gpus=1),
    "release": lambda c: c.release("a1"),
    "keep_alive": lambda c: c.keep_alive("a1"),
    "get_allocation": lambda c: c.get_allocation("a1"),
    "list_allocations": lambda c: c.list_allocations(),
    "list_nodes": lambda c: c.list_nodes(),
    "cluster_summary": lambda c: c.cluster_summary(),
    "cordon": lambda c: c.cordon("node-0"),
}


@pytest.mark.parametrize("call", CLIENT_CALLS.values(), ids=CLIENT_CALLS.keys())
def test_every_method_maps_errors(serve_fake: harness.ServeFake, call: Callable[[Client], object]) -> None:
    fail = (grpc.StatusCode.NOT_FOUND, "NODE_NOT_FOUND", "no node 'x'")
    err = raised_by(serve_fake(FakeCoordinator(fail=fail)), call)
    assert type(err) is errors.NodeNotFound and err.message == "no node 'x'"


def test_methods_return_models(serve_fake: harness.ServeFake) -> None:
    with Client(serve_fake(FakeCoordinator()), timeout=5) as client:
        assert client.release("a1") is True
        assert client.keep_alive("a1") == 60
        assert client.get_allocation("a9").id == "a9"
        assert client.list_allocations() == []
        assert client.cluster_summary().revision == 7
        assert [n.state for n in client.list_nodes()] == ["up"]
        cordoned = client.cordon("node-3")
        assert (cordoned.name, cordoned.state, cordoned.cordoned) == ("node-3", "cordoned", True)


def test_unavailable_fails_over_to_next_target(serve_fake: harness.ServeFake) -> None:
    address = serve_fake(FakeCoordinator())
    dead = closed_port_address()
    with Client([dead, address], timeout=5) as client:
        alloc = client.allocate(gpus=1, request_id="req-1")
    assert alloc.request_id == "req-1"
    assert alloc.gpus[0].uuid == "GPU-0"


def test_allocate_retry_reuses_the_same_request_id(serve_fake: harness.ServeFake) -> None:
    # The first coordinator receives the request but answers UNAVAILABLE; the retry on the second
    # must carry the same idempotency key, so a duplicate cannot allocate twice.
    first = FakeCoordinator(fail=(grpc.StatusCode.UNAVAILABLE, None, "etcd unreachable"))
    second = FakeCoordinator()
    targets = [serve_fake(first), serve_fake(second)]
    with Client(targets, timeout=5) as client:
        alloc = client.allocate(gpus=1, ttl="60s")
        assert len(first.request_ids) == 1
        assert first.request_ids == second.request_ids == [alloc.request_id]
        assert len(alloc.request_id) == 32  # a fresh uuid4 hex
        assert alloc.ttl_seconds == 60
        # Later calls start at the target that answered.
        client.list_nodes()
    assert first.calls == ["Allocate"]
    assert second.calls == ["Allocate", "ListNodes"]


def test_other_errors_do_not_fail_over(serve_fake: harness.ServeFake) -> None:
    first = FakeCoordinator(fail=(grpc.StatusCode.RESOURCE_EXHAUSTED, "INSUFFICIENT_RESOURCES", "full"))
    second = FakeCoordinator()
    err = raised_by([serve_fake(first), serve_fake(second)], lambda c: c.allocate(gpus=1))
    assert isinstance(err, errors.InsufficientResources)
    assert second.calls == []


def test_unreachable_coordinator_names_the_addresses() -> None:
    dead1, dead2 = closed_port_address(), closed_port_address()
    err = raised_by([dead1, dead2], lambda c: c.list_nodes())
    assert isinstance(err, errors.Unavailable)
    assert dead1 in err.message and dead2 in err.message
    assert "GPULEASE_COORDINATOR" in err.message


def test_server_side_unavailable_keeps_the_servers_message(serve_fake: harness.ServeFake) -> None:
    fail = (grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE", "etcd is unreachable")
    address = serve_fake(FakeCoordinator(fail=fail))
    err = raised_by(address, lambda c: c.list_nodes())
    assert isinstance(err, errors.Unavailable)
    assert "etcd is unreachable" in err.message and address in err.message


def test_client_deadline_names_the_slow_coordinator(serve_fake: harness.ServeFake) -> None:
    address = serve_fake(FakeCoordinator(delay=1.0))
    with Client(address, timeout=0.2) as client, pytest.raises(errors.DeadlineExceeded) as info:
        client.list_nodes()
    assert address in info.value.message and "0.2s" in info.value.message


def test_bad_request_values_are_invalid_requests_before_any_rpc() -> None:
    # Nothing listens here; the errors must come from local parsing, not from a connection attempt.
    with Client(closed_port_address(), timeout=1) as client:
        with pytest.raises(errors.InvalidRequest, match="memory"):
            client.allocate(gpus=1, memory="lots")
        with pytest.raises(errors.InvalidRequest, match="duration"):
            client.allocate(gpus=1, ttl="soon")
        with pytest.raises(errors.InvalidRequest):
            client.allocate(gpus=2**40)  # does not fit the int32 field


def test_client_needs_an_address() -> None:
    with pytest.raises(errors.InvalidRequest, match="no coordinator address"):
        Client(" , ")


def test_gpuctl_unreachable_coordinator_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    dead = closed_port_address()
    assert main(["--coordinator", dead, "--timeout", "2", "status"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    # The library's retry notes come first, as gpuctl lines; the error is the last line.
    lines = err.splitlines()
    assert lines[-1].startswith("gpuctl: error: ") and all(line.startswith("gpuctl: ") for line in lines)
    assert dead in lines[-1] and "Traceback" not in err


def test_gpuctl_maps_server_errors(serve_fake: harness.ServeFake, capsys: pytest.CaptureFixture[str]) -> None:
    fail = (grpc.StatusCode.FAILED_PRECONDITION, "UNSATISFIABLE", "no node has 9 GPUs")
    address = serve_fake(FakeCoordinator(fail=fail))
    assert main(["allocate", "--gpus", "9", "--coordinator", address]) == 1
    assert capsys.readouterr().err == "gpuctl: error: no node has 9 GPUs\n"
