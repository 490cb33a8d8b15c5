"""One gRPC channel per coordinator address; a call that gets UNAVAILABLE moves on to the next
one, and round again with backoff until its retry deadline (rules: retry and rpc_errors)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Generic, Protocol, TypeVar

import grpc
from google.protobuf.message import Message

from gpulease.client import rpc_errors
from gpulease.client._ops import Op, StreamOp, raw
from gpulease.client._security import ChannelSecurity
from gpulease.client._stubs import Stubs
from gpulease.client.retry import Attempt, RetryPlan, check_settings
from gpulease.errors import GpuLeaseError, Internal, InvalidRequest

R = TypeVar("R", bound=Message)
T = TypeVar("T")

log = logging.getLogger("gpulease.client")


def parse_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """Accept "h1:50051,h2:50051" as well as a list; drop blanks and duplicates, keep the order."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    cleaned = tuple(dict.fromkeys(t.strip() for t in items if t.strip()))
    if not cleaned:
        raise InvalidRequest("no coordinator address given: expected HOST:PORT[,HOST:PORT...]")
    return cleaned


def failure(err: grpc.RpcError, attempt: Attempt, rpc: str, resend_safe: bool) -> GpuLeaseError | None:
    """None when ``err`` should be retried (``attempt`` is logged); otherwise the error to raise."""
    if rpc_errors.should_retry(err, resend_safe):
        if attempt.round:
            log.info("%s: the coordinator at %s is unavailable; retrying", rpc, attempt.target)
        return None
    if rpc_errors.status_code(err) == grpc.StatusCode.UNAVAILABLE:
        return rpc_errors.outcome_unknown(err, attempt.target, rpc)
    return rpc_errors.to_error(err, attempt.target, attempt.timeout or 0)


def broken_stream(err: grpc.RpcError, attempt: Attempt) -> GpuLeaseError:
    """A stream that failed once data flowed: never retried, since a resumed stream could repeat or
    skip output."""
    if rpc_errors.status_code(err) == grpc.StatusCode.UNAVAILABLE and rpc_errors.reason_of(err) is None:
        return rpc_errors.unavailable([(attempt.target, err)])
    return rpc_errors.to_error(err, attempt.target, attempt.timeout or 0)


class Cancellable(Protocol):
    def cancel(self) -> object: ...


class Tries(Generic[T]):
    """One call's attempts across the coordinators, and what each outcome means. The sync and the
    asyncio channels share it and differ only in how they pause and invoke:

        for attempt in tries:
            (pause attempt.delay)
            with tries.attempt(attempt):      # a grpc.RpcError: the next attempt, or the final error
                (invoke the stub with attempt.timeout)
                return tries.answer(attempt, response)   # (or yield, for each item of a stream)
        raise tries.error()
    """

    def __init__(self, rotation: Rotation, op: Op[Any, T] | StreamOp[Any, T], plan: RetryPlan) -> None:
        self._rotation = rotation
        self._op = op
        self._plan = plan
        self._received = False

    def __iter__(self) -> Iterator[Attempt]:
        for attempt in self._plan.attempts():
            self._received = False
            yield attempt

    def answer(self, attempt: Attempt, response: object) -> T:
        """The answer (or a stream's item) as a model."""
        if not self._received:
            self._received = True
            self._rotation.answered(attempt.index)
        # grpc is untyped: check what came back rather than trust an Any.
        op = self._op
        if not isinstance(response, op.response_type):
            raise Internal(f"{op.rpc} returned {type(response).__name__}, not {op.response_type.__name__}")
        return op.convert(response)

    @contextmanager
    def attempt(self, attempt: Attempt, call: Cancellable | None = None) -> Iterator[None]:
        """Around one attempt: a grpc.RpcError ends it, to try the next one (``failed``), or raises
        the error to give up with; ``call``, a stream, is cancelled at the end either way."""
        try:
            yield
        except grpc.RpcError as err:
            self.failed(attempt, err)
        finally:
            if call is not None:
                call.cancel()

    def failed(self, attempt: Attempt, err: grpc.RpcError) -> None:
        """Raise the error to give up with, or return to try the next attempt."""
        if self._received:
            raise broken_stream(err, attempt) from None
        if self._hung_elsewhere(attempt, err):
            log.info("%s: the coordinator at %s did not answer in time; trying the next one", self._op.rpc,
                     attempt.target)  # fmt: skip
            self._plan.failed(attempt, err)
            return
        error = failure(err, attempt, self._op.rpc, self._op.resend_safe)
        if error is not None:
            raise error from None
        self._plan.failed(attempt, err)

    def _hung_elsewhere(self, attempt: Attempt, err: grpc.RpcError) -> bool:
        """A deadline on one coordinator, for a call safe to resend, goes on to each other coordinator
        once (a paused or overloaded replica must not keep its clients: their leases would lapse).
        Not in later rounds: a slow cluster answers DeadlineExceeded in bounded time."""
        return (
            self._op.resend_safe
            and attempt.round == 0
            and rpc_errors.status_code(err) == grpc.StatusCode.DEADLINE_EXCEEDED
            and len(self._plan.failures) < len(self._rotation.targets) - 1
        )

    def error(self) -> GpuLeaseError:
        tls = self._rotation.security.tls
        return self._plan.error(tls=tls is not None, mutual=tls is not None and tls.mutual)


