"""In-memory view of cluster state, fed by one etcd watch on the whole prefix.

Placement reads this view; it may be stale by a few milliseconds, which is fine because the
allocation transaction re-checks everything it relied on. The view only has to converge.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType

from gpulease.coordinator import draining, tombstones
from gpulease.coordinator.domain import NO_RESERVATIONS, Allocation, NodeInfo, NodeView, ReservationBook, Snapshot
from gpulease.coordinator.events import EventLog
from gpulease.coordinator.keys import Keys, range_end
from gpulease.coordinator.placement_index import PlacementIndex
from gpulease.coordinator.quota import QuotaBook, Usage
from gpulease.coordinator.records import (
    decode_alloc,
    decode_node,
    decode_quota,
    decode_res,
    decode_reservation,
    decode_usage,
)
from gpulease.coordinator.store import KV, Event, Store, StoreUnavailable

log = logging.getLogger(__name__)

# Key kinds the view keeps as raw records by the rest of their key, for services that read them
# from memory: bearer tokens (checked on every call, so never an etcd read) and where an
# allocation's containers are and whose they are (they outlive the allocation).
# Pending requests (queue/<id>) too: every replica plans admissions from them.
# Quotas and priority classes too: placement reads them on every request.
# Preemption notices and the preemptors' claims: the queue plans around them.
# Calendar reservations: placement applies them per tenant (coordinator/reservations.py).
TABLES = ("tokens", "containers", "queue", "quotas", "priorities", "preempting", "claims", "reservations")
# Audit entries whose key ends so (audit/<ms>-<id>.<action>) ended an allocation in the same
# transaction: its deletion that follows is not an expiry.
_ENDING_ACTIONS = ("release", "force-release", "unclaimed")
# How many recent releases Release can answer "released" for again (allocation id -> request id).
RECENT_RELEASES = 20_000

# caught_up(): how long to wait for the watch before writing a marker, and how far apart markers are.
MARKER_AFTER_S = 0.05
MARKER_SPACING_S = 0.05


def held_indexes(info: NodeInfo, held: Mapping[str, str]) -> frozenset[int]:
    """The record's indexes of the GPUs that live allocations hold, matched by UUID: after a
    reboot re-numbers the GPUs, a held GPU stays held under its new index, and the GPU that took
    its old index is free. A held UUID the record no longer lists is simply not offered.

    Keys written before GPUs were claimed by UUID name a zero-padded index ("0003"); they are
    honoured as indexes so that allocations live across an upgrade stay held."""
    if not held:
        return frozenset()
    out = {g.index for g in info.gpus if g.uuid and g.uuid in held}
    out.update(int(k) for k in held if len(k) == 4 and k.isdigit())
    return frozenset(out)


class ClusterView:
    def __init__(self, store: Store, keys: Keys) -> None:
        self._store = store
        self._keys = keys
        self.revision = 0
        self.synced = asyncio.Event()
        self.last_error = ""
        # How many times the view was loaded whole (the first load, then each resync): for metrics.
        self.loads = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._marker: asyncio.Future[int] | None = None
        self._marker_at = -MARKER_SPACING_S
        # Per table, bumped on every change to it (and on reload): readers rebuild what they derive
        # from one table when its version moves, not when another table changes.
        self._table_versions = dict.fromkeys(TABLES, 0)
        # Called with an allocation whose keys went without a release (its lease expired).
        self.on_expired: Callable[[Allocation], None] | None = None
        self._released: set[str] = set()
        # Allocation id -> request id, from the tombstones releases leave in reqs/ keys
        # (coordinator/tombstones.py), seen on the watch or in a load: Release finds a retried
        # call's tombstone through it, so that an attempt whose answer was lost is told "released",
        # not "not live", even by a replica that reloaded or started after the release. Bounded
        # (oldest out first); a stale entry costs one read that finds nothing.
        self._released_requests: OrderedDict[str, str] = OrderedDict()
        # Typed cluster events derived from the same watch (coordinator/events.py).
        self.events = EventLog(keys, decoded_node=self._decoded_node)
        # Moves on every change to a node record (and on reload): smallest_share_per_gpu's cache key.
        self._records_version = 0
        self._reset()

    def _reset(self) -> None:
        self._records: dict[str, tuple[NodeInfo, int]] = {}
        self._records_version += 1  # a reload counts as a change of every record
        self._share: tuple[int, float, float] | None = None
        self._alive: set[str] = set()
        self._alive_leases: dict[str, int] = {}
        self._cordoned: set[str] = set()
        # Per node: GPU key (UUID) -> allocation id. Mapped to the record's indexes in _rebuild.
        self._held: dict[str, dict[str, str]] = {}
        self._res: dict[str, dict[str, tuple[int, int]]] = {}
        # Per node: allocation id -> (GPU UUIDs, mod revision) of its drain key (coordinator/draining.py),
        # and for allocations with one, the revision at which they ended.
        self._drains: dict[str, dict[str, tuple[frozenset[str], int]]] = {}
        # Allocation id -> the nodes it has drain keys on: an allocation's end is looked up here on
        # every deletion, which must not walk every node.
        self._drain_nodes: dict[str, set[str]] = {}
        self._ended_at: dict[str, int] = {}
        # Raw record and create revision: decoded only when asked for (most never are).
        self._allocs: dict[str, tuple[bytes, int]] = {}
        self._decoded_allocs: dict[str, tuple[tuple[bytes, int], Allocation]] = {}
        # Per node: sum of reserved (cpus, memory), kept incrementally.
        self._used: dict[str, tuple[int, int]] = {}
        # Per node: revision of the last event on its gpus/ or res/ keys, i.e. of the last change
        # to the node's allocation set; the load revision stands for everything before it.
        self._changed: dict[str, int] = {}
        self._loaded_at = 0
        # Rebuilt per touched node. A snapshot shares this dict (O(1) however large the cluster)
        # and the next change copies it first, so every snapshot stays as it was taken.
        self._views: dict[str, NodeView] = {}
        self._views_shared = False
        self.index = PlacementIndex()
        self._tables: dict[str, dict[str, bytes]] = {t: {} for t in TABLES}
        self._table_revs: dict[str, dict[str, int]] = {t: {} for t in TABLES}
        # Per tenant: allocation id -> what it counts against the quota, and the sum.
        self._usage_by_alloc: dict[str, dict[str, Usage]] = {}
        self._usage: dict[str, Usage] = {}
        self._usage_version = 0
        self._book: tuple[tuple[int, int], QuotaBook] | None = None
        self._reservation_book: tuple[tuple[int, tuple[int, ...], int], ReservationBook] | None = None
        # The fair-share ledger (raw, mod revision); see coordinator/fair_share.py.
        self.fairshare: tuple[bytes, int] | None = None
        for t in TABLES:
            self._table_versions[t] += 1

    # --- queries (synchronous: consistent until the caller's next await) ---------------

    def ensure_synced(self) -> None:
        """Refuse to answer from an empty or unsynced view: that would look like 'no nodes'."""
        if self.synced.is_set():
            return
        if self.last_error:  # already names the URL and what to check
            raise StoreUnavailable(self.last_error)
        raise StoreUnavailable(
            f"the coordinator has no answer from etcd at {','.join(self._store.urls)} yet; retry in a moment, "
            "and if this persists check the coordinator's --etcd URL and that etcd is running"
        )

    def snapshot(self) -> Snapshot:
        """The cluster at the view's revision, immutable: a commit round awaits between placing and
        committing, and reads the node records it placed on (index -> UUID) afterwards. The placement
        index is not part of it: use it only in the same synchronous step as this call."""
        self._views_shared = True
        return Snapshot(self.revision, MappingProxyType(self._views), self.quota_book(), self.reservation_book())

    def quota_book(self) -> QuotaBook:
        """Quotas and usage per tenant, rebuilt only when either changed."""
        version = (self._table_versions["quotas"], self._usage_version)
        if self._book is None or self._book[0] != version:
            quotas = {}
            for tenant, raw in self._tables["quotas"].items():
                try:
                    quotas[tenant] = (decode_quota(raw), self._table_revs["quotas"][tenant])
                except (ValueError, KeyError, TypeError):
                    log.warning("view: skipping the unreadable quota record of tenant %r", tenant)
            self._book = (version, QuotaBook(MappingProxyType(quotas), MappingProxyType(dict(self._usage))))
        return self._book[1]

    def reservation_book(self) -> ReservationBook:
        """The calendar reservations, and what each tenant holds on the nodes they name; rebuilt only
        when the reservations or the allocations on those nodes changed."""
        table = self._tables["reservations"]
        if not table:
            return NO_RESERVATIONS
        version = self._table_versions["reservations"]
        if self._reservation_book is not None and self._reservation_book[0][0] == version:
            reservations = self._reservation_book[1].reservations
        else:
            found = []
            for name, raw in sorted(table.items()):
                try:
                    found.append(decode_reservation(name, raw))
                except (ValueError, KeyError, TypeError):
                    log.warning("view: skipping the unreadable reservation record %r", name)
            reservations = tuple(found)
        nodes = sorted({n for r in reservations for n in r.gpus})
        key = (version, tuple(self.allocations_revision(n) for n in nodes), self._loaded_at)
        if self._reservation_book is None or self._reservation_book[0] != key:
            held: dict[str, dict[str, int]] = {}
            tenants: dict[str, str] = {}
            for n in nodes:
                on_node: dict[str, int] = {}
                for alloc_id in self._held.get(n, {}).values():
                    if alloc_id not in tenants:
                        record = self._allocs.get(alloc_id)
                        tenants[alloc_id] = decode_alloc(*record).tenant if record else ""
                    on_node[tenants[alloc_id]] = on_node.get(tenants[alloc_id], 0) + 1
                held[n] = on_node
            self._reservation_book = (key, ReservationBook(reservations, MappingProxyType(held)))
        return self._reservation_book[1]

    def node(self, name: str) -> NodeView | None:
        return self._views.get(name)

    def nodes(self) -> list[NodeView]:
        return [self._views[n] for n in sorted(self._views)]

    def node_count(self) -> int:
        """Registered nodes, up or not (what the heartbeat cap divides: coordinator/liveness.py)."""
        return len(self._records)

    def smallest_share_per_gpu(self) -> tuple[float, float]:
        """The smallest CPUs and memory per GPU of any node with GPUs (inf when none): a per-GPU
        default at or under both fits every node's share, so requests need no per-node look."""
        if self._share is None or self._share[0] != self._records_version:
            cpus = memory = float("inf")
            for info, _ in self._records.values():
                if info.gpus:
                    cpus = min(cpus, info.cpus_total / len(info.gpus))
                    memory = min(memory, info.memory_total_bytes / len(info.gpus))
            self._share = (self._records_version, cpus, memory)
        return self._share[1], self._share[2]

    def allocations_revision(self, node: str) -> int:
        """A revision that changes whenever the node's allocation set does (as this view has seen
        it): the last create, release or expiry there, or the load revision if none since.

        Agents compare it for equality only, and ask ListAllocations when it differs, so a fresh
        replica (whose floor is its own load revision) makes each agent ask once, never miss."""
        return self._changed.get(node, self._loaded_at)

    def alive_lease(self, name: str) -> int:
        """The lease of the node's alive key as last seen (0: none seen)."""
        return self._alive_leases.get(name, 0)

    def table_version(self, kind: str) -> int:
        """Moves whenever table ``kind`` changes (see TABLES)."""
        return self._table_versions[kind]

    def table(self, kind: str) -> Mapping[str, bytes]:
        """Raw records of one of TABLES, by the rest of their key ('tokens' -> {name: record})."""
        return MappingProxyType(self._tables[kind])

    def allocation(self, alloc_id: str) -> Allocation | None:
        raw = self._allocs.get(alloc_id)
        return self._decoded(alloc_id, raw) if raw else None

    def _decoded(self, alloc_id: str, raw: tuple[bytes, int]) -> Allocation:
        """The record decoded once per version: the queue's passes read the holders of reserved nodes
        and the preemption plan every allocation, several times a second under load."""
        known = self._decoded_allocs.get(alloc_id)
        if known is not None and known[0] is raw:
            return known[1]
        a = decode_alloc(*raw)
        self._decoded_allocs[alloc_id] = (raw, a)
        return a

    def allocations_on(self, node: str) -> list[Allocation]:
        """The live allocations holding GPUs on ``node`` (decoded on demand), each as seen on that
        node (a gang's member there)."""
        ids = set(self._held.get(node, {}).values())
        out = []
        for i in sorted(ids):
            if i in self._allocs:
                a = self._decoded(i, self._allocs[i])
                out.append(a.on(node) if node in a.nodes else a)
        return out

    def allocations(self) -> list[Allocation]:
        return sorted((self._decoded(i, raw) for i, raw in self._allocs.items()), key=lambda a: (a.revision, a.id))

    async def wait_for_revision(self, revision: int, timeout: float) -> bool:
        """Wait until events up to `revision` are applied. False on timeout (never raises)."""
        if self.revision >= revision:
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((revision, fut))
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._waiters = [(r, f) for r, f in self._waiters if f is not fut]

    async def caught_up(self, revision: int, timeout: float) -> bool:
        """Wait until the view holds every event under the prefix up to etcd `revision`. False
        on timeout or when etcd cannot be written (never raises).

        Writes outside the prefix (other prefixes on a shared etcd) move etcd's revision with no
        event here, so waiting alone may never end. A put under the prefix does bring an event,
        and one watch delivers events in revision order: once the view has the marker's event,
        it has everything before it. Markers are shared by concurrent callers and spaced."""
        if self.revision >= revision or await self.wait_for_revision(revision, min(timeout, MARKER_AFTER_S)):
            return True
        try:
            marker = await self._marker_at_least(revision)
        except Exception as exc:  # StoreUnavailable and the like: the caller answers without it
            log.debug("view: cannot write the catch-up marker: %s", exc)
            return False
        return await self.wait_for_revision(marker, timeout)

    async def _marker_at_least(self, revision: int) -> int:
        for _ in range(3):  # an in-flight marker may predate `revision`; the next one cannot
            task = self._marker
            if task is None or (task.done() and (task.exception() is not None or task.result() < revision)):
                task = self._marker = asyncio.ensure_future(self._put_marker())
            written = await asyncio.shield(task)
            if written >= revision:
                return written
        raise TimeoutError(f"no catch-up marker at or past revision {revision}")

    async def _put_marker(self) -> int:
        # Spaced, so that a busy foreign writer costs etcd at most 1/MARKER_SPACING_S puts a second.
        await asyncio.sleep(max(0.0, self._marker_at + MARKER_SPACING_S - time.monotonic()))
        self._marker_at = time.monotonic()
        return await self._store.put(self._keys.marker(), b"")

    # --- feeding -----------------------------------------------------------------------

    async def run(self) -> None:
        """Load, then follow the watch; reload on compaction or after etcd outages. Runs until cancelled."""
        prefix, end = self._keys.prefix, range_end(self._keys.prefix)
        backoff = 0.2
        while True:
            try:
                rev, kvs = await self._store.get_prefix(prefix, end)
                self._load(rev, kvs)
                backoff = 0.2
                async for batch in self._store.watch(prefix, end, rev + 1):
                    if batch.resync:
                        log.warning("watch lost its place at revision %d; reloading the view", batch.revision)
                        break
                    self._apply(batch.events)
            except StoreUnavailable as exc:
                self.synced.clear()
                self.last_error = str(exc)
                log.warning("view: %s; retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:
                self.synced.clear()
                log.exception("view: watch failed; reloading in %.1fs", backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _load(self, revision: int, kvs: Iterable[KV]) -> None:
        self._reset()
        kvs = list(kvs)
        for kv in kvs:
            self._apply_one(Event("put", kv))
        self.events.load(revision, kvs)  # after: it reuses the node records decoded above
        for alloc_id in self._drain_nodes:
            if alloc_id not in self._allocs:  # ended before the load, when exactly is unknown
                self._ended_at.setdefault(alloc_id, revision)
        for name in list(self._records):
            self._rebuild(name)
        self._changed.clear()  # the load revision covers everything loaded
        self._loaded_at = revision
        self._advance(revision)
        self.loads += 1
        self.synced.set()
        log.info("view synced at revision %d: %d nodes, %d allocations", revision, len(self._views),
                 len(self._allocs))  # fmt: skip

    def _apply(self, events: Sequence[Event]) -> None:
        """Apply one watch batch. The view's revision moves to the last event applied, never to a
        response header's revision: a header names etcd's current revision, which may be ahead of
        the events delivered so far (issue 11, defect 1). Snapshots, the `res/` compare and
        wait_for_revision all trust this number."""
        if not events:
            return
        if events[0].kv.mod_revision <= self.revision:
            # A replay or a gap-filling resend would mean the view's revision was not what it had
            # applied: reload rather than trust it.
            raise RuntimeError(
                f"watch delivered revision {events[0].kv.mod_revision} after the view reached {self.revision}"
            )
        touched: set[str] = set()
        for ev in events:
            node = self._apply_one(ev)
            if node:
                touched.add(node)
        for name in touched:
            self._rebuild(name)
        self._advance(events[-1].kv.mod_revision)
        self.events.apply(events)

    def _apply_one(self, ev: Event) -> str | None:
        """Apply one event to the raw maps; returns the node whose view must be rebuilt."""
        parts = self._keys.parse(ev.kv.key)
        if not parts:
            return None
        kind, put, kv = parts[0], ev.kind == "put", ev.kv
        if kind == "nodes" and len(parts) == 2:
            self._records_version += 1
            if put:
                self._records[parts[1]] = (decode_node(kv.value), kv.mod_revision)
            else:
                self._records.pop(parts[1], None)
            return parts[1]
        if kind in ("alive", "cordoned") and len(parts) == 2:
            target = self._alive if kind == "alive" else self._cordoned
            (target.add if put else target.discard)(parts[1])
            if kind == "alive":
                if put:
                    self._alive_leases[parts[1]] = kv.lease
                else:
                    self._alive_leases.pop(parts[1], None)
            return parts[1]
        if kind in ("gpus", "res") and len(parts) == 3:
            # A delete event's mod_revision is the delete's own revision.
            self._changed[parts[1]] = max(self._changed.get(parts[1], 0), kv.mod_revision)
        if kind == "gpus" and len(parts) == 3:
            held = self._held.setdefault(parts[1], {})
            if put:
                held[parts[2]] = kv.value.decode()
            else:
                held.pop(parts[2], None)
            return parts[1]
        if kind == "res" and len(parts) == 3:
            res = self._res.setdefault(parts[1], {})
            before = res.pop(parts[2], (0, 0))
            after = decode_res(kv.value) if put else (0, 0)
            if put:
                res[parts[2]] = after
            cpus, mem = self._used.get(parts[1], (0, 0))
            self._used[parts[1]] = (cpus - before[0] + after[0], mem - before[1] + after[1])
            return parts[1]
        if kind == "drain" and len(parts) == 3:
            drains = self._drains.setdefault(parts[1], {})
            nodes = self._drain_nodes.setdefault(parts[2], set())
            if put:
                drains[parts[2]] = (draining.decode(kv.value), kv.mod_revision)
                nodes.add(parts[1])
            else:
                drains.pop(parts[2], None)
                nodes.discard(parts[1])
                if not nodes:
                    del self._drain_nodes[parts[2]]
                    self._ended_at.pop(parts[2], None)
            return parts[1]
        if kind == "usage" and len(parts) == 3:
            self._apply_usage(parts[1], parts[2], kv.value if put else None)
            return None
        if kind == "fairshare" and len(parts) == 1:
            self.fairshare = (kv.value, kv.mod_revision) if put else None
            return None
        if kind in self._tables and len(parts) == 2:
            if put:
                self._tables[kind][parts[1]] = kv.value
                self._table_revs[kind][parts[1]] = kv.mod_revision
            else:
                self._tables[kind].pop(parts[1], None)
                self._table_revs[kind].pop(parts[1], None)
            self._table_versions[kind] += 1
            return None
        if kind == "audit" and put and len(parts) == 2:
            alloc_id, _, action = parts[1].partition("-")[2].partition(".")
            if action in _ENDING_ACTIONS:
                self._released.add(alloc_id)
            return None
        if kind == "reqs":  # reqs/<scope>/<request id>: Keys.req(the allocation's request_id)
            if put and tombstones.is_tombstone(kv.value) and (released := tombstones.released_id(kv.value)):
                self._released_requests[released] = "/".join(parts[1:])
                if len(self._released_requests) > RECENT_RELEASES:
                    self._released_requests.popitem(last=False)
            return None
        if kind == "allocs" and len(parts) == 2:
            if put:
                self._allocs[parts[1]] = (kv.value, kv.create_revision)
            else:
                raw = self._allocs.pop(parts[1], None)
                self._decoded_allocs.pop(parts[1], None)
                if parts[1] in self._drain_nodes:
                    self._ended_at[parts[1]] = kv.mod_revision
                if parts[1] in self._released:
                    self._released.discard(parts[1])
                elif raw is not None and self.on_expired is not None:
                    self.on_expired(decode_alloc(*raw))
        return None

    def _apply_usage(self, tenant: str, alloc_id: str, raw: bytes | None) -> None:
        held = self._usage_by_alloc.setdefault(tenant, {})
        before = held.pop(alloc_id, None)
        total = self._usage.get(tenant, Usage())
        if before is not None:
            total = total.plus(before, -1)
        if raw is not None:
            try:
                after = decode_usage(raw)
            except (ValueError, KeyError, TypeError):
                log.warning("view: unreadable usage record %s/%s", tenant, alloc_id)
            else:
                held[alloc_id] = after
                total = total.plus(after)
        if held:
            self._usage[tenant] = total
        else:
            self._usage.pop(tenant, None)
            self._usage_by_alloc.pop(tenant, None)
        self._usage_version += 1

    def _rebuild(self, name: str) -> None:
        if self._views_shared:  # copy on write: a snapshot holds the current dict
            self._views = dict(self._views)
            self._views_shared = False
        rec = self._records.get(name)
        if rec is None:
            self._views.pop(name, None)
            self.index.update(name, None)
            return
        info, rec_rev = rec
        if (name in self._cordoned) != info.cordoned:
            info = NodeInfo(**{**info.__dict__, "cordoned": name in self._cordoned})
        cpus_used, memory_used = self._used.get(name, (0, 0))
        view = NodeView(
            info=info,
            up=name in self._alive,
            record_revision=rec_rev,
            gpus_held=held_indexes(info, self._holding(name)),
            cpus_used=cpus_used,
            memory_used=memory_used,
        )
        self._views[name] = view
        self.index.update(name, view)

    def _holding(self, name: str) -> Mapping[str, str]:
        """GPU UUID -> allocation, for placement: live allocations' GPUs, and GPUs still draining."""
        held = self._held.get(name, {})
        drains = self._drains.get(name)
        if not drains:
            return held
        out = {uuid: alloc_id for alloc_id, (uuids, _) in drains.items() for uuid in uuids}
        out.update(held)
        return out

    def _decoded_node(self, name: str, revision: int) -> NodeInfo | None:
        """The node's record if this view holds it as of ``revision`` (for the event log)."""
        held = self._records.get(name)
        return held[0] if held is not None and held[1] == revision else None

    def released_request(self, alloc_id: str) -> str | None:
        """The request id of an allocation a release ended lately (its tombstone's key); None if
        none is known."""
        return self._released_requests.get(alloc_id)

    def drain_nodes(self, alloc_id: str) -> frozenset[str]:
        """The nodes where ``alloc_id`` has a drain key."""
        return frozenset(self._drain_nodes.get(alloc_id, ()))

    def drains(self, node: str) -> list[draining.Drain]:
        """The node's drain keys, each with the revision its allocation ended at (None: live)."""
        return [
            draining.Drain(alloc_id, uuids, rev, None if alloc_id in self._allocs else self._ended_at.get(alloc_id))
            for alloc_id, (uuids, rev) in self._drains.get(node, {}).items()
        ]

    def _advance(self, revision: int) -> None:
        self.revision = max(self.revision, revision)
        for rev, fut in self._waiters:
            if rev <= self.revision and not fut.done():
                fut.set_result(None)
