"""Allocation load through the real gRPC coordinator, with the bench checking its own grants."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from bench.stats import Latencies
from gpulease.client import ClientConfig, RetryConfig
from gpulease.client.aio import AsyncClient
from gpulease.client.models import AllocationInfo, PendingInfo
from gpulease.history import Grant, double_allocations
from gpulease.v1 import coordinator_pb2 as pb


@dataclass
class LoadResult:
    concurrency: int
    alloc_per_s: float
    alloc_lat: Latencies
    cycles_per_s: float
    allocations: int
    commits: int
    rejected_commits: int
    double_allocations: int
    errors: dict[str, int] = field(default_factory=dict)


async def run_load(
    address: str, concurrency: int, duration: float, max_allocations: int, *, config: ClientConfig | None = None
) -> LoadResult:
    """Allocations/s for `duration`, or until `max_allocations` are held: an allocate-only run must
    stop before the cluster is full, or it would time capacity errors instead of allocations."""
    errors: dict[str, int] = defaultdict(int)
    grants: list[Grant] = []
    lat = Latencies()
    client = _Client(address, config)
    try:
        stats0 = await client.stats()

        # Phase 1: allocations only, so allocations/s is not diluted by releases.
        live: list[tuple[str, str, tuple[int, ...], int]] = []
        stop = time.perf_counter() + duration
        issued = 0

        async def allocator() -> None:
            nonlocal issued
            while time.perf_counter() < stop and issued < max_allocations:
                issued += 1
                t0 = time.perf_counter()
                try:
                    a = await client.allocate(gpus=1, cpus=1, memory=2**20, ttl=600, request_id=uuid.uuid4().hex)
                except Exception as exc:  # counted and reported, never hidden
                    errors[type(exc).__name__] += 1
                    continue
                lat.add(time.perf_counter() - t0)
                live.append((a.id, a.node, a.gpu_indexes, a.revision))

        t0 = time.perf_counter()
        await asyncio.gather(*(allocator() for _ in range(concurrency)))
        alloc_elapsed = time.perf_counter() - t0
        allocations = len(live)

        sem = asyncio.Semaphore(64)

        async def release(item: tuple[str, str, tuple[int, ...], int]) -> None:
            async with sem:
                rev = await client.release_revision(item[0])
                grants.append(Grant(item[0], item[1], item[2], item[3], rev))

        await asyncio.gather(*(release(x) for x in live))

        # Phase 2: allocate + release cycles, the steady state of a busy cluster.
        cycles, cycle_elapsed = await _cycle(client, concurrency, duration / 2, grants, errors)
        stats1 = await client.stats()
    finally:
        await client.close()

    return LoadResult(
        concurrency=concurrency,
        alloc_per_s=allocations / alloc_elapsed,
        alloc_lat=lat,
        cycles_per_s=cycles / cycle_elapsed,
        allocations=allocations + cycles,
        commits=stats1.commits - stats0.commits,
        rejected_commits=stats1.rejected_commits - stats0.rejected_commits,
        double_allocations=len(double_allocations(grants)),
        errors=dict(errors),
    )


class _Client:
    """The calls the bench makes, through the real client library (gpulease.client.aio)."""

    def __init__(self, address: str, config: ClientConfig | None = None) -> None:
        # No retry deadline: a failed call is counted, never retried behind the bench's back.
        base = config or ClientConfig.of(address)
        self._client = AsyncClient(config=replace(base, targets=(address,), timeout=60, retry=RetryConfig(0)))

    async def allocate(
        self, *, gpus: int, cpus: int, memory: int, ttl: int, request_id: str, tenant: str = ""
    ) -> AllocationInfo:
        handle = await self._client.allocate(gpus=gpus, cpus=cpus, memory=memory, ttl=ttl, request_id=request_id,
                                             tenant=tenant, owner=tenant)  # fmt: skip
        return handle.info

    async def wait_allocate(
        self, *, tenant: str, request_id: str, ttl: int, wait: str, on_pending: Callable[[PendingInfo], None]
    ) -> AllocationInfo:
        """1 GPU through WaitAllocate, counted against `tenant` (a local admin, as the bench's calls are,
        may name any): waits in the coordinator's queue when nothing fits now."""
        handle = await self._client.allocate(gpus=1, cpus=1, memory=2**20, ttl=ttl, tenant=tenant, owner=tenant,
                                             request_id=request_id, wait=wait, on_pending=on_pending)  # fmt: skip
        return handle.info

    async def list_pending(self) -> list[PendingInfo]:
        return await self._client.list_pending()

    async def release_revision(self, allocation_id: str) -> int:
        # AsyncClient.release answers only whether it released; the bench needs the release's
        # revision for its double-allocation check, so it reads the response over the same channels.
        response = await self._client._rpc.call("Release", pb.ReleaseRequest(allocation_id=allocation_id),
                                                pb.ReleaseResponse)  # fmt: skip
        return int(response.revision)

    async def stats(self) -> pb.GetStatsResponse:
        return await self._client._rpc.call("GetStats", pb.GetStatsRequest(), pb.GetStatsResponse)

    async def close(self) -> None:
        await self._client.close()


async def _cycle(
    client: _Client, concurrency: int, duration: float, grants: list[Grant], errors: dict[str, int]
) -> tuple[int, float]:
    """Allocate + release in `concurrency` loops for `duration`; returns (cycles, seconds)."""
    cycles = 0
    stop = time.perf_counter() + duration

    async def cycler() -> None:
        nonlocal cycles
        while time.perf_counter() < stop:
            try:
                a = await client.allocate(gpus=1, cpus=1, memory=2**20, ttl=600, request_id=uuid.uuid4().hex)
                rev = await client.release_revision(a.id)
            except Exception as exc:  # counted and reported, never hidden
                errors[type(exc).__name__] += 1
                continue
            grants.append(Grant(a.id, a.node, a.gpu_indexes, a.revision, rev))
            cycles += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(cycler() for _ in range(concurrency)))
    return cycles, time.perf_counter() - t0


async def run_cycles(address: str, concurrency: int, duration: float) -> tuple[float, int]:
    """Allocate+release cycles/s (never fills the cluster) and the double allocations seen."""
    grants: list[Grant] = []
    errors: dict[str, int] = defaultdict(int)
    client = _Client(address)
    try:
        cycles, elapsed = await _cycle(client, concurrency, duration, grants, errors)
    finally:
        await client.close()
    if errors:  # a cycle must never fail here: the cluster cannot fill up
        raise RuntimeError(f"allocate/release cycles failed: {dict(errors)}")
    return cycles / elapsed, len(double_allocations(grants))
