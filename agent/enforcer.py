"""Stops containers whose allocation has ended, or that the agent can no longer vouch for.

Every ``interval`` the enforcer lists the node's managed containers (Docker labels), then asks the
coordinator for the node's live allocations (ListAllocations(node=...), read from etcd), unless a
heartbeat has said since that they have not changed (see below). A running container is stopped
(SIGTERM, SIGKILL after ``grace``) when:

- its allocation is not in the list (released, or its lease expired), or
- the live allocation's revision differs from the revision the container was started under, or
- the coordinator has been unreachable for longer than the allocation's TTL: its lease may have
  expired meanwhile and its GPUs been given to someone else, so the agent cannot vouch for it.

Containers are listed *before* allocations, so a container that is listed was started (after a
fencing check) before the allocation list was read: missing from that list means really gone.

Exited containers are removed (with their writable layer and logs) once their allocation is not
live and they finished more than ``retention`` seconds ago; only after an answer from the
coordinator, so an outage never removes anything. Tenant volumes the agent made (t-<tenant>-<name>,
gpulease/common/container_policy.py) go the same way: once no container refers to one (Docker's
"dangling"), it was made more than ``retention`` ago and no start in progress names it, it is
removed, checked every VOLUME_SWEEP_S and after each tick that removed a container.

Unused images are removed by age and by disk use, every IMAGE_SWEEP_S: an image no container
refers to (running or not, gpulease's or not) goes once it has not been used for
``image_retention`` seconds (default 24 h; 0: never by age), counted from the latest of when it was
pulled or tagged here (Docker's LastTagTime), when the enforcer last saw a container use it, and
when this agent started (so a restart never makes an image look old); and while the images take
more than ``image_disk_limit`` bytes (default 200 GiB, as Docker counts each image's size; 0: no
limit), unused images go, least recently used first. An image a container starts from meanwhile
is not removed (Docker refuses).

Heartbeat answers carry the node's allocations revision, which changes whenever an allocation
there is created, released or expires. While it equals the one seen when the agent last asked,
every running container is of an allocation in that answer, and a heartbeat answered within the
last two heartbeat intervals, the enforcer judges from that answer without asking again: at
10,000 nodes, asking every 2 s would be 5,000 calls a second, most of them answering "no change".
A changed revision wakes the enforcer at once. So does every container start, and a start refused
because another allocation's container holds its GPU; those make it ask afresh (recheck). Only an
answer read from etcd ever stops a container; the revision only says when asking again is pointless.

The enforcer touches only its own node's containers (LABEL_NODE): two agents on one dockerd never
stop or remove each other's. It runs its runtime calls in a pool of its own (and, in the agent,
on the control thread's event loop with its own Docker connection: agent/control.py), so no amount
of container traffic (waits, log streams, pulls) delays it. A coordinator that answers NOT_FOUND
for the node is never a reason to stop anything: nothing can be placed on a node the coordinator
does not know, and only a list of the node's allocations, once it is registered again, says which
of its containers to stop.

Budget, with the defaults (interval 2 s, grace 1 s): a released allocation's containers are
stopped within ~interval + ListAllocations + grace + docker's kill ~= 3.6 s; an expired lease's
within TTL + etcd's expiry lag (<= ~0.5 s) + that ~= TTL + 4.1 s, inside the TTL + 5 s promise.
With allocations revisions (a coordinator that sends them) the next heartbeat, not the next
interval, tells the agent to ask: add up to one heartbeat interval to both.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gpulease.agent.containers import ContainerService, RuntimeHandle, gather_logged
from gpulease.agent.exits import ExitReports
from gpulease.agent.fencing import CoordinatorClient, Vouchers
from gpulease.agent.inventory import InventoryContext
from gpulease.agent.runtime import LABEL_NODE, ContainerInfo, ContainerRuntime, ImageInfo, VolumeInfo
from gpulease.common import eventloop
from gpulease.common.logs import log_fields
from gpulease.errors import GpuLeaseError, NodeNotFound, NotFound, Unavailable
from gpulease.v1.types_pb2 import Allocation

log = logging.getLogger(__name__)

T = TypeVar("T")

# The allocation list must not take the whole tick: a slow coordinator counts as unreachable.
MAX_LIST_TIMEOUT_S = 2.0
# A stop that docker does not finish in grace + this is abandoned for this tick (retried next tick).
STOP_SLACK_S = 30.0
# Heartbeats and GetInventory may collect often: look up container PIDs at most this often.
CONTEXT_CACHE_S = 1.0
# How often unused tenant volumes are looked for, besides after a container was removed.
VOLUME_SWEEP_S = 60.0
# The enforcer's own threads: runtime calls never queue behind the container service's.
ENFORCER_THREADS = 4
# How often unused images are looked for (the first time this long after the agent starts).
IMAGE_SWEEP_S = 600.0
DEFAULT_IMAGE_RETENTION_S = 86400.0
DEFAULT_IMAGE_DISK_LIMIT = 200 * 2**30


@dataclass(frozen=True)
class AllocationsHint:
    """What the last heartbeat answer said of the node's allocations."""

    revision: int
    asked_at: float  # time.monotonic() when the heartbeat was sent
    valid_until: float


