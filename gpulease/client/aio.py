"""The asyncio client, for Airflow triggers and other event-loop code: ``Client``'s twin.

    from gpulease.client.aio import AsyncClient

    async with AsyncClient(["coord-a:50051", "coord-b:50051"]) as client:
        async with await client.allocate(gpus=1, ttl="60s") as alloc:  # keepalive task meanwhile
            job = await alloc.run_container("pytorch:latest", ["python", "train.py"])
            async for chunk in job.logs(follow=True):
                ...
            status = await job.wait()
        # released here, also on an exception or cancellation

Same methods, arguments, retry rules and errors as the sync client (request building, retry
planning and error mapping are shared). Differences: the keepalive is an asyncio task, and there
is no SIGTERM handling (signals belong to whoever runs the event loop; cancelling the task that
holds the allocation releases it). Make the client inside the event loop that uses it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, TypeVar

from gpulease.client import _ops, _waiting
from gpulease.client._aio_failover import AsyncFailoverChannels
from gpulease.client._base import ClientBase
from gpulease.client._handle import (
    AllocationHandle,
    ContainerHandleBase,
    SessionBase,
    Waiting,
    log_fallback,
)
from gpulease.client._lease import LeaseTracker
from gpulease.client.models import AllocationInfo, Container, LogChunk, gang_envs
from gpulease.errors import GpuLeaseError

__all__ = ["AsyncAllocation", "AsyncClient", "AsyncContainerHandle"]

log = logging.getLogger("gpulease.client")
T = TypeVar("T")


class AsyncClient(ClientBase[AsyncFailoverChannels]):
    """See ``gpulease.client.Client``: the same constructor (less ``handle_sigterm``) and methods,
    as coroutines; ``logs`` is an async iterator."""

    _channels_class = AsyncFailoverChannels

    # How this client sends the calls that ClientBase declares: as coroutines.

    def _handle(self, info: AllocationInfo) -> AsyncAllocation:
        return AsyncAllocation(info, AsyncSession(self._rpc, info))

    async def _send(self, op: _ops.Op[Any, T]) -> Any:
        try:
            if isinstance(op, _ops.WaitingAllocate):
                return self._handle(await self._wait(op))
            return self._answer(op, await self._rpc.run(op))
        except _ops.UNKNOWN_OUTCOME as exc:
            cancel = _ops.abandoned(op, exc)
            if cancel is None:
                raise
            # As in Client._send: nothing may stay held by an attempt this client moved on from.
            self._rpc.skip_current()  # the coordinator that left the answer unknown is the last to ask
            try:
                await self._rpc.run(cancel, retry_deadline=_ops.CANCEL_BUDGET_S)
            except GpuLeaseError as failed:
                raise _ops.after_cancel(exc, op, failed) from exc
            raise _ops.after_cancel(exc, op, None) from exc

    async def _wait(self, op: _ops.WaitingAllocate) -> AllocationInfo:
        while True:
            try:
                async for item in self._rpc.run_stream(_waiting.stream_of(op)):
                    if isinstance(item, AllocationInfo):
                        return item
                    _waiting.report(op, item)
                raise _waiting.ended_without_answer()
            except GpuLeaseError as exc:
                if not _waiting.resumable(exc, op):
                    raise
                log.info("the wait for request %s broke (%s); resuming it", _waiting.request_id(op), exc)
                await asyncio.sleep(_waiting.RESUME_PAUSE_S)

    async def _send_stream(self, make: Callable[[], _ops.StreamOp[Any, T]]) -> AsyncIterator[T]:
        async for item in self._rpc.run_stream(make()):
            yield item

    async def close(self) -> None:
        await self._rpc.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


async def _keep(rpc: AsyncFailoverChannels, tracker: LeaseTracker) -> None:
    """The keepalive loop (see _lease.Renewal) as a task: it only waits and sends; cancel it to stop."""
    wait: float | None = 0.0
    while wait is not None:
        await asyncio.sleep(wait)
        renewal = tracker.renewal(rpc.timeout)
        error: Exception | None = None
        try:
            await rpc.run(renewal.op, timeout=renewal.timeout, retry_deadline=renewal.budget)
        except Exception as exc:
            error = exc
        wait = tracker.after_attempt(error)


def _report_late_release(task: asyncio.Future[bool]) -> None:
    """The outcome of a release that went on after its caller was cancelled."""
    if not task.cancelled() and (err := task.exception()) is not None:
        log.warning("could not release an allocation: %s", err)


class AsyncSession(SessionBase[AsyncFailoverChannels]):
    """See ``_allocation.Session``: the keepalive is an asyncio task, and there is no SIGTERM guard."""

    def __init__(self, rpc: AsyncFailoverChannels, info: AllocationInfo) -> None:
        super().__init__(rpc, info)
        self._keeper: asyncio.Task[None] | None = None

    async def run(self, op: _ops.Op[Any, T]) -> T:
        return await self.rpc.run(op)

    def run_stream(self, op: _ops.StreamOp[Any, T]) -> AsyncIterator[T]:
        return self.rpc.run_stream(op)

    def start_keeper(self) -> None:
        self.refuse_second_keeper(self._keeper is not None and not self._keeper.done())
        name = f"gpulease-keepalive-{self.tracker.allocation_id}"
        self._keeper = asyncio.create_task(_keep(self.rpc, self.tracker), name=name)

    async def stop_keeper(self) -> None:
        keeper, self._keeper = self._keeper, None
        if keeper is None or keeper is asyncio.current_task():
            return
        keeper.cancel()
        await asyncio.wait([keeper])

    async def renew(self) -> int:
        with self.tracker.renewing():
            ttl = await self.rpc.run(self.tracker.keep_alive_op())
        return ttl

    async def release(self, retry_deadline: float | None) -> bool:
        await self.stop_keeper()
        if self.tracker.released:
            return False
        released = await self.rpc.run(_ops.release(self.tracker.allocation_id), retry_deadline=retry_deadline)
        return self.tracker.mark_released(released)

    async def exit(self) -> None:
        self.entered = False
        await self.stop_keeper()
        with self.tracker.final_release(self.rpc.retry_deadline) as budget:
            # Shielded: a second cancellation while releasing must not leave the GPUs held until the TTL.
            release = asyncio.ensure_future(self.release(budget))
            try:
                await asyncio.shield(release)
            except asyncio.CancelledError:
                release.add_done_callback(_report_late_release)
                raise


class AsyncAllocation(AllocationHandle[AsyncSession]):
    """The asyncio twin of ``gpulease.client.Allocation``: the same record and state, coroutine
    methods, and ``async with`` instead of ``with`` (keepalive as an asyncio task, release on exit
    or cancellation)."""

    __slots__ = ()

    async def keep_alive(self) -> int:
        """See Allocation.keep_alive."""
        return await self.session.renew()

    async def release(self) -> bool:
        """See Allocation.release."""
        return await self.session.release(None)

    @asynccontextmanager
    async def keepalive(self, ttl: int | None = None) -> AsyncIterator[AsyncAllocation]:
        """See Allocation.keepalive."""
        self.session.prepare_keepalive(ttl)
        self.session.start_keeper()
        try:
            yield self
        finally:
            await self.session.stop_keeper()

    async def __aenter__(self) -> AsyncAllocation:
        self.session.enter()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.session.exit()

    async def _start(self, make: Callable[[], _ops.Op[Any, Container]]) -> AsyncContainerHandle:
        session = self.session.live()
        return AsyncContainerHandle(self, await session.run(make()))

    async def containers(self) -> list[AsyncContainerHandle]:
        """Handles on this allocation's containers."""
        return [AsyncContainerHandle(self, c) for c in await self.session.usable().run(_ops.list_containers(self.id))]

    async def run_gang(
        self, image: str, command: Sequence[str] = (), *, env: Mapping[str, str] | None = None, **kwargs: Any
    ) -> list[AsyncContainerHandle]:
        """One container per member node of a gang, in rank order (see Allocation.run_gang)."""
        return [await self.run_container(image, command, env=e, node=node, **kwargs)
                for node, e in gang_envs(self.info, env)]  # fmt: skip