class Rotation:
    """The targets, the client's deadlines, and which target to start at (the last that answered).
    Shared by the sync and the asyncio channels."""

    def __init__(
        self,
        targets: Sequence[str],
        timeout: float,
        retry_deadline: float | None,
        security: ChannelSecurity | None = None,
    ) -> None:
        self.retry_deadline = check_settings(timeout, retry_deadline)
        self.targets = tuple(targets)
        self.timeout = timeout
        # TLS and the token: how every channel is made, and the metadata every call carries.
        self.security = security or ChannelSecurity()
        self._current = 0
        self._lock = threading.Lock()
        # One channel per target, made at the first call (gRPC channels connect lazily anyway).
        self._channels: list[Any] = []
        self._stubs: list[Stubs] = []

    def _connect(self, target: str) -> Any:
        """A channel to ``target``: sync or asyncio, by subclass."""
        raise NotImplementedError

    def _stub(self, index: int) -> Stubs:
        with self._lock:
            if not self._stubs:
                self._channels = [self._connect(t) for t in self.targets]
                self._stubs = [Stubs(c) for c in self._channels]
            return self._stubs[index]

    def tries(self, op: Op[Any, T] | StreamOp[Any, T], timeout: float | None, retry_deadline: float | None) -> Tries[T]:
        """The attempts of ``op``. ``timeout``: the op's deadline unless given. ``retry_deadline``
        None: the client's."""
        with self._lock:
            start = self._current
        plan = RetryPlan(
            self.targets,
            start,
            timeout=op.deadline(self.timeout) if timeout is None else timeout,
            retry_deadline=self.retry_deadline if retry_deadline is None else retry_deadline,
        )
        return Tries(self, op, plan)

    def answered(self, index: int) -> None:
        with self._lock:
            self._current = index

    def skip_current(self) -> None:
        """Start the next call at the next target: the current one just failed to answer."""
        with self._lock:
            self._current = (self._current + 1) % len(self.targets)


class FailoverChannels(Rotation):
    def _connect(self, target: str) -> Any:
        return self.security.channel(target)

    @staticmethod
    def _pause(tries: Tries[Any], delay: float, cancel: threading.Event | None) -> None:
        if not delay:
            return
        if cancel is None:
            time.sleep(delay)
        elif cancel.wait(delay):
            raise tries.error()

    def run(
        self,
        op: Op[Any, T],
        *,
        timeout: float | None = None,
        retry_deadline: float | None = None,
        cancel: threading.Event | None = None,
    ) -> T:
        """Send ``op`` with a deadline of ``timeout`` per attempt (default: the op's, see Op.deadline).

        UNAVAILABLE is retried, on every target in turn and then in rounds with backoff, for up to
        ``retry_deadline`` seconds (default: the client's): the request object is resent as is, so
        Allocate keeps its request id. An op that is not ``resend_safe`` (RunContainer) is retried
        only after failures that never reached a coordinator. Any other status is the coordinator's
        answer, raised as a gpulease error. ``cancel`` set: give up at the next pause.
        """
        tries = self.tries(op, timeout, retry_deadline)
        for attempt in tries:
            self._pause(tries, attempt.delay, cancel)
            with tries.attempt(attempt):
                return tries.answer(
                    attempt,
                    self._stub(attempt.index).method(op.rpc)(
                        op.request, timeout=attempt.timeout, metadata=self.security.metadata
                    ),
                )
        raise tries.error()

    def run_stream(self, op: StreamOp[Any, T]) -> Iterator[T]:
        """A server-streaming call (read-only). Until the first item arrives it fails over and retries
        like ``run``; once data flowed it does not: a resumed stream could repeat or skip output."""
        tries = self.tries(op, None, None)
        for attempt in tries:
            self._pause(tries, attempt.delay, None)
            call = self._stub(attempt.index).method(op.rpc)(
                op.request, timeout=attempt.timeout, metadata=self.security.metadata
            )
            with tries.attempt(attempt, call):
                for item in call:
                    yield tries.answer(attempt, item)
                return
        raise tries.error()

    def call(self, rpc: str, request: Message, response_type: type[R]) -> R:
        """``rpc`` by name, with a request message, answering a message (for tools): ``run``'s rules."""
        op: Op[R, R] = raw(rpc, request, response_type)
        return self.run(op)

    def close(self) -> None:
        with self._lock:
            channels, self._channels, self._stubs = self._channels, [], []
        for channel in channels:
            channel.close()