@dataclass(frozen=True)
class Verdict:
    container: ContainerInfo
    reason: str


@dataclass
class TickReport:
    contacted: bool
    running: list[ContainerInfo] = field(default_factory=list)
    stopped: list[Verdict] = field(default_factory=list)
    kept: list[ContainerInfo] = field(default_factory=list)
    removed: list[ContainerInfo] = field(default_factory=list)
    removed_volumes: list[VolumeInfo] = field(default_factory=list)
    removed_images: list[ImageInfo] = field(default_factory=list)


def judge(
    node: str, running: Iterable[ContainerInfo], live: Iterable[Allocation]
) -> tuple[list[ContainerInfo], list[Verdict]]:
    """(containers to keep, containers to stop with the reason) against the node's live allocations."""
    by_id = {a.id: a for a in live}
    keep: list[ContainerInfo] = []
    stop: list[Verdict] = []
    for c in running:
        alloc = by_id.get(c.allocation_id)
        if alloc is None:
            stop.append(
                Verdict(c, f"allocation {c.allocation_id} is no longer live on node {node} (released or expired)")
            )
        elif alloc.revision != c.revision:
            stop.append(
                Verdict(
                    c,
                    f"allocation {c.allocation_id} is live at revision {alloc.revision}, but the container was "
                    f"started under revision {c.revision}",
                )
            )
        else:
            keep.append(c)
    return keep, stop


