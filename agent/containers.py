"""Containers on this node's allocated GPUs: fencing, and the runtime calls.

The rules for what a caller may ask to run, and for the ids it names, are in agent/container_spec.py
(their shape) and gpulease/common/container_policy.py (what this server allows: mounts, volumes,
env, names, images), with the host's part of the latter in agent/host_mounts.py.

The runtime (agent/runtime) is synchronous; every call runs in a worker thread of the service's
own pool (never the event loop's default one, which the heartbeat and enforcement must not queue
behind). Long calls are kept short per thread: all waits on one container share one watcher,
which waits in slices of at most WAIT_SLICE_S, and log streams run in daemon threads of their own.

One tenant cannot starve the agent (issue 14, part B; ``Limits``): at most one StartContainer in
flight per allocation, and one running container per allocation (so the CPU and memory limits of
an allocation's containers never add up to more than the allocation's: each gets all of them);
at most ``max_concurrent_pulls`` image pulls in flight on the node, the others waiting in turn
(first come, first served: as each allocation has at most one start in flight, no allocation
waits behind another's second pull), each with a hard deadline (the runtime's); at most
``max_log_streams_per_allocation`` log streams and ``max_waits_per_allocation`` waits per
allocation. A call whose client has gone stops its work: a queued pull leaves the queue, a pull
in flight is cut, a wait's or a log stream's reader ends.

The agent touches only its own node's containers: one labelled with another node (two agents on
one dockerd) is not found here, and no start, stop or wait acts on it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import contextvars
import functools
import logging
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from gpulease.agent.container_spec import check_allocation_id, check_container_id, validate_spec
from gpulease.agent.fencing import Fence
from gpulease.agent.host_mounts import check_bind_source
from gpulease.agent.linux import format_cpulist, parse_cpulist
from gpulease.agent.runtime import (
    LABEL_MANAGED,
    LABEL_NODE,
    LABEL_TENANT,
    PULL_CANCEL,
    ContainerInfo,
    ContainerLaunch,
    ContainerRuntime,
    Hardening,
    Volume,
    default_name,
)
from gpulease.common import eventloop
from gpulease.common.container_policy import ContainerPolicy, refuse, tenant_of_volume, volume_backing_problem
from gpulease.common.logs import log_fields
from gpulease.errors import (
    Conflict,
    ContainerNotFound,
    GpuLeaseError,
    Internal,
    InvalidRequest,
    PermissionDenied,
    RateLimited,
    StaleFencingToken,
    Unavailable,
)
from gpulease.v1 import types_pb2 as tpb
from gpulease.v1.types_pb2 import Allocation, NodeInventory

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_WAIT_S = 300
DEFAULT_WAIT_S = 30
MAX_STOP_GRACE_S = 300
# One blocking runtime.wait() lasts at most this long, so a cancelled WaitContainer frees its thread soon.
WAIT_SLICE_S = 1.0
# Threads of the service's own pool (runtime calls for StartContainer, Stop, Get, Wait, List, ...).
CONTAINER_THREADS = 32
MAX_LOG_STREAMS = 128
MAX_STOP_REASONS = 4096
LOG_QUEUE_CHUNKS = 64
# How long creating the runtime (connecting to dockerd) may take before it counts as unavailable.
RUNTIME_CONNECT_TIMEOUT_S = 10.0
RUNTIME_RETRY_S = 5.0

RUNTIME_HINT = "is dockerd running and reachable? set --docker-host or DOCKER_HOST (the agent needs access to it)"

_STATE = {"created": tpb.CONTAINER_STATE_CREATED, "running": tpb.CONTAINER_STATE_RUNNING,
          "exited": tpb.CONTAINER_STATE_EXITED}  # fmt: skip


class RuntimeHandle:
    """The container runtime, created on first use; while it cannot be created, Unavailable with a hint.

    A host without Docker still runs the agent (inventory, registration): only container calls fail.
    """

    def __init__(
        self,
        factory: Callable[[], ContainerRuntime] | None,
        *,
        description: str = "the container runtime",
        retry_s: float = RUNTIME_RETRY_S,
    ) -> None:
        self._factory = factory
        self._description = description
        self._retry_s = retry_s
        self._runtime: ContainerRuntime | None = None
        self._error: str | None = None
        self._failed_at: float | None = None
        self._lock = asyncio.Lock()

    @property
    def current(self) -> ContainerRuntime | None:
        """The runtime if it has been created, without trying to create it."""
        return self._runtime

    async def get(self) -> ContainerRuntime:
        if self._runtime is not None:
            return self._runtime
        if self._factory is None:
            raise Unavailable(f"containers are not supported on this agent: no container runtime ({RUNTIME_HINT})")
        async with self._lock:
            if self._runtime is not None:
                return self._runtime
            if self._failed_at is not None and time.monotonic() - self._failed_at < self._retry_s:
                raise Unavailable(f"{self._description} is unavailable: {self._error}; {RUNTIME_HINT}")
            try:
                runtime = await asyncio.wait_for(asyncio.to_thread(self._factory), RUNTIME_CONNECT_TIMEOUT_S)
            except Exception as e:
                detail = "timed out connecting" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}"
                if self._error != detail:
                    log.warning("%s is unavailable (%s); container calls answer UNAVAILABLE", self._description, detail)
                self._error = detail
                self._failed_at = time.monotonic()
                raise Unavailable(f"{self._description} is unavailable: {detail}; {RUNTIME_HINT}") from None
            if self._error is not None:
                log.info("%s is available again", self._description)
            self._runtime, self._error, self._failed_at = runtime, None, None
            return runtime


class ReadyGate:
    """Closed while the agent reconciles its containers after a restart: no new containers meanwhile."""

    def __init__(self, reconciling: bool = True) -> None:
        self._reconciling = reconciling
        self._done = asyncio.Event()
        try:  # the loop waiters wait on; open() may be called from another thread (the control loop's)
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        if not reconciling:
            self._done.set()

    @property
    def reconciling(self) -> bool:
        return self._reconciling

    def open(self) -> None:
        self._reconciling = False
        eventloop.set_from_any_thread(self._done, self._loop)

    async def wait(self) -> None:
        await self._done.wait()


@dataclass(frozen=True)
class Limits:
    """What one allocation may hold of this agent at once (settings of agent/config.py)."""

    max_concurrent_pulls: int = 2
    max_log_streams_per_allocation: int = 4
    max_waits_per_allocation: int = 8


class PerAllocation:
    """Calls in flight per allocation, refused beyond ``limit`` with a message naming ``rule``."""

    def __init__(self, rule: str, what: str, limit: int, node: str, error: type[GpuLeaseError] = RateLimited) -> None:
        self.rule = rule
        self._what = what
        self.limit = limit
        self._node = node
        self._error = error
        self._counts: dict[str, int] = {}

    def count(self, allocation_id: str) -> int:
        return self._counts.get(allocation_id, 0)

    def acquire(self, allocation_id: str) -> None:
        n = self._counts.get(allocation_id, 0)
        if n >= self.limit:
            raise self._error(
                f"rule {self.rule!r}: allocation {allocation_id} has {n} {self._what} in flight on node {self._node}, "
                f"the most it may have at once; retry when one has ended"
            )
        self._counts[allocation_id] = n + 1

    def release(self, allocation_id: str) -> None:
        n = self._counts.get(allocation_id, 0) - 1
        if n > 0:
            self._counts[allocation_id] = n
        else:
            self._counts.pop(allocation_id, None)

    @contextlib.contextmanager
    def hold(self, allocation_id: str) -> Iterator[None]:
        self.acquire(allocation_id)
        try:
            yield
        finally:
            self.release(allocation_id)


class FairSlots:
    """A semaphore whose waiters get their turn in the order they came (a waiter that is cancelled
    leaves the queue). Event-loop only."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._free = slots
        self._queue: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def in_use(self) -> int:
        return self.slots - self._free

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._queue if not f.done())

    async def acquire(self) -> None:
        if self._free > 0 and not self.waiting:
            self._free -= 1
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.release()  # the turn came as the waiter was cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._queue.remove(turn)
            raise

    def release(self) -> None:
        while self._queue:
            turn = self._queue.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._free += 1


