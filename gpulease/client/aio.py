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
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import fields
from types import TracebackType
from typing import Any, TypeVar

from google.protobuf.message import Message

from gpulease.client import _convert, _ops
from gpulease.client._aio_failover import AsyncFailoverChannels
from gpulease.client._lease import LeaseTracker
from gpulease.client.config import DEFAULT_TARGET, ClientConfig
from gpulease.client.models import AllocationInfo, ClusterSummary, Container, LogChunk, Node
from gpulease.client.retry import DEFAULT_TIMEOUT_S
from gpulease.errors import GpuLeaseError, InvalidRequest
from gpulease.v1 import types_pb2 as tpb

__all__ = ["AsyncAllocation", "AsyncClient", "AsyncContainerHandle"]

log = logging.getLogger("gpulease.client")
M = TypeVar("M", bound=Message)
T = TypeVar("T")

_WAIT_STEP_S = 30.0


class AsyncClient:
    """See ``gpulease.client.Client``: the same constructor (less ``handle_sigterm``) and methods,
    as coroutines; ``logs`` is an async iterator."""

    def __init__(
        self,
        targets: str | Sequence[str] = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        retry_deadline: float | None = None,
        config: ClientConfig | None = None,
    ) -> None:
        """`config` (a ClientConfig) replaces targets, timeout and retry_deadline when given."""
        self.config = config or ClientConfig.of(targets, timeout=timeout, retry_deadline=retry_deadline)
        self._rpc = AsyncFailoverChannels(self.config.targets, self.config.timeout, self.config.retry.deadline)

    @property
    def targets(self) -> tuple[str, ...]:
        return self._rpc.targets

    @property
    def timeout(self) -> float:
        return self._rpc.timeout

    @property
    def retry_deadline(self) -> float:
        return self._rpc.retry_deadline

    async def _run(self, op: _ops.Op[M, T], *, timeout: float | None = None, retry_deadline: float | None = None) -> T:
        response = await self._rpc.call(
            op.rpc,
            op.request,
            op.response_type,
            timeout=timeout if timeout is not None else op.timeout,
            retry_deadline=retry_deadline,
            resend_safe=op.resend_safe,
        )
        return op.convert(response)

    def _bind(self, msg: tpb.Allocation) -> AsyncAllocation:
        return AsyncAllocation._bound(msg, self)

    async def allocate(
        self,
        gpus: int,
        cpus: int | None = None,
        memory: int | str | None = None,
        gpu_model: str = "",
        min_gpu_memory: int | str | None = None,
        node_selector: Mapping[str, str] | None = None,
        ttl: int | str | None = None,
        owner: str = "",
        request_id: str | None = None,
    ) -> AsyncAllocation:
        """See Client.allocate. ``async with await client.allocate(...) as alloc:`` keeps the lease
        alive and releases it on the way out."""
        op = _ops.allocate(
            gpus=gpus, cpus=cpus, memory=memory, gpu_model=gpu_model, min_gpu_memory=min_gpu_memory,
            node_selector=node_selector, ttl=ttl, owner=owner, request_id=request_id,
        )  # fmt: skip
        return self._bind(await self._run(op))

    async def release(self, allocation_id: str) -> bool:
        return await self._run(_ops.release(allocation_id))

    async def keep_alive(self, allocation_id: str) -> int:
        return await self._run(_ops.keep_alive(allocation_id))

    async def get_allocation(self, allocation_id: str) -> AsyncAllocation:
        return self._bind(await self._run(_ops.get_allocation(allocation_id)))

    async def list_allocations(self, node: str = "", owner: str = "") -> list[AsyncAllocation]:
        return [self._bind(a) for a in await self._run(_ops.list_allocations(node, owner))]

    async def list_nodes(self) -> list[Node]:
        return await self._run(_ops.list_nodes())

    async def cluster_summary(self) -> ClusterSummary:
        return await self._run(_ops.cluster_summary())

    async def cordon(self, node: str, cordoned: bool = True) -> Node:
        return await self._run(_ops.cordon(node, cordoned))

    async def run_container(
        self,
        allocation_id: str,
        image: str,
        command: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        volumes: Sequence[_ops.Volume] = (),
        working_dir: str = "",
        shm_size: int | str | None = None,
        name: str = "",
        timeout: float = _ops.RUN_TIMEOUT_S,
    ) -> Container:
        op = _ops.run_container(
            allocation_id, image, command, env=env, volumes=volumes, working_dir=working_dir,
            shm_size=shm_size, name=name, timeout=timeout,
        )  # fmt: skip
        return await self._run(op)

    async def wait_container(self, allocation_id: str, container_id: str, timeout: float = 30.0) -> Container:
        return await self._run(_ops.wait_container(allocation_id, container_id, timeout, self.timeout))

    async def stop_container(self, allocation_id: str, container_id: str, grace: float = 10.0) -> Container:
        return await self._run(_ops.stop_container(allocation_id, container_id, grace, self.timeout))

    async def list_containers(self, allocation_id: str) -> list[Container]:
        return await self._run(_ops.list_containers(allocation_id))

    async def logs(
        self, allocation_id: str, container_id: str = "", *, follow: bool = False
    ) -> AsyncIterator[LogChunk]:
        request = _ops.logs_request(allocation_id, container_id, follow)
        timeout = None if follow else self.timeout
        async for chunk in self._rpc.stream("StreamLogs", request, tpb.LogChunk, timeout=timeout):
            yield LogChunk(chunk.stream, chunk.data)

    async def close(self) -> None:
        await self._rpc.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