class Enforcer:
    def __init__(
        self,
        *,
        node: str,
        coordinator: CoordinatorClient,
        containers: ContainerService,
        vouchers: Vouchers,
        interval: float,
        grace: float,
        retention: float = 3600.0,
        runtime: RuntimeHandle | None = None,
        image_retention: float = DEFAULT_IMAGE_RETENTION_S,
        image_disk_limit: int = DEFAULT_IMAGE_DISK_LIMIT,
        image_sweep_interval: float = IMAGE_SWEEP_S,
    ) -> None:
        self._node = node
        self._image_retention = image_retention
        self._image_disk_limit = image_disk_limit
        self._image_sweep_interval = image_sweep_interval
        self._image_sweep_at = time.monotonic()
        self._started_unix_ms = int(time.time() * 1000)
        self._image_last_used: dict[str, int] = {}
        # Its own handle (its own Docker connection) where given; else the container service's.
        self._runtime = runtime if runtime is not None else containers.runtime
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        # The loop run() runs on: wake-ups from other threads are handed to it.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._node_unknown = False
        self._coordinator = coordinator
        self._containers = containers
        self._vouchers = vouchers
        self.vouchers = vouchers  # read by the agent's metrics
        self._interval = interval
        self._grace = grace
        self._retention = retention
        self._list_timeout = max(0.5, min(interval, MAX_LIST_TIMEOUT_S))
        # Managed containers that were running at the last check: for the inventory context.
        self._running_ids: tuple[str, ...] = ()
        # This node's containers by state, at the last listing (None before it): for metrics.
        self.container_states: Counter[str] | None = None
        self._outage_since: float | None = None
        self._listing_error: str | None = None
        # (when, container ids, PIDs) of the last PID lookup: reused for CONTEXT_CACHE_S.
        self._pid_cache: tuple[float, tuple[str, ...], frozenset[int]] = (-CONTEXT_CACHE_S, (), frozenset())
        self._hint: AllocationsHint | None = None
        # The allocations revision up to which every container of an ended allocation is stopped
        # (sent with heartbeats: the coordinator then frees those GPUs; 0 = not yet).
        self.enforced_revision = 0
        # Called when it moved past a stop or an allocation's end (the registrar's wake).
        self.on_enforced: Callable[[], None] | None = None
        self._seen_live: frozenset[str] = frozenset()
        # The last ListAllocations answer, and the allocations revision known when it was asked.
        self._listed: tuple[int, list[Allocation]] | None = None
        self._wake = asyncio.Event()
        # Set by recheck(): the next check asks ListAllocations even if a heartbeat vouches for the last answer.
        self._fresh_needed = False
        self.lists = 0  # ListAllocations calls made (answered or not)
        self._volume_sweep_at = -VOLUME_SWEEP_S
        # Exits seen in listings, for the registrar's heartbeats (agent/exits.py).
        self.exits = ExitReports()

    @property
    def node(self) -> str:
        return self._node

    @property
    def running_ids(self) -> tuple[str, ...]:
        return self._running_ids

    @property
    def grace(self) -> float:
        return self._grace

    def note_started(self, info: ContainerInfo) -> None:
        """A container was just started: count its PIDs as managed before the next check lists it,
        and check at once (see recheck)."""
        if info.state == "running" and info.id not in self._running_ids:
            self._running_ids = (*self._running_ids, info.id)
        self.recheck()

    def recheck(self) -> None:
        """Check now, on a fresh ListAllocations answer.

        Called on every start, and when a start finds its GPU used by another allocation's
        container. The start's own fencing covers the time up to just after the container ran;
        an allocation that ends right after that would otherwise keep its container until the next
        interval, or, if a heartbeat still vouches for the last answer, the next heartbeat. Both
        are seconds during which the GPU may already be someone else's.
        """
        self._fresh_needed = True
        self._wake_up()

    def _wake_up(self) -> None:
        """Set the wake event, from any thread."""
        eventloop.set_from_any_thread(self._wake, self._loop)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(ENFORCER_THREADS, thread_name_prefix="agent-enforcer")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def inventory_context(self) -> InventoryContext:
        """Managed PIDs and allocated GPUs, for the inventory source. Runs in the collecting thread:
        cached state plus one runtime call per running container, at most once per CONTEXT_CACHE_S."""
        ids = self._running_ids
        at, cached_ids, cached = self._pid_cache
        now = time.monotonic()
        if cached_ids == ids and now - at < CONTEXT_CACHE_S:
            pids = cached
        else:
            found: set[int] = set()
            runtime = self._runtime.current
            if runtime is not None:
                for container_id in ids:
                    try:
                        found |= runtime.pids(container_id)
                    except Exception as e:  # it may just have exited
                        log.debug("no PIDs for container %s: %s", container_id[:12], e)
            pids = frozenset(found)
            self._pid_cache = (now, ids, pids)
        return InventoryContext(managed_pids=pids, allocated_gpus=self._vouchers.allocated_gpu_indexes())

    async def run(self) -> None:
        """Check every interval (measured start to start) until cancelled."""
        self._loop = asyncio.get_running_loop()
        while True:
            started = time.monotonic()
            self._wake.clear()  # before the tick: a changed revision during it makes the next one immediate
            try:
                await self.tick()
            except Exception:
                log.exception("enforcement check failed; trying again in %gs", self._interval)
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancel that arrives as
            # the wake fires (a start wakes it, and shutdown may come right after), and the loop runs on.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, self._interval - (time.monotonic() - started))):
                    await self._wake.wait()

    def note_allocations_revision(self, revision: int, asked_at: float, valid_for: float) -> None:
        """A heartbeat's answer: the node's allocations revision (0: none), asked at ``asked_at``
        (time.monotonic()), counting for ``valid_for`` seconds. A new revision wakes the enforcer."""
        if revision <= 0:
            self._hint = None
            return
        self._hint = AllocationsHint(revision, asked_at, asked_at + valid_for)
        if self._listed is None or self._listed[0] != revision:
            self._wake_up()

    def _unchanged_allocations(self, running: list[ContainerInfo]) -> list[Allocation] | None:
        """The last answer, if a heartbeat since vouches that it still holds; None: ask again."""
        hint, listed = self._hint, self._listed
        if hint is None or listed is None or hint.revision != listed[0] or self._outage_since is not None:
            return None
        if self._fresh_needed:
            return None
        if self._vouchers.now() > hint.valid_until:
            return None
        ids = {a.id for a in listed[1]}
        if any(c.allocation_id not in ids for c in running):
            return None  # started since the last answer: judge it only on a fresh one
        self._vouchers.reaffirm(ids, hint.asked_at)
        return listed[1]

    async def running_containers(self) -> list[ContainerInfo] | None:
        """Managed running containers, or None when the runtime cannot be asked."""
        infos = await self._managed_containers()
        return None if infos is None else [i for i in infos if i.state == "running"]

    async def _managed_containers(self) -> list[ContainerInfo] | None:
        """Every managed container, running or not (None when the runtime cannot be asked); also
        notes which are running, for the inventory context."""
        try:
            runtime: ContainerRuntime = await self._runtime.get()
            # This node's only: another agent's containers on the same dockerd are not ours to judge.
            infos = [i for i in await self._call(runtime.list, "") if self._containers.mine(i)]
        except Exception as e:
            detail = e.message if isinstance(e, GpuLeaseError) else f"{type(e).__name__}: {e}"
            if detail != self._listing_error:
                log.warning("cannot list containers: %s", detail)
            self._listing_error = detail
            return None
        if self._listing_error is not None:
            log.info("listing containers works again")
            self._listing_error = None
        self._running_ids = tuple(i.id for i in infos if i.state == "running")
        self.exits.note(infos)
        self.container_states = Counter(str(i.state) for i in infos)
        return infos

    async def list_live(self) -> list[Allocation]:
        """The node's live allocations; also records them (and the time of asking) as vouchers."""
        hint = self._hint
        asked_at = self._vouchers.now()
        # Cleared before asking: a recheck() while the call is in flight asks again next time.
        self._fresh_needed = False
        self.lists += 1
        allocs = await self._coordinator.list_allocations(self._node, timeout=self._list_timeout)
        self._vouchers.replace(allocs, asked_at)
        # Filed under the revision known before asking: the answer is at least that new.
        self._listed = (hint.revision if hint is not None else 0, allocs)
        if self._outage_since is not None:
            log.info(
                "coordinator at %s answers again after %.1fs",
                self._coordinator.address,
                time.monotonic() - self._outage_since,
            )
            self._outage_since = None
        return allocs

    async def tick(self) -> TickReport:
        infos = await self._managed_containers() or []
        running = [i for i in infos if i.state == "running"]
        try:
            live = self._unchanged_allocations(running)
            if live is None:
                live = await self.list_live()
        except (NodeNotFound, NotFound) as e:
            # Never a reason to stop anything: see the module's docstring. Not an outage either, so
            # the TTL rule below does not apply; the registrar registers the node again.
            if not self._node_unknown:
                log.warning(
                    "the coordinator does not know node %s (%s); no container is stopped on that answer, "
                    "only on a list of the node's allocations once it is registered again",
                    self._node,
                    e.message,
                )
            self._node_unknown = True
            return TickReport(contacted=False, running=running, kept=running)
        except GpuLeaseError as e:
            if self._outage_since is None:
                self._outage_since = time.monotonic()
                log.warning(
                    "cannot list this node's allocations (%s); containers are stopped once the coordinator has "
                    "been unreachable for longer than their allocation's TTL",
                    e.message if isinstance(e, Unavailable) else f"{type(e).__name__}: {e.message}",
                )
            keep, stop = self._judge_unvouched(running)
            report = TickReport(contacted=False, running=running, kept=keep, stopped=stop)
        else:
            self._node_unknown = False
            keep, stop = judge(self._node, running, live)
            report = TickReport(contacted=True, running=running, kept=keep, stopped=stop)
            exited = [i for i in infos if i.state == "exited"]
            report.removed = await self._remove_expired(exited, {a.id for a in live})
            report.removed_volumes = await self._remove_unused_volumes(force=bool(report.removed))
        await self.stop_all(report.stopped)
        if report.contacted:
            await self._note_enforced(report)
        report.removed_images = await self.remove_unused_images()
        return report

    def _drains_waiting(self, report: TickReport) -> bool:
        """Whether the coordinator may be holding GPUs for this news: containers were stopped, or an
        allocation live at the last list has ended (its exited containers' GPUs drain too)."""
        live = frozenset(a.id for a in (self._listed[1] if self._listed is not None else ()))
        ended = self._seen_live - live
        self._seen_live = live
        return bool(report.stopped or ended)

    async def _note_enforced(self, report: TickReport) -> None:
        """After a tick judged on a list of the node's live allocations: every container of an
        allocation that ended by the list's revision is stopped (checked, not assumed: a stop can
        fail), so the coordinator may free their GPUs (coordinator/draining.py)."""
        revision = self._listed[0] if self._listed is not None else 0
        if revision <= self.enforced_revision:
            return
        if report.stopped:
            running = await self.running_containers()
            if running is None or {c.id for c in running} & {v.container.id for v in report.stopped}:
                return
        self.enforced_revision = revision
        if self.on_enforced is not None and self._drains_waiting(report):
            self.on_enforced()  # heartbeat now: the GPUs of what was stopped are free once it is told

    async def remove_unused_images(self, *, force: bool = False) -> list[ImageInfo]:
        """Remove unused images by age and by disk use (see the module's docstring): at most once
        every image sweep interval, or now with ``force``. Nothing is asked of the coordinator."""
        now = time.monotonic()
        if not force and now - self._image_sweep_at < self._image_sweep_interval:
            return []
        self._image_sweep_at = now
        if self._image_retention <= 0 and self._image_disk_limit <= 0:
            return []
        try:
            runtime: ContainerRuntime = await self._runtime.get()
            images = await self._call(runtime.list_images)
        except Exception as e:  # tried again at the next sweep
            log.warning("cannot list images: %s", e)
            return []
        wall_ms = int(time.time() * 1000)
        for image in images:
            if image.in_use:
                self._image_last_used[image.id] = wall_ms
        known = {i.id for i in images}
        self._image_last_used = {k: v for k, v in self._image_last_used.items() if k in known}

        def last_used(image: ImageInfo) -> int:
            return max(image.tagged_unix_ms, self._image_last_used.get(image.id, 0), self._started_unix_ms)

        unused = sorted((i for i in images if not i.in_use), key=last_used)  # least recently used first
        due: list[tuple[ImageInfo, str]] = []
        if self._image_retention > 0:
            cutoff = wall_ms - self._image_retention * 1000
            due = [(i, f"unused for over {self._image_retention:g}s") for i in unused if last_used(i) <= cutoff]
        if self._image_disk_limit > 0:
            total = sum(i.size for i in images) - sum(i.size for i, _ in due)
            for image in unused:
                if total <= self._image_disk_limit:
                    break
                if any(image is d for d, _ in due):
                    continue
                due.append((image, f"images take {total} bytes, over the limit of {self._image_disk_limit}"))
                total -= image.size
        removed: list[ImageInfo] = []
        for image, why in due:
            try:
                gone = await self._call(runtime.remove_image, image)
            except Exception as e:
                log.warning("cannot remove image %s: %s", ", ".join(image.tags) or image.id[:19], e)
                continue
            if gone:
                log.info("removed image %s (%d bytes): %s", ", ".join(image.tags) or image.id[:19], image.size, why)
                self._image_last_used.pop(image.id, None)
                removed.append(image)
        return removed

    async def _remove_expired(self, exited: list[ContainerInfo], live: set[str]) -> list[ContainerInfo]:
        """Remove exited containers of ended allocations that finished over `retention` ago."""
        cutoff_ms = time.time() * 1000 - self._retention * 1000
        due = [c for c in exited if c.allocation_id not in live and c.finished_unix_ms <= cutoff_ms]
        if not due:
            return []
        runtime: ContainerRuntime = await self._runtime.get()
        removed: list[ContainerInfo] = []
        for c in due:
            try:
                await self._call(runtime.remove, c.id)
            except Exception as e:  # tried again next tick
                log.warning("cannot remove exited container %s: %s", c.id[:12], e)
                continue
            log.info(
                "removed exited container %s of ended allocation %s",
                c.id[:12],
                c.allocation_id,
                extra=log_fields(allocation_id=c.allocation_id),
            )
            removed.append(c)
        return removed

    async def _remove_unused_volumes(self, *, force: bool) -> list[VolumeInfo]:
        """Remove this node's tenant volumes that no container refers to, made over `retention` ago."""
        now = time.monotonic()
        if not force and now - self._volume_sweep_at < VOLUME_SWEEP_S:
            return []
        self._volume_sweep_at = now
        try:
            runtime: ContainerRuntime = await self._runtime.get()
            unused = await self._call(runtime.list_volumes, True)
        except Exception as e:  # tried again at the next sweep
            log.warning("cannot list unused volumes: %s", e)
            return []
        cutoff_ms = time.time() * 1000 - self._retention * 1000
        removed: list[VolumeInfo] = []
        for v in unused:
            if v.labels.get(LABEL_NODE) != self._node or v.created_unix_ms > cutoff_ms:
                continue
            try:
                gone = await self._call(self._remove_volume_unless_starting, runtime, v.name)
            except Exception as e:
                log.warning("cannot remove unused volume %s: %s", v.name, e)
                continue
            if gone:
                log.info("removed volume %s: no container uses it", v.name)
                removed.append(v)
        return removed

    def _remove_volume_unless_starting(self, runtime: ContainerRuntime, name: str) -> bool:
        """In a worker thread, holding the service's volume lock (a start waits for it once after
        registering its volumes): False when a start in progress will mount the volume."""
        with self._containers.volume_lock:
            if name in self._containers.volumes_starting():
                return False  # a start is about to mount it
            return runtime.remove_volume(name)

    def _judge_unvouched(self, running: list[ContainerInfo]) -> tuple[list[ContainerInfo], list[Verdict]]:
        keep: list[ContainerInfo] = []
        stop: list[Verdict] = []
        for c in running:
            since, ttl = self._vouchers.unvouched_for(c.allocation_id)
            if since > ttl:
                stop.append(
                    Verdict(
                        c,
                        f"the coordinator has not confirmed allocation {c.allocation_id} for {since:.1f}s, longer "
                        f"than its TTL ({ttl:g}s): the agent can no longer vouch for it",
                    )
                )
            else:
                keep.append(c)
        return keep, stop

    async def stop_all(self, verdicts: list[Verdict]) -> None:
        if not verdicts:
            return
        runtime: ContainerRuntime = await self._runtime.get()
        calls = [asyncio.wait_for(self._stop(runtime, v), self._grace + STOP_SLACK_S) for v in verdicts]
        await gather_logged("stopping a container", list(calls))

    async def _stop(self, runtime: ContainerRuntime, verdict: Verdict) -> ContainerInfo:
        info = verdict.container
        if info.state == "running":
            self._containers.note_stop_reason(info.id, verdict.reason)
            log.warning(
                "stopping container %s (%s) of allocation %s, grace %gs: %s",
                info.id[:12],
                info.name,
                info.allocation_id,
                self._grace,
                verdict.reason,
            )
        return await self._call(runtime.stop, info.id, self._grace)
