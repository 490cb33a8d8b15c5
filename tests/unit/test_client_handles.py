"""The client's handles hold a record and a session (composition), and the sync and asyncio sides
have the same methods by construction: checked against a tiny in-process fake coordinator that
hands out one allocation record (no etcd)."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import inspect
import pickle
from collections.abc import Iterator

import grpc
import pytest

from gpulease.client import AllocatedGpu, Allocation, AllocationInfo, Client, ContainerHandle
from gpulease.client.aio import AsyncAllocation, AsyncClient, AsyncContainerHandle
from gpulease.client.models import Container
from gpulease.errors import GpuLeaseError, PermissionDenied
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import coordinator_pb2_grpc
from gpulease.v1 import types_pb2 as tpb
from tests.support import harness

INFO = AllocationInfo(
    id="0123456789a0123456789", node="n1", gpus=(AllocatedGpu(3, "GPU-3", "H100"),), cpus=4, memory_bytes=2**30,
    ttl_seconds=60, revision=7, owner="me", request_id="r1", created_unix_ms=1, node_address="10.0.0.1:50052",
)  # fmt: skip
NOWHERE = "127.0.0.1:1"


class Records(coordinator_pb2_grpc.CoordinatorServiceServicer):
    """GetAllocation answers INFO; asked for another id (a number), INFO with that revision."""

    def GetAllocation(
        self, request: pb.GetAllocationRequest, context: grpc.ServicerContext
    ) -> pb.GetAllocationResponse:
        info = (
            INFO if request.allocation_id == INFO.id else dataclasses.replace(INFO, revision=int(request.allocation_id))
        )
        record = tpb.Allocation(**{f.name: getattr(info, f.name) for f in dataclasses.fields(info) if f.name != "gpus"})
        record.gpus.extend(tpb.AllocatedGpu(index=g.index, uuid=g.uuid, model=g.model) for g in info.gpus)
        return pb.GetAllocationResponse(allocation=record)


@pytest.fixture
def client(serve_fake: harness.ServeFake) -> Iterator[Client]:
    with Client(serve_fake(Records()), timeout=5, handle_sigterm=False) as c:
        yield c


def public(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def test_a_handle_has_a_record_and_reads_its_fields(client: Client) -> None:
    alloc = client.get_allocation(INFO.id)
    assert isinstance(alloc, Allocation) and alloc.info == INFO
    assert not isinstance(alloc, AllocationInfo)  # composition, not a subclass of the record
    # Every field of the record reads through the handle: a field added to AllocationInfo without
    # a matching one on the handle fails here.
    for f in dataclasses.fields(AllocationInfo):
        assert getattr(alloc, f.name) == getattr(INFO, f.name), f.name
    assert alloc.gpu_indexes == (3,) and alloc.to_dict() == INFO.to_dict()
    assert not alloc.lost and alloc.lost_reason is None and not alloc.released


def test_a_handle_is_read_only_and_copies_as_its_record(client: Client) -> None:
    alloc = client.get_allocation(INFO.id)
    with pytest.raises(dataclasses.FrozenInstanceError):
        alloc.id = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        alloc.extra = 1  # type: ignore[attr-defined]
    # Equal records, equal handles (as when a dataclass); a record is not a handle.
    again = client.get_allocation(INFO.id)
    assert again is not alloc and again == alloc and hash(again) == hash(alloc)
    assert alloc != client.get_allocation("8")  # the same record but for its revision
    assert alloc != INFO
    assert repr(alloc) == "Allocation" + repr(INFO).removeprefix("AllocationInfo")
    # Pickled or copied: the record; threads, locks and channels do not travel.
    for copied in (pickle.loads(pickle.dumps(alloc)), copy.copy(alloc), copy.deepcopy(alloc)):
        assert type(copied) is AllocationInfo and copied == INFO


def test_a_record_alone_cannot_act() -> None:
    assert not hasattr(INFO, "release") and not hasattr(INFO, "keep_alive")
    with pytest.raises(TypeError):
        Allocation(**dataclasses.asdict(INFO))  # type: ignore[call-arg]


def test_sync_and_async_sides_have_the_same_methods_and_signatures() -> None:
    pairs = [(Client, AsyncClient), (Allocation, AsyncAllocation), (ContainerHandle, AsyncContainerHandle)]
    for sync, aio in pairs:
        assert public(sync) == public(aio), (sync, aio)
        for name in public(aio):
            if callable(getattr(aio, name)) and name != "keepalive":
                s, a = inspect.signature(getattr(sync, name)), inspect.signature(getattr(aio, name))
                assert list(s.parameters) == list(a.parameters), (sync, name)
    # AsyncClient has no SIGTERM handling (signals belong to whoever runs the event loop).
    sync_init = [p for p in inspect.signature(Client).parameters if p != "handle_sigterm"]
    assert sync_init == list(inspect.signature(AsyncClient).parameters)


def test_methods_are_named_and_documented_like_their_calls() -> None:
    assert Client.release.__name__ == "release" and "End an allocation" in (Client.release.__doc__ or "")
    assert list(inspect.signature(Client.allocate).parameters)[:3] == ["self", "gpus", "cpus"]
    # The handle fills in the allocation id.
    assert list(inspect.signature(Allocation.run_container).parameters)[:2] == ["self", "image"]
    client = Client(NOWHERE, timeout=1)
    try:
        assert list(inspect.signature(client.wait_container).parameters) == ["allocation_id", "container_id", "timeout"]
    finally:
        client.close()


async def test_async_methods_return_coroutines() -> None:
    async with AsyncClient(NOWHERE, timeout=1, retry_deadline=0) as client:
        call = client.cluster_summary()
        assert inspect.iscoroutine(call)
        call.close()
        stream = client.logs("a1", follow=True)
        assert inspect.isasyncgen(stream)
        await stream.aclose()
    assert asyncio.iscoroutinefunction(AsyncAllocation.keep_alive)


class LogsRefused(Records):
    """StreamLogs is refused as an agent at its log-stream limit refuses it; WaitContainer answers
    that the container exited with 7 (after ``waits`` calls that say it still runs)."""

    def __init__(self, code: grpc.StatusCode, reason: str, waits: int = 2) -> None:
        self.code, self.reason, self.waits, self.asked = code, reason, waits, []

    def StreamLogs(self, request: tpb.StreamLogsRequest, context: grpc.ServicerContext) -> Iterator[tpb.LogChunk]:
        self.asked.append("StreamLogs")
        yield tpb.LogChunk(data=b"first line\n", stream="stdout")
        context.set_trailing_metadata((("gpulease-reason", self.reason),))
        context.abort(self.code, "rule 'log-streams': allocation a1 has 4 log stream(s) in flight on node n1")

    def WaitContainer(self, request: tpb.WaitContainerRequest, context: grpc.ServicerContext) -> tpb.ContainerStatus:
        self.asked.append("WaitContainer")
        self.waits -= 1
        state = tpb.CONTAINER_STATE_EXITED if self.waits < 0 else tpb.CONTAINER_STATE_RUNNING
        status = tpb.ContainerStatus(container_id="c" * 64, allocation_id=INFO.id, state=state, node="n1")
        if state == tpb.CONTAINER_STATE_EXITED:
            status.exit_code = 7
        return status


def running_container() -> Container:
    return Container(id="c" * 64, allocation_id=INFO.id, revision=7, state="running", exit_code=None, image="i",
                     name="job", node="n1", gpu_indexes=(3,))  # fmt: skip


@pytest.mark.parametrize(
    ("code", "reason"),
    [(grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED"), (grpc.StatusCode.INTERNAL, "INTERNAL")],
)
def test_follow_waits_for_the_container_when_its_log_stream_is_refused(
    serve_fake: harness.ServeFake, code: grpc.StatusCode, reason: str
) -> None:
    fake = LogsRefused(code, reason)
    with Client(serve_fake(fake), timeout=5, handle_sigterm=False) as client:
        job = ContainerHandle(client.get_allocation(INFO.id), running_container())
        chunks: list[bytes] = []
        why: list[GpuLeaseError] = []
        status = job.follow(lambda c: chunks.append(c.data), on_fallback=why.append)
    assert status.exited and status.exit_code == 7
    assert chunks == [b"first line\n"] and len(why) == 1 and "log-streams" in why[0].message
    assert fake.asked == ["StreamLogs", "WaitContainer", "WaitContainer", "WaitContainer"]


def test_follow_raises_what_waiting_cannot_help(serve_fake: harness.ServeFake) -> None:
    fake = LogsRefused(grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
    with Client(serve_fake(fake), timeout=5, handle_sigterm=False) as client:
        job = ContainerHandle(client.get_allocation(INFO.id), running_container())
        with pytest.raises(PermissionDenied):
            job.follow(lambda c: None)
    assert fake.asked == ["StreamLogs"]


async def test_async_follow_waits_for_the_container_when_its_log_stream_is_refused(
    serve_fake: harness.ServeFake,
) -> None:
    fake = LogsRefused(grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED", waits=0)
    async with AsyncClient(serve_fake(fake), timeout=5) as client:
        job = AsyncContainerHandle(await client.get_allocation(INFO.id), running_container())
        status = await job.follow(lambda c: None)
    assert status.exit_code == 7 and fake.asked == ["StreamLogs", "WaitContainer"]