@dataclass
class _ExitWatch:
    task: asyncio.Task[ContainerInfo]
    waiters: int = 0


class ContainerService:
    def __init__(
        self,
        *,
        node: str,
        runtime: RuntimeHandle,
        fence: Fence,
        gate: ReadyGate,
        latest_inventory: Callable[[], NodeInventory | None] = lambda: None,
        network: str = "bridge",
        stop_grace_seconds: float = 10.0,
        on_started: Callable[[ContainerInfo], None] | None = None,
        recheck: Callable[[], None] | None = None,
        policy: ContainerPolicy | None = None,
        hardening: Hardening | None = None,
        limits: Limits | None = None,
    ) -> None:
        self._node = node
        # How every container runs (not privileged, no-new-privileges, capabilities, PID and log limits).
        self._hardening = hardening if hardening is not None else Hardening()
        self._limits = limits if limits is not None else Limits()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._starts = PerAllocation("starts", "StartContainer call(s)", 1, node)
        self._log_streams = PerAllocation(
            "log-streams", "log stream(s)", self._limits.max_log_streams_per_allocation, node
        )
        self._waits = PerAllocation("waits", "WaitContainer call(s)", self._limits.max_waits_per_allocation, node)
        self.pulls = FairSlots(self._limits.max_concurrent_pulls)
        self._exit_watches: dict[str, _ExitWatch] = {}
        # What a spec may ask of this server (gpulease/common/container_policy.py): this agent's own
        # copy, enforced whatever the coordinator's says.
        self._policy = policy if policy is not None else ContainerPolicy()
        self._runtime = runtime
        self._fence = fence
        self._gate = gate
        self._latest_inventory = latest_inventory
        self._network = network
        self._stop_grace = stop_grace_seconds
        self._on_started = on_started
        # Asks the enforcer to check now (Enforcer.recheck): a start found another allocation's
        # container on its GPU, or could not undo a start.
        self._recheck = recheck
        self._gpu_locks: dict[str, asyncio.Lock] = {}
        # Why gpulease stopped a container (container id -> reason); only this agent's lifetime.
        self._stop_reasons: dict[str, str] = {}
        self.log_readers = LogReaders()
        # Named volumes of starts in progress (name -> how many): the enforcer never removes these.
        # It removes a volume holding volume_lock, after checking this; a start registers first,
        # then waits for the lock once, so it never inspects a volume that is being removed.
        self._volumes_starting: dict[str, int] = {}
        self._volumes_starting_lock = threading.Lock()  # the enforcer may read it from its own thread
        # Held (in a worker thread) around removing a volume; a start waits for it once: see start().
        self.volume_lock = threading.Lock()

    @property
    def node(self) -> str:
        return self._node

    @property
    def runtime(self) -> RuntimeHandle:
        return self._runtime

    @property
    def policy(self) -> ContainerPolicy:
        return self._policy

    @property
    def hardening(self) -> Hardening:
        return self._hardening

    @property
    def limits(self) -> Limits:
        return self._limits

    def volumes_starting(self) -> frozenset[str]:
        """Named volumes that a start in progress will mount: not to be removed meanwhile."""
        with self._volumes_starting_lock:
            return frozenset(self._volumes_starting)

    def close(self) -> None:
        """Let the service's threads go (those in a runtime call finish it first)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the service's own pool, with the caller's context (PULL_CANCEL)."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(CONTAINER_THREADS, thread_name_prefix="agent-containers")
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(context.run, fn, *args))

    def mine(self, info: ContainerInfo) -> bool:
        """Whether a container is this node's (its LABEL_NODE): the agent touches no other."""
        return info.node == self._node

    async def own_containers(self, runtime: ContainerRuntime, allocation_id: str = "") -> list[ContainerInfo]:
        return [i for i in await self._call(runtime.list, allocation_id) if self.mine(i)]

    # -- start ---------------------------------------------------------------------------------

    async def start(self, allocation_id: str, revision: int, spec: tpb.ContainerSpec) -> tpb.ContainerStatus:
        """Check, fence, pull, then under the GPUs' locks: fence, check the GPUs, create and start, fence.

        The container policy is checked first (no coordinator call, no Docker call), again once the
        fence has said whose allocation it is (tenant volumes), then on the host (bind sources
        without symlinks, what named volumes are backed by) before the pull and again right before
        create, when tenant volumes are made. The fence that lets a container be created comes after
        the pull and right before create, and one more after the start catches an allocation that
        ended in between: its container is stopped and removed, and the caller told so. A GPU whose
        index names another UUID than the allocation's, or that another allocation's running
        container uses, is refused.
        """
        check_allocation_id(allocation_id)
        validate_spec(spec)
        # The policy, before anything else: a refusal costs no coordinator call and no Docker call.
        self._policy.check(spec)
        if self._gate.reconciling:
            raise Unavailable(
                f"the agent of node {self._node} is still reconciling its containers with the coordinator "
                "after a restart; no container is started until it is done: retry shortly"
            )
        # One start in flight per allocation; held until the start has ended, even when its caller
        # has gone (the shielded part below releases it then).
        self._starts.acquire(allocation_id)
        handed_over = False
        try:
            return await self._start(allocation_id, revision, spec)
        except _HandedOver as e:
            handed_over = True
            e.task.add_done_callback(lambda _: self._starts.release(allocation_id))
            raise asyncio.CancelledError from None
        finally:
            if not handed_over:
                self._starts.release(allocation_id)

    async def _start(self, allocation_id: str, revision: int, spec: tpb.ContainerSpec) -> tpb.ContainerStatus:
        runtime = await self._runtime.get()  # before fencing: no coordinator call when Docker is down
        # A first check refuses a stale token, another node's allocation or shifted GPUs before a
        # pull that can take minutes. It is not the check that counts: the allocation can end, and
        # its GPUs go to someone else, while the image is pulled.
        alloc = await self._fence.confirm(allocation_id, revision)
        self._policy.check(spec, tenant=alloc.tenant)  # tenant volumes: whose they are
        self._check_gpus_match_inventory(alloc)
        self.build_launch(alloc, spec)  # what it refuses, it refuses before the pull too
        volumes = tuple(v.source for v in spec.volumes if not v.source.startswith("/"))
        with self._volumes_starting_lock:
            for name in volumes:
                self._volumes_starting[name] = self._volumes_starting.get(name, 0) + 1
        try:
            if volumes:
                # A removal that began before this start registered ends first.
                await self._call(_pass_through, self.volume_lock)
            # The host's part of the policy (symlinks, what volumes are backed by), before the pull.
            await self._check_mounts(runtime, spec, alloc.tenant, create=False)
            await self._refuse_second_container(runtime, allocation_id)  # before the pull too
            # Containers of different allocations cannot reach each other on it (rule 'network-isolation').
            await self._call(runtime.prepare_network, self._network)
            await self._ensure_image(runtime, spec.image)
            # Shielded: once a container may exist, the check after its start and the undo run even if
            # the caller goes away meanwhile.
            task = asyncio.create_task(self._fenced_start(runtime, alloc, spec))
            try:
                info = await asyncio.shield(task)
            except asyncio.CancelledError:
                task.add_done_callback(_log_unawaited_failure)
                held, volumes = volumes, ()  # released when the shielded start ends, not now
                task.add_done_callback(lambda _: self._volumes_started(held))
                raise _HandedOver(task) from None
        finally:
            self._volumes_started(volumes)
        return self.status(info)

    async def _ensure_image(self, runtime: ContainerRuntime, image: str) -> None:
        """The image, pulled if missing: in turn (``Limits.max_concurrent_pulls`` at once on the node),
        and given up as soon as the caller has gone (queued: it leaves the queue; pulling: the pull
        is cut, and its slot freed once the runtime has let go of it)."""
        if await self._call(runtime.has_image, image):
            return
        await self.pulls.acquire()
        cancel = threading.Event()
        token = PULL_CANCEL.set(cancel)
        try:
            pull = asyncio.ensure_future(self._call(runtime.ensure_image, image))
        finally:
            PULL_CANCEL.reset(token)
        try:
            await asyncio.shield(pull)
        except asyncio.CancelledError:
            cancel.set()
            pull.add_done_callback(lambda _: self.pulls.release())
            pull.add_done_callback(_log_unawaited_failure)
            raise
        except BaseException:
            self.pulls.release()
            raise
        self.pulls.release()

    async def _refuse_second_container(self, runtime: ContainerRuntime, allocation_id: str) -> None:
        """PermissionDenied while the allocation has a container that runs (or was created) on this node.

        One running container per allocation (issue 14, part B): each container gets all of the
        allocation's CPUs and memory, so two would together hold twice what it was granted."""
        for other in await self.own_containers(runtime, allocation_id):
            if other.state in ("running", "created"):
                # A policy refusal (issue 14: PERMISSION_DENIED naming the rule), not a race: retrying
                # does not help until that container has ended.
                raise PermissionDenied(
                    f"rule 'one-container': allocation {allocation_id} already has container {other.name} "
                    f"({other.id[:12]}, {other.state}) on node {self._node}; an allocation runs one container at a "
                    "time, so that its containers never hold more CPU and memory than it does: stop that one (or "
                    "wait for it to exit) first"
                )

    def _volumes_started(self, names: tuple[str, ...]) -> None:
        with self._volumes_starting_lock:
            for name in names:
                left = self._volumes_starting.get(name, 0) - 1
                if left > 0:
                    self._volumes_starting[name] = left
                else:
                    self._volumes_starting.pop(name, None)

    async def _check_mounts(
        self, runtime: ContainerRuntime, spec: tpb.ContainerSpec, tenant: str, *, create: bool
    ) -> None:
        """The policy's checks that need this host, for mounts the policy allows by name.

        Bind sources: no symlink in any component, a directory or a regular file (agent/host_mounts.py).
        Named volumes: on the local driver with no bind or device (rule 'volume-driver'); an
        allowlisted one must exist (an admin makes it); a tenant volume is made by the agent, with
        ``create`` (right before the container), and one that exists must be the agent's, for that
        tenant. Docker is asked about volumes only: reads, and with ``create`` a create.
        """
        binds = [(i, v.source) for i, v in enumerate(spec.volumes) if v.source.startswith("/")]
        if binds:
            await self._call(_check_bind_sources, binds)
        for i, v in enumerate(spec.volumes):
            if v.source.startswith("/"):
                continue
            what = f"volumes[{i}].source"
            owner = tenant_of_volume(v.source)
            info = await self._call(runtime.inspect_volume, v.source)
            if info is None:
                if owner is None:
                    raise refuse(
                        "volume-allowlist",
                        f"{what}: volume {v.source!r} is allowlisted but does not exist on node {self._node}; an "
                        "admin creates it",
                    )
                if not create:
                    continue  # made right before the container is
                labels = {LABEL_MANAGED: "true", LABEL_TENANT: owner, LABEL_NODE: self._node}
                info = await self._call(runtime.create_volume, v.source, labels)
            problem = volume_backing_problem(v.source, info.driver, info.options)
            if problem is not None:
                raise refuse("volume-driver", f"{what}: {problem}")
            if owner is not None and (
                info.labels.get(LABEL_MANAGED) != "true" or info.labels.get(LABEL_TENANT) != owner
            ):
                raise refuse(
                    "volume-tenant",
                    f"{what}: volume {v.source!r} exists on node {self._node} but was not made by gpulease for tenant "
                    f"{owner!r}, so it is not mounted",
                )

    async def _fenced_start(
        self, runtime: ContainerRuntime, first: Allocation, spec: tpb.ContainerSpec
    ) -> ContainerInfo:
        """Fence, create and start, fence again; undo the start if the second check fails.

        Under the GPUs' locks, so that two starts on one GPU never both pass the in-use check before
        either container exists: the second one sees the first, or finds it undone.
        """
        allocation_id, revision = first.id, first.revision
        async with self._holding_gpus(first):
            alloc = await self._fence.confirm(allocation_id, revision)  # right before create
            self._check_gpus_match_inventory(alloc)  # the inventory may have been read again meanwhile
            launch = self.build_launch(alloc, spec)
            await self._refuse_gpus_in_use(runtime, launch)
            await self._refuse_second_container(runtime, allocation_id)
            # Again after the pull, which can take minutes; tenant volumes are made now.
            await self._check_mounts(runtime, spec, alloc.tenant, create=True)
            log.info(
                "starting container %r for allocation %s (revision %d) on GPU(s) %s: image %s",
                launch.name,
                alloc.id,
                alloc.revision,
                list(launch.gpu_indexes),
                launch.image,
            )
            info = await self._call(runtime.create_and_start, launch)
            # The allocation may have ended between the check above and the start: only a check
            # made after the container runs proves it started while the allocation was live.
            try:
                await self._fence.confirm(allocation_id, revision)
            except Exception as e:
                await self._undo_start(runtime, info, e)
        log.info(
            "started container %s (%s) for allocation %s",
            info.id[:12],
            info.name,
            alloc.id,
            extra=log_fields(allocation_id=alloc.id, node=self._node),
        )
        if self._on_started is not None:
            self._on_started(info)
        return info

    async def _undo_start(self, runtime: ContainerRuntime, info: ContainerInfo, cause: Exception) -> NoReturn:
        """Stop (no grace: the GPU may be someone else's by now) and remove a container whose
        allocation could not be confirmed after it started; raise what the caller is told."""
        ended = isinstance(cause, StaleFencingToken)
        detail = cause.message if isinstance(cause, GpuLeaseError) else f"{type(cause).__name__}: {cause}"
        why = (
            "the allocation ended (released or expired) while the container was being started"
            if ended
            else "the allocation could not be confirmed live after the container started"
        )
        failures: list[str] = []
        try:
            await self.stop_container(info, 0.0, f"started and then stopped: {why}", level=logging.WARNING)
        except Exception as e:
            failures.append(f"stop: {e}")
        try:
            await self._call(runtime.remove, info.id)
        except Exception as e:
            failures.append(f"remove: {e}")
        if failures:
            if self._recheck is not None:
                self._recheck()  # the enforcer stops it, on a fresh answer
            outcome = (
                f"then it could not be stopped and removed ({'; '.join(failures)}): the enforcer stops it at "
                "its next check"
            )
        else:
            outcome = "then stopped and removed"
        message = (
            f"container {info.name} ({info.id[:12]}) of allocation {info.allocation_id} was started and {outcome}, "
            f"because {why}: {detail}"
        )
        if ended:
            raise StaleFencingToken(message) from None
        if isinstance(cause, GpuLeaseError):
            raise type(cause)(message) from None
        raise Internal(message) from cause

    def _check_gpus_match_inventory(self, alloc: Allocation) -> None:
        """StaleFencingToken unless every (index, UUID) pair of the allocation is this node's now.

        Containers get their GPUs by UUID, the coordinator's record names index and UUID, and
        indexes shift when a GPU falls off the bus and the host reboots: the record's index may now
        be another physical GPU, and its UUID someone else's. Nothing is started on a guess, so an
        inventory not read yet is Unavailable.
        """
        if not alloc.gpus:
            return
        inventory = self._latest_inventory()
        if inventory is None:
            raise Unavailable(
                f"the agent of node {self._node} has not read its GPU inventory yet, so it cannot check that the "
                f"GPUs of allocation {alloc.id} are the ones it names: no container is started; retry shortly"
            )
        uuids = {g.index: g.uuid for g in inventory.gpus}
        for g in alloc.gpus:
            have = uuids.get(g.index)
            if have is None:
                raise StaleFencingToken(
                    f"allocation {alloc.id} holds GPU {g.index} (UUID {g.uuid!r}), but node {self._node} has no "
                    f"GPU {g.index} now: no container is started"
                )
            if have != g.uuid:
                raise StaleFencingToken(
                    f"allocation {alloc.id} holds GPU {g.index} as UUID {g.uuid!r}, but GPU {g.index} of node "
                    f"{self._node} is now UUID {have!r} (indexes shift when a GPU falls off the bus and the host "
                    "reboots): the container would get a GPU the allocation does not hold, so none is started"
                )

    async def _refuse_gpus_in_use(self, runtime: ContainerRuntime, launch: ContainerLaunch) -> None:
        """Conflict when a running container of another allocation uses one of the launch's GPUs.

        Normally that container's allocation has ended and the enforcer has not stopped it yet, so
        the enforcer is asked to check now and the caller may retry shortly. If both allocations are
        live, the records disagree with the hardware, and nothing is started until that is fixed.
        """
        infos = await self.own_containers(runtime)
        for other in infos:
            if other.state != "running" or other.allocation_id == launch.allocation_id:
                continue
            shared = _shared_gpus(launch, other)
            if not shared:
                continue
            if self._recheck is not None:
                self._recheck()
            index, uuid = shared[0]
            raise Conflict(
                f"GPU {index} ({uuid or 'UUID unknown'}) of node {self._node} is in use by container "
                f"{other.name} ({other.id[:12]}) of allocation {other.allocation_id} (revision {other.revision}), "
                f"which is still running: no container is started for allocation {launch.allocation_id}. If that "
                "allocation has ended, the agent stops its container within seconds: retry then"
            )

    @contextlib.asynccontextmanager
    async def _holding_gpus(self, alloc: Allocation) -> AsyncIterator[None]:
        # By UUID: that is what the container gets (the record's pairs were just checked against
        # the inventory). Taken in one order, so two starts never hold each other up crosswise.
        # The allocation's own lock too: its creates never overlap (one container per allocation).
        keys = sorted({g.uuid or f"index {g.index}" for g in alloc.gpus} | {f"allocation {alloc.id}"})
        async with contextlib.AsyncExitStack() as stack:
            for key in keys:
                await stack.enter_async_context(self._gpu_locks.setdefault(key, asyncio.Lock()))
            yield

    def build_launch(self, alloc: Allocation, spec: tpb.ContainerSpec) -> ContainerLaunch:
        """Resources from the allocation record; only what to run from the caller's spec."""
        if spec.shm_size_bytes > alloc.memory_bytes > 0:
            raise InvalidRequest(
                f"shm_size_bytes {spec.shm_size_bytes} exceeds the allocation's memory ({alloc.memory_bytes} bytes)"
            )
        gpu_indexes = tuple(g.index for g in alloc.gpus)
        return ContainerLaunch(
            allocation_id=alloc.id,
            revision=alloc.revision,
            node=self._node,
            gpu_uuids=tuple(g.uuid for g in alloc.gpus),
            gpu_indexes=gpu_indexes,
            cpus=alloc.cpus,
            memory_bytes=alloc.memory_bytes,
            image=spec.image,
            command=tuple(spec.command),
            env=dict(spec.env),
            working_dir=spec.working_dir,
            volumes=tuple(Volume(v.source, v.target, v.read_only) for v in spec.volumes),
            shm_size_bytes=spec.shm_size_bytes,
            name=spec.name or default_name(alloc.id),
            cpuset=self._cpuset([(g.index, g.uuid) for g in alloc.gpus], alloc.cpus),
            network=self._network,
            owner=alloc.principal,
            tenant=alloc.tenant,
            hardening=self._hardening,
        )

    def _cpuset(self, gpus: list[tuple[int, str]], cpus: int) -> str:
        """Union of the GPUs' CPU affinity, when the inventory knows it for every one of them.

        GPUs are matched by UUID (indexes can change across reboots). Left empty (no pinning) when
        any GPU's affinity is unknown, or when the union has fewer CPUs than the allocation:
        pinning must never give a container less than it was allocated.
        """
        inventory = self._latest_inventory()
        if inventory is None or not gpus:
            return ""
        affinity = {g.uuid: g.cpu_affinity for g in inventory.gpus}
        union: set[int] = set()
        for index, uuid in gpus:
            text = affinity.get(uuid, "")
            if not text:
                return ""
            try:
                union |= parse_cpulist(text)
            except ValueError:
                log.warning("GPU %d reports an unparsable cpu_affinity %r; not pinning CPUs", index, text)
                return ""
        if len(union) < cpus:
            return ""
        return format_cpulist(union)

    # -- the other calls ----------------------------------------------------------------------

    async def stop(self, ref: tpb.ContainerRef, grace_seconds: int) -> tpb.ContainerStatus:
        if not 0 <= grace_seconds <= MAX_STOP_GRACE_S:
            raise InvalidRequest(f"grace_seconds must be 0 (the default, {self._stop_grace:g}s) to {MAX_STOP_GRACE_S}")
        grace = float(grace_seconds) if grace_seconds > 0 else self._stop_grace
        runtime = await self._runtime.get()
        info = await self._resolve(runtime, ref)
        info = await self.stop_container(info, grace, "stopped by request")
        return self.status(info)

    async def stop_container(
        self, info: ContainerInfo, grace: float, reason: str, *, level: int = logging.INFO
    ) -> ContainerInfo:
        """Stop one container (no-op if it is not running) and remember why."""
        runtime = await self._runtime.get()
        if info.state == "running":
            self.note_stop_reason(info.id, reason)
            log.log(
                level,
                "stopping container %s (%s) of allocation %s, grace %gs: %s",
                info.id[:12],
                info.name,
                info.allocation_id,
                grace,
                reason,
            )
        return await self._call(runtime.stop, info.id, grace)

    def note_stop_reason(self, container_id: str, reason: str) -> None:
        """Why gpulease stopped a container (shown in its status); callable from any thread."""
        reasons = dict(self._stop_reasons)
        reasons.setdefault(container_id, reason)
        while len(reasons) > MAX_STOP_REASONS:
            del reasons[next(iter(reasons))]  # the oldest
        self._stop_reasons = reasons

    async def get(self, ref: tpb.ContainerRef) -> tpb.ContainerStatus:
        runtime = await self._runtime.get()
        return self.status(await self._resolve(runtime, ref))

    async def wait(self, ref: tpb.ContainerRef, timeout_seconds: int) -> tpb.ContainerStatus:
        if not 0 <= timeout_seconds <= MAX_WAIT_S:
            raise InvalidRequest(f"timeout_seconds must be 0 (the default, {DEFAULT_WAIT_S}s) to {MAX_WAIT_S}")
        timeout = float(timeout_seconds or DEFAULT_WAIT_S)
        runtime = await self._runtime.get()
        info = await self._resolve(runtime, ref)
        if info.state == "exited":
            return self.status(info)
        with self._waits.hold(info.allocation_id):
            info = await self._wait_for_exit(runtime, info, timeout)
        return self.status(info)

    async def _wait_for_exit(self, runtime: ContainerRuntime, info: ContainerInfo, timeout: float) -> ContainerInfo:
        """The container once it exits, or as it is after ``timeout``. Every wait on one container
        shares one watcher (one thread at a time, in WAIT_SLICE_S slices), which ends when the
        container exits or no one waits any more: waits cost threads per container, not per call."""
        watch = self._exit_watches.get(info.id)
        if watch is None or watch.task.done():
            watch = _ExitWatch(asyncio.create_task(self._watch_exit(runtime, info.id), name=f"wait-{info.id[:12]}"))
            self._exit_watches[info.id] = watch
        watch.waiters += 1
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(watch.task)
        except TimeoutError:
            return await self._call(runtime.get, info.id)
        finally:
            watch.waiters -= 1

    async def _watch_exit(self, runtime: ContainerRuntime, container_id: str) -> ContainerInfo:
        try:
            while True:
                info = await self._call(runtime.wait, container_id, WAIT_SLICE_S)
                watch = self._exit_watches.get(container_id)
                if info.state == "exited" or watch is None or watch.waiters <= 0:
                    return info
        finally:
            watch = self._exit_watches.get(container_id)
            if watch is not None and watch.task is asyncio.current_task():
                del self._exit_watches[container_id]

    async def list(self, allocation_id: str) -> list[tpb.ContainerStatus]:
        if allocation_id:
            check_allocation_id(allocation_id)
        runtime = await self._runtime.get()
        infos = await self.own_containers(runtime, allocation_id)
        return [self.status(i) for i in sorted(infos, key=lambda i: (i.started_unix_ms, i.id))]

    async def logs(self, ref: tpb.ContainerRef, follow: bool) -> AsyncGenerator[tpb.LogChunk, None]:
        """Chunks in order; with follow, until the container exits. Ends cleanly when the consumer stops."""
        runtime = await self._runtime.get()
        info = await self._resolve(runtime, ref)
        with self._log_streams.hold(info.allocation_id):
            chunks = iterate_in_thread(lambda: runtime.logs(info.id, follow), self.log_readers)
            async with contextlib.aclosing(chunks):
                async for stream, data in chunks:
                    yield tpb.LogChunk(data=data, stream=stream)

    # -- helpers ------------------------------------------------------------------------------

    async def _resolve(self, runtime: ContainerRuntime, ref: tpb.ContainerRef) -> ContainerInfo:
        """The container a ref names: by id (checked against the allocation when both are given),
        or the only container of the allocation."""
        if ref.allocation_id:
            check_allocation_id(ref.allocation_id)
        if ref.container_id:
            check_container_id(ref.container_id)
            info = await self._call(runtime.get, ref.container_id)
            if not self.mine(info):
                raise ContainerNotFound(f"container {ref.container_id} is not one of node {self._node}'s")
            if ref.allocation_id and info.allocation_id != ref.allocation_id:
                raise ContainerNotFound(
                    f"container {ref.container_id} does not belong to allocation {ref.allocation_id}"
                )
            return info
        if not ref.allocation_id:
            raise InvalidRequest("name the container: set container_id, allocation_id, or both")
        infos = await self.own_containers(runtime, ref.allocation_id)
        if not infos:
            raise ContainerNotFound(f"allocation {ref.allocation_id} has no container on node {self._node}")
        if len(infos) > 1:
            ids = ", ".join(sorted(i.id[:12] for i in infos))
            raise InvalidRequest(
                f"allocation {ref.allocation_id} has {len(infos)} containers on node {self._node} ({ids}): "
                "set container_id to pick one"
            )
        return infos[0]

    def status(self, info: ContainerInfo) -> tpb.ContainerStatus:
        status = tpb.ContainerStatus(
            container_id=info.id,
            allocation_id=info.allocation_id,
            revision=info.revision,
            state=_STATE.get(info.state, tpb.CONTAINER_STATE_UNSPECIFIED),
            image=info.image,
            name=info.name,
            error=self._stop_reasons.get(info.id, "") or str(getattr(info, "error", "") or ""),
            started_unix_ms=info.started_unix_ms,
            finished_unix_ms=info.finished_unix_ms,
            gpu_indexes=list(info.gpu_indexes),
            node=self._node,
            restart_count=info.restart_count,
        )
        if info.exit_code is not None:
            status.exit_code = info.exit_code
        return status