async def _keep_alive_loop(client: AsyncClient, tracker: LeaseTracker) -> None:
    """Renew at once, then every ttl/3, until cancelled or the lease is lost (see _lease)."""
    op = _ops.keep_alive(tracker.allocation_id)
    wait: float | None = 0.0
    while wait is not None:
        await asyncio.sleep(wait)
        timeout, budget = tracker.attempt_limits(client.timeout)
        err: Exception | None = None
        try:
            await client._run(op, timeout=timeout, retry_deadline=budget)
        except Exception as exc:
            err = exc
        wait = tracker.after_attempt(err)


def _report_late_release(task: asyncio.Future[bool]) -> None:
    """The outcome of a release that went on after its caller was cancelled."""
    if not task.cancelled() and (err := task.exception()) is not None:
        log.warning("could not release an allocation: %s", err)


class _AsyncSession:
    def __init__(self, client: AsyncClient, tracker: LeaseTracker) -> None:
        self.client = client
        self.tracker = tracker
        self.keeper: asyncio.Task[None] | None = None
        self.entered = False

    def start_keeper(self) -> None:
        if self.keeper is not None and not self.keeper.done():
            raise InvalidRequest(f"allocation {self.tracker.allocation_id} is already being kept alive")
        self.keeper = asyncio.create_task(
            _keep_alive_loop(self.client, self.tracker), name=f"gpulease-keepalive-{self.tracker.allocation_id}"
        )

    async def stop_keeper(self) -> None:
        keeper, self.keeper = self.keeper, None
        if keeper is None or keeper is asyncio.current_task():
            return
        keeper.cancel()
        await asyncio.wait([keeper])


