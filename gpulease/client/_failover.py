"""One gRPC channel per coordinator address; a call that gets UNAVAILABLE moves on to the next one."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from gpulease.client import _errors
from gpulease.errors import Internal, InvalidRequest
from gpulease.v1 import coordinator_pb2_grpc

R = TypeVar("R", bound=Message)

# Pause before trying the next target; grows per attempt. Small: the next target is a different
# process, so there is nothing to wait for, only a burst of reconnects to spread out.
_BACKOFF_S = 0.05


def parse_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """Accept "h1:50051,h2:50051" as well as a list; drop blanks and duplicates, keep the order."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    cleaned = tuple(dict.fromkeys(t.strip() for t in items if t.strip()))
    if not cleaned:
        raise InvalidRequest("no coordinator address given: expected HOST:PORT[,HOST:PORT...]")
    return cleaned


class FailoverChannels:
    def __init__(self, targets: Sequence[str], timeout: float) -> None:
        if timeout <= 0:
            raise InvalidRequest(f"timeout must be positive, got {timeout:g}")
        self.targets = tuple(targets)
        self.timeout = timeout
        self._channels = [grpc.insecure_channel(t) for t in self.targets]
        self._stubs = [coordinator_pb2_grpc.CoordinatorServiceStub(c) for c in self._channels]
        # Index of the target that answered last; calls start there.
        self._current = 0
        self._lock = threading.Lock()

    def call(self, rpc: str, request: Message, response_type: type[R], *, timeout: float | None = None) -> R:
        """Invoke ``rpc`` with a deadline, trying each target at most once.

        Only UNAVAILABLE moves on: this coordinator could not serve the call, another may. Resending
        is safe because every call is idempotent (Allocate through its request id: a duplicate
        returns the same allocation). Any other status is the coordinator's answer, raised as a
        gpulease error.
        """
        deadline = timeout if timeout is not None else self.timeout
        with self._lock:
            start = self._current
        failures: list[tuple[str, grpc.RpcError]] = []
        for attempt in range(len(self.targets)):
            index = (start + attempt) % len(self.targets)
            target = self.targets[index]
            if attempt:
                time.sleep(_BACKOFF_S * attempt)
            try:
                response = getattr(self._stubs[index], rpc)(request, timeout=deadline)
            except grpc.RpcError as err:
                if _errors.status_code(err) == grpc.StatusCode.UNAVAILABLE:
                    failures.append((target, err))
                    continue
                raise _errors.to_error(err, target, deadline) from None
            with self._lock:
                self._current = index
            # grpc is untyped: check what came back rather than trust an Any.
            if not isinstance(response, response_type):
                raise Internal(f"{rpc} returned {type(response).__name__}, not {response_type.__name__}")
            return response
        raise _errors.unavailable(failures)

    def stream(self, rpc: str, request: Message, response_type: type[R], *, timeout: float | None) -> Iterator[R]:
        """A server-streaming call on the target that answered last. No failover once data flowed:
        a resumed stream could repeat or skip output."""
        with self._lock:
            index = self._current
        target = self.targets[index]
        call = getattr(self._stubs[index], rpc)(request, timeout=timeout)
        try:
            for item in call:
                if not isinstance(item, response_type):
                    raise Internal(f"{rpc} streamed {type(item).__name__}, not {response_type.__name__}")
                yield item
        except grpc.RpcError as err:
            if _errors.status_code(err) == grpc.StatusCode.UNAVAILABLE and _errors.reason_of(err) is None:
                raise _errors.unavailable([(target, err)]) from None
            raise _errors.to_error(err, target, timeout or 0) from None
        finally:
            call.cancel()

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