class _HandedOver(Exception):
    """Not an error: a start whose caller has gone while its shielded part runs on (see start())."""

    def __init__(self, task: asyncio.Task[Any]) -> None:
        super().__init__("handed over")
        self.task = task


def _pass_through(lock: threading.Lock) -> None:
    with lock:
        pass


def _check_bind_sources(binds: list[tuple[int, str]]) -> None:
    for i, source in binds:
        check_bind_source(f"volumes[{i}]", source)


def _shared_gpus(launch: ContainerLaunch, other: ContainerInfo) -> list[tuple[int, str]]:
    """The launch's (index, UUID) pairs that ``other`` uses too.

    By UUID when both sides know theirs (indexes may have shifted since ``other`` started);
    by index for a container without the UUID label, as that is all it says.
    """
    pairs = list(zip(launch.gpu_indexes, launch.gpu_uuids, strict=True))
    if other.gpu_uuids and all(launch.gpu_uuids):
        theirs = set(other.gpu_uuids)
        return [(i, u) for i, u in pairs if u in theirs]
    indexes = set(other.gpu_indexes)
    return [(i, u) for i, u in pairs if i in indexes]


def _log_unawaited_failure(task: asyncio.Task[Any]) -> None:
    """A shielded start whose caller went away: its failure is logged, not lost."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("a container start whose caller had gone away failed: %s", task.exception())


# -- a synchronous iterator, consumed asynchronously ------------------------------------------------

_END = object()


@dataclass(frozen=True)
class _Failure:
    error: Exception


class LogReaders:
    """Counts the threads reading logs, which may outlive their stream (see iterate_in_thread)."""

    def __init__(self, limit: int = MAX_LOG_STREAMS) -> None:
        self.limit = limit
        self._count = 0
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return self._count

    def acquire(self) -> bool:
        with self._lock:
            if self._count >= self.limit:
                return False
            self._count += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._count -= 1


async def iterate_in_thread(make: Callable[[], Iterator[T]], readers: LogReaders) -> AsyncGenerator[T, None]:
    """Run a blocking iterator in a daemon thread and hand its items over through a bounded queue.

    When the consumer stops (the client went away, the task was cancelled) the thread is told to
    stop and the iterator's ``close()`` is called from another thread. An iterator that can be
    closed that way while it blocks (like the Docker SDK's log stream) ends at once; any other
    ends at its next item, or when the container exits. The thread is a daemon and counted in
    ``readers`` until it ends, so neither shutdown nor the thread pool waits for it.
    """
    if not readers.acquire():
        raise RateLimited(
            f"rule 'log-streams': too many log streams are open on this node ({readers.limit}); retry later, or wait "
            "for the container instead"
        )
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=LOG_QUEUE_CHUNKS)
    stopped = threading.Event()
    holder: list[Iterator[T]] = []

    def put(item: object) -> bool:
        while not stopped.is_set():
            try:
                future = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
            except RuntimeError:  # the loop is closed
                return False
            try:
                future.result(timeout=0.5)
                return True
            except concurrent.futures.TimeoutError:
                future.cancel()
            except (concurrent.futures.CancelledError, RuntimeError):
                return False
        return False

    def pump() -> None:
        try:
            iterator = make()
            holder.append(iterator)
            for item in iterator:
                if stopped.is_set() or not put(item):
                    return
        except Exception as e:
            if not stopped.is_set():
                put(_Failure(e))
            return
        finally:
            _close(holder)
            readers.release()
        put(_END)

    try:
        threading.Thread(target=pump, name="container-logs", daemon=True).start()
    except BaseException:
        readers.release()
        raise
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stopped.set()
        # Interrupt a read that blocks; not on this thread, as close() may block.
        threading.Thread(target=_close, args=(holder,), name="container-logs-close", daemon=True).start()
        while not queue.empty():  # unblock a producer waiting for space
            queue.get_nowait()


def _close(holder: list[Any]) -> None:
    for iterator in holder:
        close = getattr(iterator, "close", None)
        if callable(close):
            # A generator that is running in the pump thread refuses (ValueError): it ends at its next item.
            with contextlib.suppress(Exception):
                close()


async def gather_logged(what: str, calls: list[Awaitable[object]]) -> list[object]:
    """Run calls concurrently; log (don't raise) each failure."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
            log.warning("%s failed: %s: %s", what, type(r).__name__, r)
    return list(results)
