"""The one rule that reads a gRPC status back into a gpulease error (gpulease/rpc_status.py), and
the three places that decode a peer's status all following it."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import pytest

from gpulease import errors
from gpulease.agent.fencing import CoordinatorClient
from gpulease.client.rpc_errors import to_error
from gpulease.common.rpc_status import decode
from gpulease.coordinator.agents import agent_error
from gpulease.errors import REASON_METADATA_KEY

S = grpc.StatusCode


@dataclass
class Status(grpc.RpcError):
    """A failed call as gRPC hands it over: code, details, trailing metadata."""

    status: grpc.StatusCode
    reason: str | None = None
    text: str = "peer's words"

    def code(self) -> grpc.StatusCode:
        return self.status

    def details(self) -> str:
        return self.text

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((REASON_METADATA_KEY, self.reason),) if self.reason else ()


RULES = [
    # A gpulease servicer's answer keeps its class and words, whatever the code.
    (Status(S.UNAVAILABLE, "UNAVAILABLE"), None, errors.Unavailable, "peer's words"),
    (Status(S.NOT_FOUND, "CONTAINER_NOT_FOUND"), None, errors.ContainerNotFound, "peer's words"),
    (Status(S.FAILED_PRECONDITION, "STALE_FENCING_TOKEN"), None, errors.StaleFencingToken, "peer's words"),
    (Status(S.UNKNOWN, "INTERNAL"), None, errors.Internal, "peer's words"),
    (Status(S.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"), 5.0, errors.DeadlineExceeded, "peer's words"),
    # gRPC's own failures: the peer did not answer (or the caller's own deadline passed).
    (Status(S.DEADLINE_EXCEEDED), 5.0, errors.DeadlineExceeded, "did not answer within 5s"),
    (Status(S.DEADLINE_EXCEEDED), None, errors.Unavailable, "did not answer"),
    (Status(S.UNAVAILABLE), None, errors.Unavailable, "did not answer"),
    (Status(S.CANCELLED), None, errors.Unavailable, "did not answer"),
    (Status(S.UNKNOWN), None, errors.Unavailable, "did not answer"),
    # Any other code without a reason: the class for the code.
    (Status(S.NOT_FOUND), None, errors.AllocationNotFound, "peer's words"),
    (Status(S.PERMISSION_DENIED), None, errors.PermissionDenied, "peer's words"),
    (Status(S.INTERNAL), None, errors.Internal, "peer's words"),
]


@pytest.mark.parametrize(("status", "deadline", "cls", "words"), RULES)
def test_the_rule(status: Status, deadline: float | None, cls: type[errors.GpuLeaseError], words: str) -> None:
    err = decode(status, "the peer at h:1", deadline=deadline)
    assert type(err) is cls and words in err.message


@pytest.mark.parametrize(("status", "deadline", "cls", "words"), RULES)
def test_every_decoder_follows_it(
    status: Status, deadline: float | None, cls: type[errors.GpuLeaseError], words: str
) -> None:
    # The client always has its own deadline; the coordinator calling an agent, and the agent
    # checking a fencing token, report one as 'did not answer'.
    client = to_error(status, "h:1", deadline if deadline is not None else 10.0)
    coordinator = agent_error(status, "n1", "h:1")  # type: ignore[arg-type]
    agent = CoordinatorClient.__new__(CoordinatorClient)  # only its decoding is used here
    agent._address = "h:1"
    fence = agent._error(status, "GetAllocation(x)")  # type: ignore[arg-type]
    expected_client = errors.DeadlineExceeded if status.status == S.DEADLINE_EXCEEDED and not status.reason else cls
    expected_coordinator = errors.Unavailable if status.status == S.DEADLINE_EXCEEDED and not status.reason else cls
    assert type(client) is expected_client
    assert type(coordinator) is expected_coordinator
    assert type(fence) is expected_coordinator
