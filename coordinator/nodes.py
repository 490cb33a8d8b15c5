"""Node registry: registration, heartbeats (lease renewal), cordon.

A node is up while its alive/<node> key exists; that key hangs on the node's lease, which
only heartbeats renew. The node record (inventory) is rewritten only when it changes, so a
heartbeat costs one lease renewal and never invalidates in-flight placements on that node.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gpulease.coordinator import validation
from gpulease.coordinator.domain import NodeInfo, NodeView
from gpulease.coordinator.keys import Keys
from gpulease.coordinator.records import decode_node, encode_node
from gpulease.coordinator.store import Store
from gpulease.coordinator.view import ClusterView
from gpulease.errors import InvalidRequest, NodeNotFound

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodePolicy:
    node_ttl: int = 15
    heartbeat_interval: int = 5


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
    def __init__(self, store: Store, view: ClusterView, keys: Keys, policy: NodePolicy) -> None:
        self._store = store
        self._view = view
        self._keys = keys
        self._policy = policy

    async def register(self, info: NodeInfo) -> Registration:
        info = validation.inventory(info)
        await self._write_record_if_changed(info)
        lease = await self._store.grant(self._policy.node_ttl)
        revision = await self._store.put(self._keys.alive(info.name), b"", lease)
        log.info("node %s registered at %s with %d GPUs (lease %x)", info.name, info.address, len(info.gpus), lease)
        return Registration(lease, self._policy.heartbeat_interval, self._policy.node_ttl,
                            await self._allocations_revision(info.name, revision))  # fmt: skip

    async def heartbeat(self, name: str, lease_id: int, info: NodeInfo | None) -> Registration:
        validation.node_name(name)
        if info is not None:
            info = validation.inventory(info)
            if info.name != name:
                raise InvalidRequest(f"heartbeat for {name!r} carries inventory of {info.name!r}")
        renewal = await self._store.keepalive(lease_id) if lease_id > 0 else None
        if renewal is None or renewal.ttl <= 0:
            # The lease lapsed (the node was down, or etcd lost it): register again.
            if info is None:
                kv = await self._store.get(self._keys.node(name))
                if kv is None:
                    raise NodeNotFound(f"node {name!r} is not registered; call RegisterNode first")
                info = decode_node(kv.value)
            log.warning("node %s: lease %x had lapsed; re-registering", name, lease_id)
            return await self.register(info)
        if info is not None:
            await self._write_record_if_changed(info)
        return Registration(lease_id, self._policy.heartbeat_interval, self._policy.node_ttl,
                            await self._allocations_revision(name, renewal.revision))  # fmt: skip

    async def _allocations_revision(self, name: str, etcd_revision: int) -> int:
        """The node's allocations revision once the view holds every event up to `etcd_revision`
        (etcd's revision when it answered this call), so an unchanged value means exactly what a
        ListAllocations read at that point would have shown. 0 if the view is behind."""
        if not self._view.synced.is_set() or not await self._view.caught_up(etcd_revision, VIEW_CATCH_UP_S):
            return 0
        return self._view.allocations_revision(name)

    async def cordon(self, name: str, cordoned: bool) -> NodeView:
        validation.node_name(name)
        if await self._store.get(self._keys.node(name)) is None:
            raise NodeNotFound(f"node {name!r} is not registered")
        key = self._keys.cordoned(name)
        rev = await (self._store.put(key, b"") if cordoned else self._store.delete(key))
        # Answer with the node as it is after the write, not as the view last saw it.
        await self._view.wait_for_revision(rev, 2.0)
        view = self._view.node(name)
        if view is None:
            raise NodeNotFound(f"node {name!r} is not registered")
        return view

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