class AsyncContainerHandle(ContainerHandleBase[AsyncAllocation]):
    """See ``gpulease.client.ContainerHandle``."""

    async def refresh(self) -> Container:
        return self._found(await self.allocation.session.usable().run(_ops.list_containers(self.allocation.id)))

    async def wait(self, timeout: float | None = None) -> Container:
        waiting = Waiting(timeout)
        while True:
            session = self.allocation.session.usable()
            status = self._seen(await session.run(_ops.wait_container(self.allocation.id, self.id, waiting.step())))
            if waiting.over(status):
                return status

    async def logs(self, follow: bool = True) -> AsyncIterator[LogChunk]:
        session = self.allocation.session.usable()
        async for chunk in session.run_stream(_ops.logs(self.allocation.id, self.id, follow=follow)):
            yield chunk
            session.usable()

    async def follow(
        self,
        write: Callable[[LogChunk], object],
        *,
        on_fallback: Callable[[GpuLeaseError], object] | None = None,
    ) -> Container:
        """See ContainerHandle.follow: when the log stream is refused or breaks, waits instead."""
        try:
            async for chunk in self.logs(follow=True):
                write(chunk)
        except GpuLeaseError as e:
            log_fallback(e, self.id, on_fallback)
        return await self.wait()

    async def stop(self, grace: float = 10.0) -> Container:
        status = await self.allocation.session.usable().run(_ops.stop_container(self.allocation.id, self.id, grace))
        return self._seen(status)
