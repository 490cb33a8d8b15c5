"""When and where to try a call again after UNAVAILABLE. Shared by the sync and asyncio clients,
which only differ in how they sleep and call.

A call first tries every target once, starting at the one that answered last (a short pause
between targets). Further rounds follow while the call's retry deadline allows, each after an
exponential backoff with jitter, so a coordinator restart or a failover is ridden out instead of
failing the caller. What may be retried at all is ``rpc_errors.should_retry``'s decision.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import grpc

from gpulease.client import rpc_errors
from gpulease.common.settings import CLIENT_CALL_TIMEOUT_S
from gpulease.errors import GpuLeaseError, InvalidRequest

DEFAULT_TIMEOUT_S = CLIENT_CALL_TIMEOUT_S  # gpulease.common.settings: one value for every client
# Pause before the next target within a round: it is another process, so there is nothing to
# wait for, only a burst of reconnects to spread out.
NEXT_TARGET_PAUSE_S = 0.05
# Backoff before round n (n >= 1): uniformly random in [cap/2, cap], cap = min(MAX, BASE * 2**(n-1)).
BACKOFF_BASE_S = 0.1
BACKOFF_MAX_S = 2.0
# A retry is not started with less time than this left before the deadline.
MIN_ATTEMPT_S = 0.25

# Reconnect quickly once a coordinator is back: gRPC's default backoff grows to 120 s, and while a
# channel waits to reconnect every call on it fails at once.
#
# gRPC refuses answers over 4 MiB by default; ListNodes and GetClusterSummary pass that at a few
# thousand nodes (~600 bytes per simulated node, several KB with NVML telemetry). 256 MiB still
# bounds what a client will buffer.
MAX_RECEIVE_BYTES = 256 * 2**20
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
)


def check_settings(timeout: float, retry_deadline: float | None) -> float:
    """Validate the client's settings; returns the retry deadline (default: the timeout)."""
    if not timeout > 0:
        raise InvalidRequest(f"timeout must be positive, got {timeout:g}")
    if retry_deadline is None:
        return timeout
    if not retry_deadline >= 0:
        raise InvalidRequest(f"retry_deadline must be 0 or more, got {retry_deadline:g}")
    return retry_deadline


@dataclass(frozen=True)
class Attempt:
    index: int  # into the targets
    target: str
    delay: float  # seconds to pause before sending
    timeout: float | None  # the attempt's own deadline (None: no deadline, for followed streams)
    round: int


class RetryPlan:
    """The attempts of one call. Iterate ``attempts()``; report each retryable failure to ``failed``;
    when the iteration ends without success, raise ``error()``."""

    def __init__(
        self,
        targets: Sequence[str],
        start: int,
        *,
        timeout: float | None,
        retry_deadline: float,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._targets = tuple(targets)
        self._start = start
        self._timeout = timeout
        self._retry_deadline = max(0.0, retry_deadline)
        self._clock = clock
        self._jitter = jitter
        self.failures: list[tuple[str, grpc.RpcError]] = []

    def backoff(self, round_: int) -> float:
        cap = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2.0 ** (round_ - 1))
        return cap / 2 + self._jitter() * cap / 2

    def attempts(self) -> Iterator[Attempt]:
        n = len(self._targets)
        deadline = self._clock() + self._retry_deadline
        for k in range(n):  # round 0: every target once, whatever the deadline
            index = (self._start + k) % n
            yield Attempt(index, self._targets[index], NEXT_TARGET_PAUSE_S * k, self._timeout, 0)
        round_ = 1
        while True:
            for k in range(n):
                index = (self._start + k) % n
                delay = self.backoff(round_) if k == 0 else NEXT_TARGET_PAUSE_S
                left = deadline - self._clock()
                if left < MIN_ATTEMPT_S:
                    return
                # Keep one last attempt before the deadline rather than sleeping past it.
                delay = min(delay, left - MIN_ATTEMPT_S)
                timeout = None if self._timeout is None else min(self._timeout, left - delay)
                yield Attempt(index, self._targets[index], delay, timeout, round_)
            round_ += 1

    def failed(self, attempt: Attempt, err: grpc.RpcError) -> None:
        self.failures.append((attempt.target, err))

    def error(self, *, tls: bool = False, mutual: bool = False) -> GpuLeaseError:
        """``tls``/``mutual``: how the client connects, for the error's hint."""
        error = rpc_errors.unavailable(self.failures, tls=tls, mutual=mutual)
        # Whether any attempt may have reached a coordinator (an allocate is then cancelled).
        error.maybe_sent = not all(rpc_errors.never_sent(e) for _, e in self.failures)
        return error
