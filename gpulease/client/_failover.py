"""One gRPC channel per coordinator address; a call that gets UNAVAILABLE moves on to the next
one, and round again with backoff until its retry deadline (rules: retry and rpc_errors)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from gpulease.client import rpc_errors
from gpulease.client._stubs import Stubs
from gpulease.client.retry import CHANNEL_OPTIONS, Attempt, RetryPlan, check_settings
from gpulease.errors import GpuLeaseError, Internal, InvalidRequest

R = TypeVar("R", bound=Message)

log = logging.getLogger("gpulease.client")


def parse_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """Accept "h1:50051,h2:50051" as well as a list; drop blanks and duplicates, keep the order."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    cleaned = tuple(dict.fromkeys(t.strip() for t in items if t.strip()))
    if not cleaned:
        raise InvalidRequest("no coordinator address given: expected HOST:PORT[,HOST:PORT...]")
    return cleaned


def check_response(rpc: str, response: object, response_type: type[R]) -> R:
    # grpc is untyped: check what came back rather than trust an Any.
    if not isinstance(response, response_type):
        raise Internal(f"{rpc} returned {type(response).__name__}, not {response_type.__name__}")
    return response


def failure(err: grpc.RpcError, attempt: Attempt, rpc: str, resend_safe: bool) -> GpuLeaseError | None:
    """None when ``err`` should be retried (``attempt`` is logged); otherwise the error to raise."""
    if rpc_errors.should_retry(err, resend_safe):
        if attempt.round:
            log.info("%s: the coordinator at %s is unavailable; retrying", rpc, attempt.target)
        return None
    if rpc_errors.status_code(err) == grpc.StatusCode.UNAVAILABLE:
        return rpc_errors.outcome_unknown(err, attempt.target, rpc)
    return rpc_errors.to_error(err, attempt.target, attempt.timeout or 0)


def stream_failure(err: grpc.RpcError, attempt: Attempt, rpc: str, received: bool) -> GpuLeaseError | None:
    """Like ``failure`` for a read-only stream: retried only before any item arrived."""
    if not received:
        return failure(err, attempt, rpc, True)
    if rpc_errors.status_code(err) == grpc.StatusCode.UNAVAILABLE and rpc_errors.reason_of(err) is None:
        return rpc_errors.unavailable([(attempt.target, err)])
    return rpc_errors.to_error(err, attempt.target, attempt.timeout or 0)


class Rotation:
    """The targets, the client's deadlines, and which target to start at (the last that answered).
    Shared by the sync and the asyncio channels."""

    def __init__(self, targets: Sequence[str], timeout: float, retry_deadline: float | None) -> None:
        self.retry_deadline = check_settings(timeout, retry_deadline)
        self.targets = tuple(targets)
        self.timeout = timeout
        self._current = 0
        self._lock = threading.Lock()

    def plan(self, timeout: float | None, retry_deadline: float | None) -> RetryPlan:
        with self._lock:
            start = self._current
        deadline = self.retry_deadline if retry_deadline is None else retry_deadline
        return RetryPlan(self.targets, start, timeout=timeout, retry_deadline=deadline)

    def answered(self, index: int) -> None:
        with self._lock:
            self._current = index


class FailoverChannels(Rotation):
    def __init__(self, targets: Sequence[str], timeout: float, retry_deadline: float | None) -> None:
        super().__init__(targets, timeout, retry_deadline)
        self._channels = [grpc.insecure_channel(t, options=CHANNEL_OPTIONS) for t in self.targets]
        self._stubs = [Stubs(c) for c in self._channels]

    @staticmethod
    def _pause(plan: RetryPlan, delay: float, cancel: threading.Event | None) -> None:
        if not delay:
            return
        if cancel is None:
            time.sleep(delay)
        elif cancel.wait(delay):
            raise plan.error()

    def call(
        self,
        rpc: str,
        request: Message,
        response_type: type[R],
        *,
        timeout: float | None = None,
        retry_deadline: float | None = None,
        resend_safe: bool = True,
        cancel: threading.Event | None = None,
    ) -> R:
        """Invoke ``rpc`` with a deadline of ``timeout`` per attempt (default: the client's).

        UNAVAILABLE is retried, on every target in turn and then in rounds with backoff, for up to
        ``retry_deadline`` seconds (default: the client's): the request object is resent as is, so
        Allocate keeps its request id. ``resend_safe=False`` (RunContainer) retries only failures
        that never reached a coordinator. Any other status is the coordinator's answer, raised as a
        gpulease error. ``cancel`` set: give up at the next pause.
        """
        plan = self.plan(self.timeout if timeout is None else timeout, retry_deadline)
        for attempt in plan.attempts():
            self._pause(plan, attempt.delay, cancel)
            try:
                response = self._stubs[attempt.index].method(rpc)(request, timeout=attempt.timeout)
            except grpc.RpcError as err:
                error = failure(err, attempt, rpc, resend_safe)
                if error is not None:
                    raise error from None
                plan.failed(attempt, err)
                continue
            self.answered(attempt.index)
            return check_response(rpc, response, response_type)
        raise plan.error()

    def stream(self, rpc: str, request: Message, response_type: type[R], *, timeout: float | None) -> Iterator[R]:
        """A server-streaming call (read-only). Until the first item arrives it fails over and retries
        like ``call``; once data flowed it does not: a resumed stream could repeat or skip output."""
        plan = self.plan(timeout, None)
        for attempt in plan.attempts():
            self._pause(plan, attempt.delay, None)
            call = self._stubs[attempt.index].method(rpc)(request, timeout=attempt.timeout)
            received = False
            try:
                for item in call:
                    if not received:
                        received = True
                        self.answered(attempt.index)
                    yield check_response(rpc, item, response_type)
                return
            except grpc.RpcError as err:
                error = stream_failure(err, attempt, rpc, received)
                if error is not None:
                    raise error from None
                plan.failed(attempt, err)
            finally:
                call.cancel()
        raise plan.error()

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
