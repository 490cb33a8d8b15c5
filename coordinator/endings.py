"""What outlives an allocation: its expiry in the audit log (once), and who owns its containers.

Expiry. etcd deletes an expired allocation's keys itself, so no coordinator call records it. Every
replica's view sees the deletion; one with no release entry at that revision (a release writes
audit/<ms>-<id>.release in the deleting transaction) is an expiry. Each replica then tries one
transaction that writes the entry only if the marker expired/<id> does not exist yet, so the
entry is written once however many replicas watch. The marker sits on a short shared lease.

Containers. Logs and exit codes stay readable after the allocation ended (agents keep exited
containers for their retention time), and only by the owner and admins. RunContainer records
containers/<id> = {node, principal, tenant} once per allocation; after the allocation ends, a
sweep moves the record onto a lease of the retention time, so etcd forgets it by itself. Calls
for an ended allocation go to that node only, never to every node.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

from gpulease.coordinator import draining
from gpulease.coordinator.audit import entry_put
from gpulease.coordinator.domain import Allocation
from gpulease.coordinator.keys import Keys
from gpulease.coordinator.store import Cmp, Put, Store, StoreUnavailable
from gpulease.coordinator.view import ClusterView
from gpulease.errors import AllocationNotFound

log = logging.getLogger(__name__)

EXPIRY_ACTOR = "system:expiry"
MARKER_TTL_S = 600
SWEEP_EVERY_S = 30.0


@dataclass(frozen=True)
class ContainerHome:
    node: str
    principal: str
    tenant: str
    ended: bool
    # A gang's member nodes (its containers may be on any); () for one node.
    nodes: tuple[str, ...] = ()

    @property
    def all_nodes(self) -> tuple[str, ...]:
        return self.nodes or (self.node,)


def home_of(raw: bytes | None) -> ContainerHome | None:
    """A containers/<id> record, decoded (None when absent or unreadable)."""
    if raw is None:
        return None
    try:
        d = json.loads(raw)
        return ContainerHome(str(d["node"]), str(d.get("principal", "")), str(d.get("tenant", "")),
                             bool(d.get("ended_ms")), tuple(str(n) for n in d.get("nodes", ())))  # fmt: skip
    except (ValueError, KeyError):
        return None


class Endings:
    def __init__(self, store: Store, keys: Keys, view: ClusterView, retention_s: int = 3600) -> None:
        self._store = store
        self._keys = keys
        self._view = view
        self._retention_s = retention_s
        self._marker_lease: tuple[int, float] = (0, 0.0)
        self._tasks: set[asyncio.Task[None]] = set()
        # Seen not live by one sweep: moved by the next if still not live (a record written by
        # another replica can reach this view before the allocation it belongs to does).
        self._suspects: set[str] = set()
        view.on_expired = self.expired

    # --- expiry -----------------------------------------------------------------------------

    def expired(self, alloc: Allocation) -> None:
        """Called by the view for a deletion that no release explains."""
        task = asyncio.ensure_future(self._record_expiry(alloc))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lease(self) -> int:
        lease, at = self._marker_lease
        if not lease or time.monotonic() - at > MARKER_TTL_S / 2:
            lease = await self._store.grant(MARKER_TTL_S)
            self._marker_lease = (lease, time.monotonic())
        return lease

    async def _record_expiry(self, alloc: Allocation) -> None:
        marker = self._keys.expired(alloc.id)
        for attempt in range(3):
            try:
                lease = await self._lease()
                await self._store.txn(
                    [Cmp(marker, "create", "==", 0)],
                    [Put(marker, b"", lease),
                     entry_put(self._keys, EXPIRY_ACTOR, "expire", alloc.id, tenant=alloc.tenant,
                               unique=f"{alloc.id}.expire",
                               detail=f"owner={alloc.principal or '-'} node={alloc.node} ttl={alloc.ttl_seconds}s")],
                )  # fmt: skip
                return
            except StoreUnavailable as exc:  # an unknown outcome is safe to retry: the marker decides
                self._marker_lease = (0, 0.0)
                log.warning("expiry of %s not audited yet (attempt %d): %s", alloc.id, attempt + 1, exc)
                await asyncio.sleep(1.0)

    # --- containers after the allocation -------------------------------------------------------

    def home(self, alloc_id: str) -> ContainerHome | None:
        return home_of(self._view.table("containers").get(alloc_id))

    async def note_containers(self, alloc: Allocation) -> None:
        """Before the first container of ``alloc`` starts: remember where and whose it is, and mark its
        GPUs as draining once it ends (coordinator/draining.py), compared on it being live: a
        container never starts on GPUs that could be free before the agent has stopped it."""
        if self.home(alloc.id) is not None and self._view.drain_nodes(alloc.id) >= set(alloc.nodes):
            return
        doc: dict[str, object] = {"node": alloc.members[0].node, "principal": alloc.principal,
                                  "tenant": alloc.tenant, "ended_ms": 0}  # fmt: skip
        if alloc.is_gang:
            doc["nodes"] = list(alloc.nodes)
        out = await self._store.txn(
            [Cmp(self._keys.alloc(alloc.id), "create", "==", alloc.revision)],
            [Put(self._keys.containers(alloc.id), json.dumps(doc, separators=(",", ":")).encode()),
             *draining.marks(self._keys, alloc)],
        )  # fmt: skip
        if not out.succeeded:
            raise AllocationNotFound(f"allocation {alloc.id} is not live (released, expired or never existed)")

    async def sweep(self) -> int:
        """Records of allocations no longer live go onto a lease of the retention time."""
        ended = []
        for alloc_id, raw in self._view.table("containers").items():
            if self._view.allocation(alloc_id) is not None:
                continue
            try:
                d = json.loads(raw)
            except ValueError:
                continue
            if not d.get("ended_ms"):
                ended.append((alloc_id, d))
        suspects, self._suspects = self._suspects, {a for a, _ in ended}
        ended = [(a, d) for a, d in ended if a in suspects]
        if not ended:
            return 0
        lease = await self._store.grant(self._retention_s)
        now = int(time.time() * 1000)
        for alloc_id, d in ended:
            d["ended_ms"] = now
            await self._store.put(self._keys.containers(alloc_id), json.dumps(d, separators=(",", ":")).encode(), lease)
        return len(ended)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            try:
                await self.sweep()
            except StoreUnavailable as exc:
                log.warning("container records sweep failed: %s", exc)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
