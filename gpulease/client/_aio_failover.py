"""The asyncio twin of _failover.FailoverChannels: the same targets, retry plan and error rules,
over grpc.aio channels. Channels are made on first use, inside the running event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message

from gpulease.client._failover import Rotation, check_response, failure, stream_failure
from gpulease.client._stubs import Stubs
from gpulease.client.retry import CHANNEL_OPTIONS

R = TypeVar("R", bound=Message)


class AsyncFailoverChannels(Rotation):
    def __init__(self, targets: Sequence[str], timeout: float, retry_deadline: float | None) -> None:
        super().__init__(targets, timeout, retry_deadline)
        self._channels: list[grpc.aio.Channel] = []
        self._stubs: list[Stubs] = []

    def _stub(self, index: int) -> Stubs:
        if not self._stubs:
            self._channels = [grpc.aio.insecure_channel(t, options=CHANNEL_OPTIONS) for t in self.targets]
            self._stubs = [Stubs(c) for c in self._channels]
        return self._stubs[index]

    async def call(
        self,
        rpc: str,
        request: Message,
        response_type: type[R],
        *,
        timeout: float | None = None,
        retry_deadline: float | None = None,
        resend_safe: bool = True,
    ) -> R:
        """See FailoverChannels.call (cancel the awaiting task to give up)."""
        plan = self.plan(self.timeout if timeout is None else timeout, retry_deadline)
        for attempt in plan.attempts():
            if attempt.delay:
                await asyncio.sleep(attempt.delay)
            try:
                response = await self._stub(attempt.index).method(rpc)(request, timeout=attempt.timeout)
            except grpc.RpcError as err:
                error = failure(err, attempt, rpc, resend_safe)
                if error is not None:
                    raise error from None
                plan.failed(attempt, err)
                continue
            self.answered(attempt.index)
            return check_response(rpc, response, response_type)
        raise plan.error()

    async def stream(
        self, rpc: str, request: Message, response_type: type[R], *, timeout: float | None
    ) -> AsyncIterator[R]:
        """See FailoverChannels.stream."""
        plan = self.plan(timeout, None)
        for attempt in plan.attempts():
            if attempt.delay:
                await asyncio.sleep(attempt.delay)
            call = self._stub(attempt.index).method(rpc)(request, timeout=attempt.timeout)
            received = False
            try:
                async for item in call:
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

    async def close(self) -> None:
        channels, self._channels, self._stubs = self._channels, [], []
        for channel in channels:
            await channel.close()
