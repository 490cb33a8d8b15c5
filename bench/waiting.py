"""The waiting queue (issue 15): how fast pending requests are admitted when capacity frees up, and
how long a waiting client waits after a release. Measured, never asserted (targets live in
docs/performance.md).

Both parts run against a fresh coordinator on its own prefix of the run's etcd, on a small cluster of
simulated nodes that the bench fills first, so that every request has to wait:

- **Admission throughput**: `pending` WaitAllocate calls (1 GPU each) from `tenants` clients wait on
  the full cluster. Then the holders are released, and every admitted request releases its
  allocation at once, so admissions chain (at most one per GPU in flight) until all are admitted.
  The same-run reference is the old path at the same concurrency: Allocate + Release cycles on the
  same cluster, one loop per GPU, measured before and after the drain.
- **Release-to-admission latency**: with `depth` requests pending on the full cluster, release one
  allocation and time until a waiting client has its allocation (from sending the Release). The
  admitted allocation becomes a holder and a new request takes the freed place in the queue. The
  reference: release, then a plain Allocate from one client, on the same full cluster (no queue).

Tenants: the bench's cluster runs without auth, so every call is the local admin's, which may name
any tenant: each request names one of `tenants` (`allocate(tenant=...)`, its owner label too), so
the queue's fair-share order sees that many tenants. No quota is set.

Every grant and release is recorded with its etcd revision and checked for double allocation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bench.cluster import GPUS_PER_NODE, register_nodes, wait_nodes
from bench.load import _Client
from bench.stats import Latencies
from gpulease.client.models import AllocationInfo, PendingInfo
from gpulease.dev.cluster import LocalCluster
from gpulease.history import Grant, double_allocations

TTL = 600
WAIT = "10m"
# Bounds on each step, so that a stuck coordinator ends the phase with an error instead of a hang.
ENQUEUE_TIMEOUT_S = 300.0
# The drain ends as stalled after this long without an admission (the rest count as errors).
STALL_S = 60.0
SAMPLE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class QueueSettings:
    nodes: int = 10
    tenants: int = 10
    pending: int = 1000
    samples: int = 200
    depth: int = 20
    old_samples: int = 100
    cycle_seconds: float = 2.5
    # The queue coordinator's --queue-ttl (the waiting lease); None: the coordinator's default (10 s).
    queue_ttl: int | None = None

    @staticmethod
    def quick() -> QueueSettings:
        return QueueSettings(nodes=2, tenants=5, pending=50, samples=20, depth=5, old_samples=20, cycle_seconds=0.5)


@dataclass
class QueueResult:
    nodes: int
    gpus: int
    tenants: int
    queue_ttl_s: int | None
    # How the bench tells tenants apart, and how many tenants the coordinator's statuses named.
    tenants_named_by: str
    tenants_seen_by_coordinator: int
    # Admission throughput: `pending` requests waiting on the full cluster, then drained.
    pending: int
    enqueue_seconds: float
    enqueued_per_s: float
    # ListPending right after the last waiter's first status: its count, its time, and the seconds
    # until it listed every request (-1: not within 30 s).
    pending_listed: int
    list_pending_ms: float
    seconds_until_all_listed: float
    admissions: int
    admission_seconds: float
    admissions_per_s: float
    admissions_per_s_first_half: float
    admissions_per_s_second_half: float
    # Pending statuses the coordinator streamed to the waiters while they drained.
    statuses_during_drain: int
    statuses_per_admission: float
    admissions_by_tenant: dict[str, int]
    # The old path at the same concurrency (one loop per GPU): Allocate + Release cycles/s,
    # before and after the drain, and the admission rate over their mean.
    old_cycles_per_s: list[float]
    admissions_over_old_cycles: float
    # Release-to-admission latency: from sending a Release to the waiting client's answer.
    latency_samples: int
    latency_depth: int
    release_to_admission_p50_ms: float
    release_to_admission_p99_ms: float
    release_to_admission_max_ms: float
    release_call_p50_ms: float
    # The old path: Release, then a plain Allocate from the same client, on the full cluster.
    old_release_then_allocate_p50_ms: float
    old_release_then_allocate_p99_ms: float
    latency_p50_over_old: float
    # Waits the client library resumed after a broken stream (expected: 0), and the first messages.
    resumed_waits: int
    resume_sample: list[str]
    # Waits that ended because their request left the queue while its client still waited (the
    # coordinator's "waiting lease lapsed" Conflict): a coordinator limit the bench reports, not a
    # broken run. Other failed calls are `errors`.
    lapsed_waits: int
    # Warnings and errors in the queue coordinator's log: their count and the first few, shortened.
    coordinator_log_problems: int
    coordinator_log_sample: list[str]
    double_allocations: int
    errors: dict[str, int] = field(default_factory=dict)
    error_sample: list[str] = field(default_factory=list)
    measured_unix: int = 0
    seconds: float = 0.0


class _Resumes(logging.Handler):
    """Counts the client library's "resuming it" messages: a wait whose stream broke."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0
        self.sample: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "resuming it" in message:
            self.count += 1
            if len(self.sample) < 3:
                self.sample.append(message[:240])


