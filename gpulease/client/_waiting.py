"""What the sync and the asyncio client share when an allocation waits in the queue: what to do
with each status, and whether a broken wait is resumed (the same request id keeps its place)."""

from __future__ import annotations

import logging
import time

from gpulease.client._ops import StreamOp, WaitingAllocate
from gpulease.client.models import AllocationInfo, PendingInfo
from gpulease.errors import DeadlineExceeded, GpuLeaseError, Unavailable
from gpulease.v1 import coordinator_pb2 as pb

log = logging.getLogger("gpulease.client")

# Pause before resuming a broken wait (the failover inside each attempt already tried every
# coordinator once).
RESUME_PAUSE_S = 0.5


def stream_of(op: WaitingAllocate) -> StreamOp[pb.AllocateProgress, AllocationInfo | PendingInfo]:
    assert op.stream is not None
    return op.stream


def request_id(op: WaitingAllocate) -> str:
    return str(getattr(op.request, "request_id", ""))


def report(op: WaitingAllocate, status: PendingInfo) -> None:
    if op.on_pending is not None:
        op.on_pending(status)
    else:
        log.info("request %s pending (position %d): %s", status.request_id, status.position, status.reason)


def resumable(exc: GpuLeaseError, op: WaitingAllocate) -> bool:
    """A wait that broke (a coordinator went away, the connection dropped) is sent again with the
    same request id until its deadline; anything else is the answer."""
    return isinstance(exc, (Unavailable, DeadlineExceeded)) and time.monotonic() + RESUME_PAUSE_S < op.wait_until


def ended_without_answer() -> Unavailable:
    return Unavailable("the coordinator ended the wait without an answer")
