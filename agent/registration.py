"""Registers the node with the coordinator and heartbeats it forever, riding out coordinator outages.

Each iteration is bounded (RPC deadline, then a sleep of at most one heartbeat interval); the
loop itself ends only when its task is cancelled at shutdown.

``AgentInventory`` is what the agent reports: the inventory source's view plus the
``reconciling`` flag (true until a restarted agent has reconciled its containers), with the
source told which PIDs and GPUs belong to gpulease (so it can tell foreign GPU processes apart).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable

import grpc

from gpulease.agent.channel import FAILOVER_CODES, NodeServiceSource, node_service_source
from gpulease.agent.exits import ExitReports
from gpulease.agent.inventory import InventoryContext, InventorySource
from gpulease.common import eventloop
from gpulease.v1.coordinator_pb2 import GpuTelemetry, HeartbeatRequest, RegisterNodeRequest
from gpulease.v1.types_pb2 import NodeInventory

log = logging.getLogger(__name__)

# Until the coordinator tells us its interval, back off up to this.
DEFAULT_INTERVAL_S = 5.0
MIN_BACKOFF_S = 0.2
# Heartbeats must not hang longer than this even if the coordinator's interval is long.
MAX_RPC_TIMEOUT_S = 10.0
# A heartbeat that starts this much after it was due is logged as late: the agent is overloaded.
LATE_HEARTBEAT_S = 1.0
# Each heartbeat comes up to this share of the interval early (see step()).
INTERVAL_JITTER = 0.1


class AgentInventory:
    """The inventory the agent reports (an InventorySource itself); keeps the latest one it collected.

    ``context`` is called on every collect, in the collecting thread: it must be cheap. The NVML
    source uses its managed PIDs and allocated GPUs to tell foreign GPU processes apart. Sources
    whose ``collect`` takes no argument (older ones, test doubles) are called without it.
    """

    def __init__(
        self,
        source: InventorySource,
        *,
        reconciling: Callable[[], bool] = lambda: False,
        context: Callable[[], InventoryContext | None] | None = None,
    ) -> None:
        self._source = source
        self._reconciling = reconciling
        self._context = context
        self._accepts_context = _takes_an_argument(source.collect)
        self._latest: NodeInventory | None = None
        # Called with each inventory collected, in the collecting thread (the idle-but-held clock).
        self.on_collect: Callable[[NodeInventory], None] | None = None
        self._lock = threading.Lock()

    @property
    def latest(self) -> NodeInventory | None:
        """The last inventory collected (by a heartbeat or GetInventory), or None before the first."""
        return self._latest

    def collect(self, ctx: InventoryContext | None = None) -> NodeInventory:
        """The source's inventory plus the reconciling flag; ``ctx`` None = the agent's own context."""
        if ctx is None and self._context is not None:
            ctx = self._context()
        # A source whose collect() takes no argument (a test double) is called without the context.
        inventory = self._source.collect(ctx) if self._accepts_context else self._source.collect()
        inventory.reconciling = self._reconciling()
        with self._lock:
            self._latest = inventory
        if self.on_collect is not None:
            self.on_collect(inventory)
        return inventory


_TELEMETRY = ("utilization_percent", "memory_used_bytes", "temperature_c", "power_draw_mw")


def telemetry_summary(inventory: NodeInventory) -> list[GpuTelemetry]:
    """The heartbeat's compact per-GPU telemetry, from the inventory just collected (NVML is not
    read again). GPUs that report none (simulated ones) are left out. The coordinator keeps it in
    memory only."""
    out = []
    for g in inventory.gpus:
        t = GpuTelemetry(index=g.index)
        for f in _TELEMETRY:
            if g.HasField(f):  # type: ignore[arg-type]
                setattr(t, f, getattr(g, f))
        if any(t.HasField(f) for f in _TELEMETRY):  # type: ignore[arg-type]
            out.append(t)
    return out


def _takes_an_argument(fn: Callable[..., object]) -> bool:
    with contextlib.suppress(TypeError, ValueError):
        params = inspect.signature(fn).parameters.values()
        return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params)
    return False


class _OutageLog:
    """Logs a failure once when it starts (or changes kind), and once when it ends."""

    def __init__(self) -> None:
        self._since: float | None = None
        self._kind: str | None = None
        self.failures = 0

    def failure(self, kind: str, detail: str) -> None:
        self.failures += 1
        if self._since is None:
            self._since = time.monotonic()
        if kind != self._kind:
            log.warning("coordinator call failed (%s: %s); retrying until it answers", kind, detail)
            self._kind = kind
        else:
            log.debug("coordinator call failed again (%s: %s)", kind, detail)

    def success(self) -> None:
        if self._since is not None:
            log.info(
                "coordinator answers again after %.1fs and %d failed attempt(s)",
                time.monotonic() - self._since,
                self.failures,
            )
        self._since = None
        self._kind = None
        self.failures = 0


class Registrar:
    def __init__(
        self,
        *,
        node: str,
        address: str,
        # A CoordinatorChannel (renewed when the TLS files change), or one plain channel.
        channel: grpc.aio.Channel | NodeServiceSource,
        source: InventorySource,
        # Called once, after the first registration or heartbeat that delivered an inventory
        # with reconciling=false: the node is then usable for placements.
        on_registered: Callable[[], Awaitable[None]] | None = None,
        # Called after every answered registration or heartbeat with (allocations revision,
        # time.monotonic() when it was asked, seconds it counts for): see Enforcer.
        on_allocations_revision: Callable[[int, float, float], None] | None = None,
        # Container exits to report with heartbeats (the enforcer's), dropped once one is answered.
        exits: ExitReports | None = None,
        # The enforcer's enforced revision (Enforcer.enforced_revision), sent with every heartbeat.
        enforced_revision: Callable[[], int] | None = None,
    ) -> None:
        self._enforced_revision = enforced_revision
        self._node = node
        self._address = address
        self._channel = node_service_source(channel)
        # How many coordinator addresses the channel fails over between (CoordinatorChannel.targets).
        self._addresses = max(1, len(getattr(self._channel, "targets", ())))
        self._source = source
        self._on_registered = on_registered
        self._on_allocations_revision = on_allocations_revision
        self._exits = exits
        self._interval = DEFAULT_INTERVAL_S
        self._lease_id: int | None = None
        # The inventory the coordinator last acknowledged; None forces the next heartbeat to carry it.
        self._last_sent: NodeInventory | None = None
        self._outage = _OutageLog()
        self._ready = False
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Heartbeats that started more than LATE_HEARTBEAT_S after they were due (see run()).
        self.late_heartbeats = 0
        self.heartbeats = 0

    @property
    def lease_id(self) -> int | None:
        return self._lease_id

    @property
    def interval(self) -> float:
        return self._interval

    async def run(self) -> None:
        """Register, then heartbeat every interval. Returns only by cancellation."""
        self._loop = asyncio.get_running_loop()
        due: float | None = None
        while True:
            self._wake.clear()  # before the step: a wake() during the step makes the next one immediate
            started = time.monotonic()
            if due is not None and self._lease_id is not None:
                self._note_lateness(started - due)
            delay = await self.step()
            due = time.monotonic() + delay
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancel that arrives as
            # the wake fires, and the loop would run on after shutdown (as the enforcer's did).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    def _note_lateness(self, late: float) -> None:
        self.heartbeats += 1
        if late > LATE_HEARTBEAT_S:
            self.late_heartbeats += 1
            log.warning(
                "the heartbeat of node %s is %.1fs late (every %gs): the agent's control loop is overloaded",
                self._node,
                late,
                self._interval,
            )

    def wake(self) -> None:
        """Heartbeat now rather than at the next interval (e.g. reconciliation just finished); from any thread."""
        eventloop.set_from_any_thread(self._wake, self._loop)

    async def step(self) -> float:
        """One register-or-heartbeat attempt; returns how long to wait before the next one."""
        try:
            inventory = await asyncio.to_thread(self._source.collect)
            if self._lease_id is None:
                await self._register(inventory)
            else:
                await self._heartbeat(inventory)
        except grpc.aio.AioRpcError as e:
            self._last_sent = None  # unknown whether it arrived: send it again next time
            if e.code() == grpc.StatusCode.NOT_FOUND and self._lease_id is not None:
                log.warning("coordinator no longer knows node %s (%s); registering again", self._node, e.details())
                self._lease_id = None
                return 0.0
            self._outage.failure(e.code().name, e.details() or "")
            if e.code() in FAILOVER_CODES and self._outage.failures % self._addresses:
                # The channel moved on to the next coordinator (agent/channel.py): ask it now rather than
                # after a backoff, so the node's lease is renewed well within its TTL. Once every address
                # has failed in turn, the backoff below applies.
                return 0.0
            return self._backoff()
        except Exception as e:
            # Never let one bad iteration (an inventory error, a malformed reply) end the agent.
            self._last_sent = None
            self._outage.failure(type(e).__name__, str(e))
            if self._outage.failures == 1:
                log.debug("first failure of this outage", exc_info=True)
            return self._backoff()
        self._outage.success()
        await self._maybe_ready()
        # A little early, at random: agents that registered together (a rack powering on) drift
        # apart instead of heartbeating in step, and a late heartbeat is rarer.
        return self._interval * random.uniform(1 - INTERVAL_JITTER, 1.0)

    async def _maybe_ready(self) -> None:
        # Ready once the coordinator holds an inventory that offers the node's GPUs (not reconciling).
        if self._ready or self._last_sent is None or self._last_sent.reconciling:
            return
        self._ready = True
        if self._on_registered is not None:
            await self._on_registered()

    def _rpc_timeout(self) -> float:
        return max(1.0, min(self._interval, MAX_RPC_TIMEOUT_S))

    def _backoff(self) -> float:
        # Exponential with jitter so that many agents don't retry in lockstep; capped at the interval.
        # Counted in rounds over every coordinator address: each round's failures come at once.
        rounds = self._outage.failures // self._addresses
        ceiling = min(self._interval, MIN_BACKOFF_S * 2 ** min(rounds, 16))
        return random.uniform(ceiling / 2, ceiling)

    def _note_allocations(self, revision: int, asked_at: float) -> None:
        # Counts until one heartbeat has been missed: then the enforcer asks for itself.
        if self._on_allocations_revision is not None:
            self._on_allocations_revision(revision, asked_at, 2 * self._interval)

    def _adopt_interval(self, seconds: int) -> None:
        if seconds > 0:
            self._interval = float(seconds)

    async def _register(self, inventory: NodeInventory) -> None:
        request = RegisterNodeRequest(node=self._node, address=self._address, inventory=inventory)
        asked_at = time.monotonic()
        response = await self._channel.node_service().RegisterNode(request, timeout=self._rpc_timeout())
        self._lease_id = response.lease_id
        self._adopt_interval(response.heartbeat_interval_seconds)
        self._note_allocations(response.allocations_revision, asked_at)
        self._last_sent = inventory
        log.info(
            "registered node %s (address %s, %d GPU(s)) with lease %d; heartbeat every %.0fs",
            self._node,
            self._address,
            len(inventory.gpus),
            response.lease_id,
            self._interval,
        )

    async def _heartbeat(self, inventory: NodeInventory) -> None:
        assert self._lease_id is not None
        changed = inventory != self._last_sent
        request = HeartbeatRequest(node=self._node, lease_id=self._lease_id, address=self._address,
                                   telemetry=telemetry_summary(inventory))  # fmt: skip
        if changed:
            request.inventory.CopyFrom(inventory)
        exits = self._exits.batch() if self._exits is not None else []
        request.exits.extend(exits)
        if self._enforced_revision is not None:
            request.enforced_revision = self._enforced_revision()
        asked_at = time.monotonic()
        response = await self._channel.node_service().Heartbeat(request, timeout=self._rpc_timeout())
        if exits and self._exits is not None:
            self._exits.sent(exits)
            log.info("reported %d container exit(s) of node %s", len(exits), self._node)
        if changed:
            self._last_sent = inventory
            log.info("sent changed inventory of node %s (%d GPU(s))", self._node, len(inventory.gpus))
        self._adopt_interval(response.heartbeat_interval_seconds)
        self._note_allocations(response.allocations_revision, asked_at)
        if response.lease_id and response.lease_id != self._lease_id:
            # Another replica took the node's liveness over (a failover), or the node was down
            # and was registered again.
            log.info(
                "node %s is now kept alive under lease %d (was %d); sending its inventory again",
                self._node,
                response.lease_id,
                self._lease_id,
            )
            self._lease_id = response.lease_id
            # A re-registration may have rebuilt the node record: resend the inventory to be sure.
            self._last_sent = None
