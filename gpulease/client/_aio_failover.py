"""The asyncio twin of _failover.FailoverChannels: the same targets, retry plan and error rules,
over grpc.aio channels. Channels are made on first use, inside the running event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from google.protobuf.message import Message

from gpulease.client._failover import Rotation
from gpulease.client._ops import Op, StreamOp, raw

R = TypeVar("R", bound=Message)
T = TypeVar("T")


class AsyncFailoverChannels(Rotation):
    def _connect(self, target: str) -> Any:
        return self.security.aio_channel(target)

    async def run(self, op: Op[Any, T], *, timeout: float | None = None, retry_deadline: float | None = None) -> T:
        """See FailoverChannels.run (cancel the awaiting task to give up)."""
        tries = self.tries(op, timeout, retry_deadline)
        for attempt in tries:
            if attempt.delay:
                await asyncio.sleep(attempt.delay)
            with tries.attempt(attempt):
                method = self._stub(attempt.index).method(op.rpc)
                response = await method(op.request, timeout=attempt.timeout, metadata=self.security.metadata)
                return tries.answer(attempt, response)
        raise tries.error()

    async def run_stream(self, op: StreamOp[Any, T]) -> AsyncIterator[T]:
        """See FailoverChannels.run_stream."""
        tries = self.tries(op, None, None)
        for attempt in tries:
            if attempt.delay:
                await asyncio.sleep(attempt.delay)
            call = self._stub(attempt.index).method(op.rpc)(
                op.request, timeout=attempt.timeout, metadata=self.security.metadata
            )
            with tries.attempt(attempt, call):
                async for item in call:
                    yield tries.answer(attempt, item)
                return
        raise tries.error()

    async def call(self, rpc: str, request: Message, response_type: type[R]) -> R:
        """See FailoverChannels.call."""
        return await self.run(raw(rpc, request, response_type))

    async def close(self) -> None:
        channels, self._channels, self._stubs = self._channels, [], []
        for channel in channels:
            await channel.close()
