"""The one place that reads a gRPC status back into a gpulease error (issue 12, point 4).

Three callers decode statuses from a peer: the client (from a coordinator), the coordinator (from
an agent, forwarding container calls) and the agent (from the coordinator, checking a fencing
token). They follow one rule, so the same failure means the same thing wherever it is read:

| status                                  | reason metadata | becomes                                   |
|-----------------------------------------|-----------------|-------------------------------------------|
| any code                                | present         | the peer's own error: its class, its words |
| DEADLINE_EXCEEDED, caller's own deadline| absent          | DeadlineExceeded naming the peer and wait |
| UNAVAILABLE, DEADLINE_EXCEEDED,         | absent          | Unavailable: "<peer> did not answer"      |
| CANCELLED, UNKNOWN                      |                 | (gRPC itself failed the call)             |
| any other code                          | absent          | the class for the code (errors.BY_CODE)   |

A status with our reason was raised by a gpulease servicer on purpose; one without it came from
gRPC (transport, deadline, a peer that is not ours), which says nothing about the peer's state.

Works for sync errors and grpc.aio's AioRpcError alike: only code(), details() and
trailing_metadata() are used. Imports grpc and gpulease.errors only: the client may use it.
"""

from __future__ import annotations

import grpc

from gpulease.errors import REASON_METADATA_KEY, DeadlineExceeded, GpuLeaseError, Unavailable, error_for

# gRPC's own failures of a call: the peer's state is unknown, so it "did not answer".
NO_ANSWER = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN}
)


def status_code(err: grpc.RpcError) -> grpc.StatusCode | None:
    # RpcError itself declares nothing; the errors raised by stubs are also grpc.Call objects.
    code = getattr(err, "code", None)
    return code() if callable(code) else None


def details(err: grpc.RpcError) -> str:
    text = getattr(err, "details", None)
    value = text() if callable(text) else None
    return str(value) if value else ""


def reason_of(err: grpc.RpcError) -> str | None:
    """The gpulease reason a servicer put in trailing metadata, if any."""
    trailing = getattr(err, "trailing_metadata", None)
    metadata = trailing() if callable(trailing) else None
    for key, value in metadata or ():
        if key == REASON_METADATA_KEY:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def decode(err: grpc.RpcError, peer: str, call: str = "", *, deadline: float | None = None) -> GpuLeaseError:
    """The gpulease error for ``err``, a failed ``call`` to ``peer`` ("the agent of node n1 at
    10.0.0.5:50052"). ``deadline``: the caller's own deadline in seconds, when it set one and
    wants a DeadlineExceeded for it rather than an Unavailable."""
    code = status_code(err)
    name = code.name if code is not None else "UNKNOWN"
    reason = reason_of(err)
    text = details(err)
    if reason is not None:
        return error_for(name, reason, text or f"{name} from {peer}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and deadline is not None:
        return DeadlineExceeded(f"{peer} did not answer within {deadline:g}s" + (f" ({call})" if call else ""))
    if code is None or code in NO_ANSWER:
        what = f" {call}" if call else ""
        return Unavailable(f"{peer} did not answer{what} ({name}: {text or 'no details'})")
    return error_for(name, None, text or f"{name} from {peer}")
