"""Node liveness: who says a node is up, and what a heartbeat costs (issue 18).

A node is up while its ``alive/<node>`` key exists. Two ways to keep that key, chosen by the
coordinator's ``node_liveness`` setting; docs/performance.md measures both in one bench run:

- ``session`` (the default): each coordinator replica holds one etcd lease, its *session*, renewed
  once a second. The alive keys of the nodes that heartbeat to a replica hang on its session, and a
  heartbeat only notes the time in memory: no etcd call, unless the node has just come to this
  replica (its key is moved onto this session, one put) or came back after being down. The replica
  deletes the key of a node it has not heard from for the node TTL (the *sweep*), compared on its
  own session so that a node that moved to another replica is never touched. If a replica dies,
  its agents move to another replica (UNAVAILABLE, or their heartbeat's deadline) well before its
  session lapses; keys still on it then are of nodes nobody heard from. etcd's liveness writes
  are one renewal per replica per second plus one put per node that moves, not one per heartbeat.
- ``node-lease``: each node has its own lease, renewed by each heartbeat (one etcd call each).
  The design before issue 18, kept to be measured against.

Heartbeats are rate-limited across the cluster, as Nomad does (``max_heartbeats_per_second``):
the interval agents are told grows with the number of nodes once the configured interval would
exceed the cap, and the node TTL keeps its margin over the interval (``timing``). With a session,
the TTL lives in memory, so it follows the cluster's size with no etcd write.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gpulease.common.logs import log_fields
from gpulease.coordinator.keys import Keys
from gpulease.coordinator.store import Cmp, Delete, LeaseNotFound, Store
from gpulease.coordinator.view import ClusterView
from gpulease.errors import GpuLeaseError, Unavailable

log = logging.getLogger(__name__)

MODES = ("session", "node-lease")

# The session is renewed (and the sweep runs) this often. A renewal is not a raft write in etcd.
TICK_S = 1.0
# A tick that comes this much later than due means this replica itself was stopped (SIGSTOP, a
# stalled loop): nobody could reach it, so the silence it saw is not held against its nodes.
STALL_S = 3 * TICK_S


@dataclass(frozen=True)
class LivenessPolicy:
    # The interval and TTL of a small cluster; both grow with the cluster past the heartbeat cap.
    heartbeat_interval: int = 5
    node_ttl: int = 15
    # The cluster-wide cap on heartbeats per second (Nomad's max_heartbeats_per_second); 0: none.
    max_heartbeats_per_second: int = 250
    mode: str = "session"  # one of MODES


@dataclass(frozen=True)
class Timing:
    heartbeat_interval: int
    node_ttl: int

    @property
    def detection_s(self) -> float:
        """The longest a dead node stays up (session mode): its TTL plus one sweep."""
        return self.node_ttl + TICK_S


def timing(nodes: int, policy: LivenessPolicy) -> Timing:
    """The interval agents are told and the silence after which their node is down, for a
    cluster of ``nodes``. Pure: every replica computes the same from the same node count.

    Past ``max_heartbeats_per_second x heartbeat_interval`` nodes the interval is what keeps the
    cluster at the cap; the TTL keeps the configured margin over it (by default 10 s: one missed
    heartbeat deadline and a move to another replica)."""
    interval = policy.heartbeat_interval
    if policy.max_heartbeats_per_second > 0:
        interval = max(interval, math.ceil(nodes / policy.max_heartbeats_per_second))
    return Timing(interval, interval + (policy.node_ttl - policy.heartbeat_interval))


def session_ttl(t: Timing) -> int:
    """The session lease's TTL: long enough that a replica that hangs (SIGSTOP) loses its nodes
    to another replica before its session lapses (an agent's next heartbeat comes within one
    interval and gives up on a silent replica after at most 10 s), and twice the node TTL."""
    return max(2 * t.node_ttl, t.node_ttl + 15)


@dataclass(frozen=True)
class Beat:
    lease_id: int  # the lease the node's alive key hangs on now
    revision: int  # an etcd revision the answer may vouch for (see NodeService._allocations_revision)


class Liveness(Protocol):
    def timing(self) -> Timing: ...

    async def attach(self, name: str) -> Beat:
        """The node is up from now: its alive key is (re)written."""

    async def beat(self, name: str, lease_id: int) -> Beat | None:
        """A heartbeat; None when the node is down (its key is gone): register it again."""

    async def run(self) -> None: ...


class NodeLeases:
    """One etcd lease per node, renewed by every heartbeat (the design before issue 18)."""

    def __init__(self, store: Store, view: ClusterView, keys: Keys, policy: LivenessPolicy) -> None:
        self._store, self._view, self._keys = store, view, keys
        # A node's lease is granted with its TTL; the interval stays fixed (no cap) so it never outgrows it.
        self._timing = Timing(policy.heartbeat_interval, policy.node_ttl)

    def timing(self) -> Timing:
        return self._timing

    async def attach(self, name: str) -> Beat:
        lease = await self._store.grant(self._timing.node_ttl)
        return Beat(lease, await self._store.put(self._keys.alive(name), b"", lease))

    async def beat(self, name: str, lease_id: int) -> Beat | None:
        # A lease that is not this node's own is never renewed (an agent could otherwise keep
        # another node up): the node is registered again, as with a lapsed lease.
        if lease_id <= 0 or not await self._owns(name, lease_id):
            return None
        renewal = await self._store.keepalive(lease_id)
        return Beat(lease_id, renewal.revision) if renewal.ttl > 0 else None

    async def _owns(self, name: str, lease_id: int) -> bool:
        # From the view when it agrees (no etcd call per heartbeat); else etcd decides (the view
        # may not have seen a registration this moment old).
        if self._view.alive_lease(name) == lease_id:
            return True
        kv = await self._store.get(self._keys.alive(name))
        return kv is not None and kv.lease == lease_id

    async def run(self) -> None:
        await asyncio.Event().wait()  # etcd expires the leases itself


class Session:
    """This replica's session lease and the nodes that heartbeat to it (see the module's docstring)."""

    def __init__(
        self, store: Store, view: ClusterView, keys: Keys, policy: LivenessPolicy,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self._store, self._view, self._keys, self._policy = store, view, keys, policy
        self._clock = clock
        self._nodes = 0  # the node count the interval was last computed from (see timing())
        self._lease = 0
        self._lease_ttl = 0
        # Earlier sessions of this replica, renewed until no node can still be on them: lease -> until.
        self._retiring: dict[int, float] = {}
        self._renewed_at = clock()  # the last renewal etcd answered (or the session's grant)
        self._revision = 0  # etcd's revision at the last renewal or write
        self._grant_lock = asyncio.Lock()
        # node -> (when this replica last heard from it (monotonic), the node TTL it was told then);
        # only nodes on this replica's sessions.
        self._seen: dict[str, tuple[float, int]] = {}

    def timing(self) -> Timing:
        # While the view reloads (compaction, an etcd outage) its count is not the cluster's: keep the last one.
        if self._view.synced.is_set():
            self._nodes = self._view.node_count()
        return timing(self._nodes, self._policy)

    def _mine(self, lease: int) -> bool:
        return lease != 0 and (lease == self._lease or lease in self._retiring)

    def _heard(self, name: str) -> None:
        self._seen[name] = (self._clock(), self.timing().node_ttl)

    async def attach(self, name: str) -> Beat:
        self._heard(name)
        lease = await self._session()
        rev = await self._put(name, lease)
        return Beat(lease, rev)

    async def beat(self, name: str, lease_id: int) -> Beat | None:
        self._heard(name)  # heard, whatever follows: the sweep must not blame the node
        self._check_session()
        lease = self._view.alive_lease(name)
        if lease and lease == self._lease:
            return Beat(lease, self._revision)
        # The view may not have seen this node's key move yet: etcd decides.
        kv = await self._store.get(self._keys.alive(name))
        if kv is None:
            return None  # down: registered again by the caller (NodeService), with its inventory
        if kv.lease and kv.lease == self._lease:
            return Beat(kv.lease, self._revision)
        # The node heartbeated another replica until now (or is on an earlier, shorter session of
        # this one): its key moves onto this replica's session.
        lease = await self._session()
        rev = await self._put(name, lease)
        if not self._mine(kv.lease):
            log.info("node %s now heartbeats to this coordinator", name, extra=log_fields(node=name))
        return Beat(lease, rev)

    async def _put(self, name: str, lease: int) -> int:
        try:
            rev = await self._store.put(self._keys.alive(name), b"", lease)
        except LeaseNotFound:
            lease = await self._session(lost=lease, why=f"session {lease:x} lapsed")
            rev = await self._store.put(self._keys.alive(name), b"", lease)
        self._revision = max(self._revision, rev)
        return rev

    def _check_session(self) -> None:
        """A replica that has not renewed its session for half its TTL may lose it, and every node
        on it with it: it sends agents to another replica rather than vouch for them."""
        if self._lease and self._clock() - self._renewed_at > self._lease_ttl / 2:
            raise Unavailable(
                f"this coordinator has not renewed its etcd session for {self._clock() - self._renewed_at:.0f}s; "
                "heartbeat to another replica"
            )

    async def _session(self, lost: int = 0, why: str = "") -> int:
        """The current session lease, granted on first use, or again when ``lost`` was it (``why``)."""
        async with self._grant_lock:
            if self._lease and self._lease != lost:
                return self._lease
            ttl = session_ttl(self.timing())
            self._lease = await self._store.grant(ttl)
            self._lease_ttl = ttl
            self._renewed_at = self._clock()
            log.info("etcd session %x (TTL %ds) carries the nodes that heartbeat to this coordinator%s",
                     self._lease, ttl, f" ({why})" if why else "")  # fmt: skip
            return self._lease

    async def run(self) -> None:
        """Renew the session, then sweep, once a tick; forever (cancelled at shutdown)."""
        while True:
            asleep = self._clock()
            await asyncio.sleep(TICK_S)
            # Only the sleep is timed: a slow etcd call is etcd's delay, not this replica being stopped.
            if (overslept := self._clock() - asleep - TICK_S) > STALL_S - TICK_S:
                self._forgive(overslept)
            try:
                await self._renew()
                await self._sweep()
            except GpuLeaseError as exc:  # etcd unreachable: the next tick tries again
                log.debug("liveness tick: %s", exc)
            except Exception:  # never let one bad tick end node liveness on this replica
                log.exception("liveness tick failed; trying again in %gs", TICK_S)

    def _forgive(self, gap: float) -> None:
        log.warning("this coordinator was stalled for %.1fs; its nodes' silence meanwhile is not counted", gap)
        for name, (last, ttl) in self._seen.items():
            self._seen[name] = (last + gap, ttl)

    async def _renew(self) -> None:
        if not self._lease:
            return
        now = self._clock()
        for lease in [self._lease, *self._retiring]:
            if lease != self._lease and now > self._retiring[lease]:
                del self._retiring[lease]  # every node on it has heartbeated since, onto the current one
                continue
            renewal = await self._store.keepalive(lease)
            self._revision = max(self._revision, renewal.revision)
            if lease != self._lease:
                continue
            if renewal.ttl <= 0:
                log.warning("etcd session %x of this coordinator lapsed; its nodes come back as they heartbeat", lease)
                await self._session(lost=lease, why=f"session {lease:x} lapsed")
            else:
                self._renewed_at = now
        # The cluster outgrew the session's TTL (its node TTL grew past the heartbeat cap): a longer
        # session for the nodes from their next heartbeat; the old one is renewed until they all moved.
        wanted = session_ttl(self.timing())
        if wanted > self._lease_ttl:
            old = self._lease
            self._retiring[old] = now + 2 * self.timing().node_ttl
            await self._session(lost=old, why=f"the cluster's node TTL outgrew session {old:x}")

    async def _sweep(self) -> None:
        """Nodes silent for their TTL go down: their key is deleted if it still hangs on this
        replica's session (a node that moved to another replica is not this one's to judge).

        A node's TTL is the longer of the one it was told with its last heartbeat and today's: a
        cluster that shrank (nodes deleted) shortens the interval, but a node learns that only
        from its next answer, an old interval away."""
        now_ttl = self.timing().node_ttl
        now = self._clock()
        for name, (last, told) in list(self._seen.items()):
            ttl = max(told, now_ttl)
            if now - last <= ttl:
                continue
            lease = self._view.alive_lease(name)
            del self._seen[name]
            if not self._mine(lease):
                continue  # moved away, or already down
            out = await self._store.txn([Cmp(self._keys.alive(name), "lease", "==", lease)],
                                        [Delete(self._keys.alive(name))])  # fmt: skip
            if out.succeeded:
                log.warning("node %s: no heartbeat for %.0fs (TTL %ds); marked down", name, now - last, ttl,
                            extra=log_fields(node=name))  # fmt: skip


def make(store: Store, view: ClusterView, keys: Keys, policy: LivenessPolicy) -> Liveness:
    if policy.mode == "node-lease":
        return NodeLeases(store, view, keys, policy)
    return Session(store, view, keys, policy)