class AsyncAllocation(AllocationInfo):
    """The asyncio twin of ``gpulease.client.Allocation``: the same fields, coroutine methods, and
    ``async with`` instead of ``with`` (keepalive as an asyncio task, release on exit or cancellation)."""

    _session: _AsyncSession | None = None  # see Allocation._session

    @classmethod
    def _bound(cls, msg: tpb.Allocation, client: AsyncClient) -> AsyncAllocation:
        alloc = _convert.allocation(msg, cls)
        alloc._session = _AsyncSession(client, LeaseTracker(alloc.id, alloc.ttl_seconds))
        return alloc

    def __reduce__(self) -> tuple[type[AllocationInfo], tuple[Any, ...]]:
        return AllocationInfo, tuple(getattr(self, f.name) for f in fields(AllocationInfo))

    def _bound_session(self) -> _AsyncSession:
        if self._session is None:
            raise InvalidRequest(f"allocation {self.id} is a plain record, not bound to a client")
        return self._session

    def _live(self) -> _AsyncSession:
        session = self._bound_session()
        session.tracker.check_live()
        return session

    @property
    def lost(self) -> bool:
        return self._session is not None and self._session.tracker.lost

    @property
    def lost_reason(self) -> str | None:
        return None if self._session is None else self._session.tracker.lost_reason

    @property
    def released(self) -> bool:
        return self._session is not None and self._session.tracker.released

    async def keep_alive(self) -> int:
        session = self._live()
        try:
            ttl = await session.client._run(_ops.keep_alive(self.id))
        except GpuLeaseError as err:
            lost = session.tracker.keepalive_failed(err)
            if lost is not None:
                raise lost from None
            raise
        session.tracker.renewed()
        return ttl

    async def release(self) -> bool:
        """See Allocation.release."""
        return await self._release(None)

    async def _release(self, retry_deadline: float | None) -> bool:
        session = self._bound_session()
        await session.stop_keeper()
        if session.tracker.released:
            return False
        released = await session.client._run(_ops.release(self.id), retry_deadline=retry_deadline)
        session.tracker.mark_released()
        return released

    @asynccontextmanager
    async def keepalive(self, ttl: int | None = None) -> AsyncIterator[AsyncAllocation]:
        """See Allocation.keepalive."""
        session = self._live()
        if ttl:
            session.tracker.reset(ttl)
        session.start_keeper()
        try:
            yield self
        finally:
            await session.stop_keeper()

    async def __aenter__(self) -> AsyncAllocation:
        session = self._live()
        if session.entered:
            raise InvalidRequest(f"allocation {self.id} is already in use as a context manager")
        session.start_keeper()
        session.entered = True
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        session = self._bound_session()
        session.entered = False
        await session.stop_keeper()
        budget = min(session.client.retry_deadline, max(session.tracker.time_left(), 1.0))
        # Shielded: a second cancellation while releasing must not leave the GPUs held until the TTL.
        release = asyncio.ensure_future(self._release(budget))
        try:
            await asyncio.shield(release)
        except GpuLeaseError as err:
            log.warning("could not release allocation %s (%s); its lease expires within %gs",
                        self.id, err.message, session.tracker.ttl)  # fmt: skip
        except asyncio.CancelledError:
            release.add_done_callback(_report_late_release)
            raise
        if session.tracker.lost:
            log.warning("%s", session.tracker.lost_reason)

    async def run_container(
        self,
        image: str,
        command: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        volumes: Sequence[_ops.Volume] = (),
        working_dir: str = "",
        shm_size: int | str | None = None,
        name: str = "",
        timeout: float = _ops.RUN_TIMEOUT_S,
    ) -> AsyncContainerHandle:
        session = self._live()
        status = await session.client.run_container(
            self.id, image, command, env=env, volumes=volumes, working_dir=working_dir, shm_size=shm_size,
            name=name, timeout=timeout,
        )  # fmt: skip
        return AsyncContainerHandle(self, status)

    async def containers(self) -> list[AsyncContainerHandle]:
        client = self._check_containers_usable()
        return [AsyncContainerHandle(self, c) for c in await client.list_containers(self.id)]

    def _check_containers_usable(self) -> AsyncClient:
        session = self._bound_session()
        session.tracker.check_not_lost()
        return session.client


class AsyncContainerHandle:
    """See ``gpulease.client.ContainerHandle``."""

    def __init__(self, allocation: AsyncAllocation, status: Container) -> None:
        self.allocation = allocation
        self._status = status

    def __repr__(self) -> str:
        return f"AsyncContainerHandle(id={self.id!r}, allocation={self.allocation.id!r}, state={self._status.state!r})"

    @property
    def id(self) -> str:
        return self._status.id

    @property
    def status(self) -> Container:
        return self._status

    async def refresh(self) -> Container:
        client = self.allocation._check_containers_usable()
        for c in await client.list_containers(self.allocation.id):
            if c.id == self.id:
                self._status = c
        return self._status

    async def wait(self, timeout: float | None = None) -> Container:
        if timeout is not None and not timeout > 0:
            raise InvalidRequest(f"timeout must be positive, got {timeout:g}")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            client = self.allocation._check_containers_usable()
            step = _WAIT_STEP_S if deadline is None else min(_WAIT_STEP_S, deadline - time.monotonic())
            self._status = await client.wait_container(self.allocation.id, self.id, timeout=max(1.0, step))
            if self._status.exited or (deadline is not None and time.monotonic() >= deadline):
                return self._status

    async def logs(self, follow: bool = True) -> AsyncIterator[LogChunk]:
        client = self.allocation._check_containers_usable()
        async for chunk in client.logs(self.allocation.id, self.id, follow=follow):
            yield chunk
            self.allocation._check_containers_usable()

    async def stop(self, grace: float = 10.0) -> Container:
        client = self.allocation._check_containers_usable()
        self._status = await client.stop_container(self.allocation.id, self.id, grace=grace)
        return self._status