# What a waiter does with its allocation: (allocation, tenant, its client, when it arrived).
Admitted = Callable[[AllocationInfo, str, _Client, float], Awaitable[None]]


class _Waiters:
    """WaitAllocate calls, one task each, spread over the tenants' clients."""

    def __init__(self, clients: list[_Client], errors: dict[str, int], samples: list[str]) -> None:
        self._clients = clients
        self._errors = errors
        self._samples = samples
        self._started = 0
        self.pending: set[str] = set()  # request ids that have had their first status
        self.statuses = 0
        self.lapsed = 0
        self.tenants: set[str] = set()
        self._changed = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()

    def start(self, admitted: Admitted) -> None:
        i = self._started
        self._started += 1
        client = self._clients[i % len(self._clients)]
        tenant = f"tenant-{i % len(self._clients):02d}"
        rid = uuid.uuid4().hex

        def on_pending(status: PendingInfo) -> None:
            self.statuses += 1
            if rid not in self.pending:
                self.pending.add(rid)
                self.tenants.add(status.tenant)
                self._changed.set()

        async def run() -> None:
            try:
                info = await client.wait_allocate(tenant=tenant, request_id=rid, ttl=TTL, wait=WAIT,
                                                  on_pending=on_pending)  # fmt: skip
            except Exception as exc:  # counted and reported, never hidden
                if "left the queue" in str(exc):
                    self.lapsed += 1
                else:
                    self._errors[f"wait: {type(exc).__name__}"] += 1
                if len(self._samples) < 5:
                    self._samples.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                return
            await admitted(info, tenant, client, time.perf_counter())

        task = asyncio.create_task(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def until_pending(self, count: int, timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        while len(self.pending) < count:
            if not self.tasks and len(self.pending) < count:
                raise RuntimeError(f"only {len(self.pending)} of {count} requests became pending")
            self._changed.clear()
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError(f"{len(self.pending)} of {count} requests pending after {timeout:g}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 1.0))

    async def cancel(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def run_queue(cluster: LocalCluster, settings: QueueSettings, log: Callable[[str], None]) -> QueueResult:
    started = time.time()
    resumes = _Resumes()
    client_log = logging.getLogger("gpulease.client")
    old_level = client_log.level
    client_log.addHandler(resumes)
    client_log.setLevel(logging.INFO)
    extra = ["--queue-ttl", f"{settings.queue_ttl}s"] if settings.queue_ttl else []
    address = cluster.add_coordinator(prefix="/queue/", extra_args=extra).address
    clients: list[_Client] = []
    try:
        names = [f"qnode-{i:03d}" for i in range(settings.nodes)]
        await register_nodes(address, names)
        await wait_nodes(address, settings.nodes, 120)
        clients = [_Client(address) for _ in range(settings.tenants)]
        result = await _measure(clients, settings, log, resumes, started)
        result.coordinator_log_problems, result.coordinator_log_sample = _problems(cluster, address)
        return result
    finally:
        for c in clients:
            await c.close()
        cluster.stop_coordinator(address)
        client_log.removeHandler(resumes)
        client_log.setLevel(old_level)


async def _drain(
    waiters: _Waiters, admitted_at: list[float], errors: dict[str, int], log: Callable[[str], None]
) -> None:
    """Until every waiter has its answer (and has released it), or no admission came for STALL_S."""
    last, last_at, report_at = len(admitted_at), time.perf_counter(), time.perf_counter() + 10
    while waiters.tasks:
        await asyncio.wait(set(waiters.tasks), timeout=1.0)
        now = time.perf_counter()
        if len(admitted_at) != last:
            last, last_at = len(admitted_at), now
        if now >= report_at:
            report_at = now + 10
            log(f"queue: {len(admitted_at)} admitted, {len(waiters.tasks)} still waiting, errors {dict(errors)}")
        if now - last_at > STALL_S:
            errors["drain: stalled, still waiting"] += len(waiters.tasks)
            log(f"queue: no admission for {STALL_S:g}s; giving up on {len(waiters.tasks)} waiting requests")
            return


def _problems(cluster: LocalCluster, address: str) -> tuple[int, list[str]]:
    try:
        lines = cluster.coordinator(address).process.log_path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return -1, [f"log unreadable: {exc}"]
    bad = [line for line in lines if " WARNING " in line or " ERROR " in line or "Traceback" in line]
    sample: list[str] = []
    for line in bad:
        short = line[:240]
        if short not in sample and len(sample) < 5:
            sample.append(short)
    return len(bad), sample


async def _measure(
    clients: list[_Client], s: QueueSettings, log: Callable[[str], None], resumes: _Resumes, started: float
) -> QueueResult:
    gpus = s.nodes * GPUS_PER_NODE
    grants: list[Grant] = []
    errors: dict[str, int] = defaultdict(int)
    samples: list[str] = []  # the first few failed waits' messages
    main = clients[0]

    async def release(info: AllocationInfo, client: _Client = main) -> None:
        rev = await client.release_revision(info.id)
        grants.append(Grant(info.id, info.node, info.gpu_indexes, info.revision, rev))

    async def fill() -> list[AllocationInfo]:
        sem = asyncio.Semaphore(16)

        async def one() -> AllocationInfo:
            async with sem:
                return await main.allocate(gpus=1, cpus=1, memory=2**20, ttl=TTL, request_id=uuid.uuid4().hex)

        return list(await asyncio.gather(*(one() for _ in range(gpus))))

    async def old_cycles() -> float:
        """Allocate + Release cycles/s, one loop per GPU (the queue's concurrency while it drains)."""
        cycles = 0
        stop = time.perf_counter() + s.cycle_seconds

        async def loop(i: int) -> None:
            nonlocal cycles
            client = clients[i % len(clients)]
            while time.perf_counter() < stop:
                try:
                    a = await client.allocate(gpus=1, cpus=1, memory=2**20, ttl=TTL, request_id=uuid.uuid4().hex,
                                              tenant=f"tenant-{i % len(clients):02d}")  # fmt: skip
                    await release(a, client)
                except Exception as exc:  # counted and reported, never hidden
                    errors[f"cycle: {type(exc).__name__}"] += 1
                    continue
                cycles += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(loop(i) for i in range(gpus)))
        return cycles / (time.perf_counter() - t0)

    # --- admission throughput -----------------------------------------------------------------
    log(f"queue: old path, allocate+release at concurrency {gpus} ...")
    old = [await old_cycles()]
    log(f"queue: filling {gpus} GPUs, then {s.pending} requests wait from {s.tenants} tenants ...")
    holders = await fill()
    waiters = _Waiters(clients, errors, samples)
    admitted_at: list[float] = []
    by_tenant: dict[str, int] = defaultdict(int)
    tenants_seen: set[str] = set()

    async def chain(info: AllocationInfo, tenant: str, client: _Client, at: float) -> None:
        admitted_at.append(at)
        by_tenant[tenant] += 1
        try:
            await release(info, client)
        except Exception as exc:
            errors[f"release: {type(exc).__name__}"] += 1

    t0 = time.perf_counter()
    for _ in range(s.pending):
        waiters.start(chain)
    enqueue_s = listed_all_s = list_ms = 0.0
    listed = statuses = 0
    t_start = time.perf_counter()
    try:
        try:
            await waiters.until_pending(s.pending, ENQUEUE_TIMEOUT_S)
        except (TimeoutError, RuntimeError) as exc:
            errors["enqueue: not all pending"] += s.pending - len(waiters.pending)
            log(f"queue: {exc}")
        enqueue_s = time.perf_counter() - t0
        # The coordinator's own count (its view), which may lag the waiters' first statuses (each
        # sent once its request is in etcd): the first ListPending, and how long until it shows all.
        t_list = time.perf_counter()
        listed = n = len(await main.list_pending())
        list_ms = (time.perf_counter() - t_list) * 1000
        for _ in range(int(SAMPLE_TIMEOUT_S / 0.05)):
            if n >= len(waiters.pending):
                break
            await asyncio.sleep(0.05)
            n = len(await main.list_pending())
        listed_all_s = time.perf_counter() - t_list if n >= len(waiters.pending) else -1.0
        statuses_before = waiters.statuses
        log(f"queue: {len(waiters.pending)} pending after {enqueue_s:.1f}s (listed {listed}, all listed after "
            f"{listed_all_s:.1f}s); releasing the holders, admissions chain ...")  # fmt: skip
        t_start = time.perf_counter()
        await asyncio.gather(*(release(h) for h in holders))
        await _drain(waiters, admitted_at, errors, log)
        statuses = waiters.statuses - statuses_before
    finally:
        await waiters.cancel()
    drain_s = (max(admitted_at) - t_start) if admitted_at else 0.0
    lapsed = waiters.lapsed
    tenants_seen |= waiters.tenants
    admitted_at.sort()
    half = len(admitted_at) // 2
    first_half = half / (admitted_at[half - 1] - t_start) if half else 0.0
    second_half = (len(admitted_at) - half) / (admitted_at[-1] - admitted_at[half - 1]) if half > 1 else 0.0
    log("queue: old path again ...")
    old.append(await old_cycles())
    rate = len(admitted_at) / drain_s if drain_s else 0.0

    # --- release-to-admission latency ---------------------------------------------------------
    log(f"queue: latency, old path: release then Allocate on the full cluster, {s.old_samples} times ...")
    ring = deque(await fill())
    old_lat = Latencies()
    for _ in range(s.old_samples):
        h = ring.popleft()
        t0 = time.perf_counter()
        await release(h)
        ring.append(await main.allocate(gpus=1, cpus=1, memory=2**20, ttl=TTL, request_id=uuid.uuid4().hex))
        old_lat.add(time.perf_counter() - t0)
    log(f"queue: latency, {s.depth} pending: release one, time the admission, {s.samples} times ...")
    arrivals: asyncio.Queue[tuple[AllocationInfo, float]] = asyncio.Queue()

    async def arrive(info: AllocationInfo, tenant: str, client: _Client, at: float) -> None:
        arrivals.put_nowait((info, at))

    waiters = _Waiters(clients, errors, samples)
    lat, release_lat = Latencies(), Latencies()
    try:
        for _ in range(s.depth):
            waiters.start(arrive)
        await waiters.until_pending(s.depth, ENQUEUE_TIMEOUT_S)
        for i in range(s.samples):
            h = ring.popleft()
            t0 = time.perf_counter()
            await release(h)
            release_lat.add(time.perf_counter() - t0)
            info, at = await asyncio.wait_for(arrivals.get(), SAMPLE_TIMEOUT_S)
            lat.add(at - t0)
            ring.append(info)
            waiters.start(arrive)
            await waiters.until_pending(s.depth + i + 1, SAMPLE_TIMEOUT_S)
        # Clean up: release everything; the requests still waiting are admitted, then released.
        await asyncio.gather(*(release(h) for h in ring))
        for _ in range(s.depth):
            info, _at = await asyncio.wait_for(arrivals.get(), SAMPLE_TIMEOUT_S)
            await release(info)
    except (TimeoutError, RuntimeError) as exc:
        errors[f"latency: {type(exc).__name__}"] += 1
        log(f"queue: latency part stopped after {len(lat)} samples: {exc!r}")
    finally:
        await waiters.cancel()

    lapsed += waiters.lapsed
    doubles = double_allocations(grants)
    for d in doubles[:5]:
        log(f"queue: DOUBLE ALLOCATION: {d}")
    old_mean = sum(old) / len(old)
    old_p50 = old_lat.ms(0.5)
    return QueueResult(
        nodes=s.nodes,
        gpus=gpus,
        tenants=s.tenants,
        queue_ttl_s=s.queue_ttl,
        tenants_named_by="allocate(tenant=...) (auth off: the local admin may name any tenant; no quota set)",
        tenants_seen_by_coordinator=len(tenants_seen),
        pending=s.pending,
        enqueue_seconds=round(enqueue_s, 2),
        enqueued_per_s=round(s.pending / enqueue_s, 1),
        pending_listed=listed,
        list_pending_ms=round(list_ms, 1),
        seconds_until_all_listed=round(listed_all_s, 2),
        admissions=len(admitted_at),
        admission_seconds=round(drain_s, 2),
        admissions_per_s=round(rate, 1),
        admissions_per_s_first_half=round(first_half, 1),
        admissions_per_s_second_half=round(second_half, 1),
        statuses_during_drain=statuses,
        statuses_per_admission=round(statuses / len(admitted_at), 1) if admitted_at else 0.0,
        admissions_by_tenant=dict(sorted(by_tenant.items())),
        old_cycles_per_s=[round(x, 1) for x in old],
        admissions_over_old_cycles=round(rate / old_mean, 3) if old_mean else 0.0,
        latency_samples=len(lat),
        latency_depth=s.depth,
        release_to_admission_p50_ms=lat.ms(0.5),
        release_to_admission_p99_ms=lat.ms(0.99),
        release_to_admission_max_ms=lat.ms(1.0),
        release_call_p50_ms=release_lat.ms(0.5),
        old_release_then_allocate_p50_ms=old_p50,
        old_release_then_allocate_p99_ms=old_lat.ms(0.99),
        latency_p50_over_old=round(lat.ms(0.5) / old_p50, 2) if old_p50 else 0.0,
        resumed_waits=resumes.count,
        resume_sample=resumes.sample,
        lapsed_waits=lapsed,
        coordinator_log_problems=0,
        coordinator_log_sample=[],
        double_allocations=len(doubles),
        errors=dict(errors),
        error_sample=samples,
        measured_unix=int(started),
        seconds=round(time.time() - started, 1),
    )
