"""Node registry: registration, heartbeats, cordon, removal.

A node is up while its alive/<node> key exists; coordinator/liveness.py keeps that key (by
default on this replica's session lease, so a heartbeat costs no etcd call). The node record
(inventory) is rewritten only when it changes, so a heartbeat never invalidates in-flight
placements on that node.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from gpulease.common.identity import LOCAL_ADMIN, Principal
from gpulease.common.logs import log_fields
from gpulease.coordinator import container_exits, draining, validation
from gpulease.coordinator.audit import entry_put
from gpulease.coordinator.domain import NodeInfo, NodeView
from gpulease.coordinator.keys import Keys, range_end
from gpulease.coordinator.liveness import Liveness, LivenessPolicy, make
from gpulease.coordinator.records import decode_node, encode_node
from gpulease.coordinator.store import Cmp, Delete, Put, Store
from gpulease.coordinator.telemetry import GpuSample, Telemetry
from gpulease.coordinator.view import ClusterView
from gpulease.errors import Conflict, InvalidRequest, NodeNotFound
from gpulease.v1.coordinator_pb2 import ContainerExit

log = logging.getLogger(__name__)


# How long a heartbeat waits for the view to catch up with etcd before answering without an
# allocations revision (the agent then asks ListAllocations, which reads etcd).
VIEW_CATCH_UP_S = 1.0


@dataclass(frozen=True)
class Registration:
    lease_id: int
    heartbeat_interval: int
    node_ttl: int
    # See ClusterView.allocations_revision; 0 when the view could not vouch for it.
    allocations_revision: int = 0


class NodeService:
    def __init__(self, store: Store, view: ClusterView, keys: Keys, policy: LivenessPolicy) -> None:
        self._store = store
        self._view = view
        self._keys = keys
        self.liveness: Liveness = make(store, view, keys, policy)
        # The heartbeats' GPU telemetry, in memory only (never in etcd): see coordinator/telemetry.py.
        self.telemetry = Telemetry(3 * policy.heartbeat_interval)

    def _registration(self, lease_id: int, allocations_revision: int) -> Registration:
        t = self.liveness.timing()
        self.telemetry.max_age_s = 3 * t.heartbeat_interval  # the interval grows with the cluster
        return Registration(lease_id, t.heartbeat_interval, t.node_ttl, allocations_revision)

    async def run(self) -> None:
        """Keeps node liveness (coordinator/liveness.py): forever, cancelled at shutdown."""
        await self.liveness.run()

    async def register(self, info: NodeInfo) -> Registration:
        info = validation.inventory(info)
        await self._write_record_if_changed(info)
        beat = await self.liveness.attach(info.name)
        lease, revision = beat.lease_id, beat.revision
        log.info(
            "node %s registered at %s with %d GPUs (lease %x)",
            info.name,
            info.address,
            len(info.gpus),
            lease,
            extra=log_fields(node=info.name),
        )
        return self._registration(lease, await self._allocations_revision(info.name, revision))

    async def heartbeat(
        self, name: str, lease_id: int, info: NodeInfo | None, telemetry: dict[int, GpuSample] | None = None,
        exits: Sequence[ContainerExit] = (), enforced_revision: int = 0,
    ) -> Registration:  # fmt: skip
        """Notes the node alive (coordinator/liveness.py), or registers it again if it was down;
        ``telemetry`` is kept in memory only.
        ``exits`` (containers of the node's allocations that exited) become audit entries, once
        each however often they are sent (coordinator/container_exits.py)."""
        validation.node_name(name)
        if info is not None:
            info = validation.inventory(info)
            if info.name != name:
                raise InvalidRequest(f"heartbeat for {name!r} carries inventory of {info.name!r}")
        beat = await self.liveness.beat(name, lease_id)
        if beat is None:
            # The node was down (or etcd lost its lease): register again.
            if info is None:
                kv = await self._store.get(self._keys.node(name))
                if kv is None:
                    raise NodeNotFound(f"node {name!r} is not registered; call RegisterNode first")
                info = decode_node(kv.value)
            log.warning("node %s was down; registering it again", name, extra=log_fields(node=name))
            reg = await self.register(info)
            self.telemetry.record(name, telemetry or {})
            await self._record_exits(name, exits)
            await self._clear_drains(name, enforced_revision)
            return reg
        if info is not None:
            await self._write_record_if_changed(info)
        self.telemetry.record(name, telemetry or {})
        await self._record_exits(name, exits)
        await self._clear_drains(name, enforced_revision)
        return self._registration(beat.lease_id, await self._allocations_revision(name, beat.revision))

    async def _clear_drains(self, name: str, enforced_revision: int) -> None:
        """GPUs of ended allocations whose containers the agent has stopped are free again
        (coordinator/draining.py). From the view: most heartbeats find nothing to clear."""
        done = draining.clearable(self._view.drains(name), enforced_revision)
        if not done:
            return
        cmps, ops = draining.clear_txn(self._keys, name, done)
        out = await self._store.txn(cmps, ops)
        if out.succeeded:
            log.info("node %s: the containers of %s are stopped; their GPUs are free again", name,
                     ", ".join(d.allocation_id for d in done), extra=log_fields(node=name))  # fmt: skip

    async def _record_exits(self, name: str, exits: Sequence[ContainerExit]) -> None:
        if not exits:
            return
        rec = await container_exits.record(self._store, self._view, self._keys, name, exits)
        if rec.written:
            log.info("node %s: %d container exit(s) recorded", name, rec.written, extra=log_fields(node=name))

    async def _allocations_revision(self, name: str, etcd_revision: int) -> int:
        """The node's allocations revision once the view holds every event up to `etcd_revision`
        (etcd's revision when it last answered this replica's liveness calls: at most a second old
        with a session), so an unchanged value means exactly what a ListAllocations read at that
        point would have shown. 0 if the view is behind (a stalled watch)."""
        if not self._view.synced.is_set() or not await self._view.caught_up(etcd_revision, VIEW_CATCH_UP_S):
            return 0
        return self._view.allocations_revision(name)

    async def cordon(self, name: str, cordoned: bool, by: Principal = LOCAL_ADMIN) -> NodeView:
        validation.node_name(name)
        key, node_key = self._keys.cordoned(name), self._keys.node(name)
        action = "cordon" if cordoned else "uncordon"
        out = await self._store.txn(
            [Cmp(node_key, "create", ">", 0)],
            [Put(key, b"") if cordoned else Delete(key), entry_put(self._keys, by, action, name)],
        )
        if not out.succeeded:
            raise NodeNotFound(f"node {name!r} is not registered")
        rev = out.revision
        # Answer with the node as it is after the write, not as the view last saw it.
        await self._view.wait_for_revision(rev, 2.0)
        view = self._view.node(name)
        if view is None:
            raise NodeNotFound(f"node {name!r} is not registered")
        return view

    async def delete(self, name: str, by: Principal = LOCAL_ADMIN) -> int:
        """Remove a node record that no live allocation uses, and whose agent is not up (it would
        register again). Compared in the same transaction that deletes, so no allocation can land
        on the node in between."""
        validation.node_name(name)
        k = self._keys
        gpus, res = k.gpus_prefix(name), k.res_prefix(name)
        out = await self._store.txn(
            [Cmp(k.node(name), "create", ">", 0), Cmp(k.alive(name), "version", "==", 0),
             Cmp(gpus, "version", "==", 0, range_end(gpus)), Cmp(res, "version", "==", 0, range_end(res))],
            [Delete(k.node(name)), Delete(k.cordoned(name)), entry_put(k, by, "node-delete", name)],
        )  # fmt: skip
        if out.succeeded:
            await self._view.wait_for_revision(out.revision, 2.0)
            return out.revision
        view = self._view.node(name)
        if await self._store.get(k.node(name)) is None:
            raise NodeNotFound(f"node {name!r} is not registered")
        if view is not None and view.up:
            raise Conflict(f"node {name} is up: stop its agent first, or it registers again")
        raise Conflict(f"node {name} still has live allocations: release them or wait for them to end")

    def nodes(self) -> list[NodeView]:
        self._view.ensure_synced()
        return self._view.nodes()

    async def _write_record_if_changed(self, info: NodeInfo) -> None:
        raw = encode_node(info)
        known = self._view.node(info.name)
        if known is not None and encode_node(known.info) == raw:
            return
        # The view may lag; compare with etcd before rewriting (a rewrite bumps the record's
        # revision and makes in-flight commits on this node retry).
        kv = await self._store.get(self._keys.node(info.name))
        if kv is None or kv.value != raw:
            await self._store.put(self._keys.node(info.name), raw)
