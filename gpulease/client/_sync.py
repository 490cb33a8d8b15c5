"""The synchronous client: typed methods over CoordinatorService, returning plain models and
allocation handles. The methods are ClientBase's (one per call, declared once for this client and
the asyncio one); this client sends them blocking."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

from gpulease.client import _ops, _waiting
from gpulease.client._allocation import Allocation, Session
from gpulease.client._base import ClientBase
from gpulease.client._failover import FailoverChannels
from gpulease.client.config import DEFAULT_TARGET, ClientConfig
from gpulease.client.models import AllocationInfo
from gpulease.client.retry import DEFAULT_TIMEOUT_S
from gpulease.errors import GpuLeaseError

log = logging.getLogger("gpulease.client")

T = TypeVar("T")


class Client(ClientBase[FailoverChannels]):
    """Talks to the gpulease coordinator(s) at ``targets`` ("host:port", a list, or comma-separated).

    Every call has a deadline: ``timeout`` seconds per attempt. A coordinator that is UNAVAILABLE
    (not running, restarting, or unable to reach etcd) is retried: the next target at once, then
    all of them again with exponential backoff and jitter, for up to ``retry_deadline`` seconds
    per call (default: ``timeout``, so that ``timeout`` bounds how long an unreachable cluster
    takes to report; 0: each target once; e.g. 30 to ride out a coordinator restart). Retries
    resend the same request, so Allocate keeps its request id and cannot allocate twice.
    RunContainer is the exception: it is retried only when the failed attempt never reached a
    coordinator, since a resend could start a second container.

    ``handle_sigterm``: while an Allocation is used as a context manager in the main thread,
    SIGTERM raises ``Terminated`` there, so the allocation is released on the way out.

    Errors are ``gpulease.errors.GpuLeaseError`` subclasses, never gRPC exceptions.
    """

    _channels_class = FailoverChannels

    def __init__(
        self,
        targets: str | Sequence[str] = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        retry_deadline: float | None = None,
        handle_sigterm: bool = True,
        config: ClientConfig | None = None,
    ) -> None:
        """As ClientBase; handle_sigterm: an allocation's ``with`` block turns SIGTERM into Terminated."""
        super().__init__(targets, timeout=timeout, retry_deadline=retry_deadline, config=config)
        self.handle_sigterm = handle_sigterm

    # How this client sends the calls that ClientBase declares: blocking.

    def _handle(self, info: AllocationInfo) -> Allocation:
        return Allocation(info, Session(self._rpc, info, handle_sigterm=self.handle_sigterm))

    def _send(self, op: _ops.Op[Any, T]) -> Any:
        try:
            if isinstance(op, _ops.WaitingAllocate):
                return self._handle(self._wait(op))
            return self._answer(op, self._rpc.run(op))
        except _ops.UNKNOWN_OUTCOME as exc:
            cancel = _ops.abandoned(op, exc)
            if cancel is None:
                raise
            # An attempt may still commit on a coordinator this client moved on from: cancel the
            # request, so that nothing stays held by nobody (issue 17).
            self._rpc.skip_current()  # the coordinator that left the answer unknown is the last to ask
            try:
                self._rpc.run(cancel, retry_deadline=_ops.CANCEL_BUDGET_S)
            except GpuLeaseError as failed:
                raise _ops.after_cancel(exc, op, failed) from exc
            raise _ops.after_cancel(exc, op, None) from exc

    def _wait(self, op: _ops.WaitingAllocate) -> AllocationInfo:
        while True:
            try:
                for item in self._rpc.run_stream(_waiting.stream_of(op)):
                    if isinstance(item, AllocationInfo):
                        return item
                    _waiting.report(op, item)
                raise _waiting.ended_without_answer()
            except GpuLeaseError as exc:
                if not _waiting.resumable(exc, op):
                    raise
                log.info("the wait for request %s broke (%s); resuming it", _waiting.request_id(op), exc)
                time.sleep(_waiting.RESUME_PAUSE_S)

    def _send_stream(self, make: Callable[[], _ops.StreamOp[Any, T]]) -> Iterator[T]:
        yield from self._rpc.run_stream(make())

    def close(self) -> None:
        self._rpc.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
