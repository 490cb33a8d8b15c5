"""Typed cluster events, derived from the view's etcd watch (issue 16, section 5).

The view hands every watch batch to ``EventLog.apply`` (and every load to ``EventLog.load``); this
module turns key changes into events, keeps the last ``capacity`` of them in a ring buffer (each
with the etcd revision it came from) and fans them out to subscribers. Revisions are etcd's, so
they mean the same on every replica: a client that reconnects to another replica resumes with
``since_revision``.

What each key change means:

    allocs/<id> created           ALLOCATED (detail says when it was admitted from the queue)
    allocs/<id> deleted           RELEASED when the deleting transaction wrote an ending audit
                                  entry (audit/<ms>-<id>.release|force-release|unclaimed, ahead of
                                  the delete, as the view's expiry detection relies on); EXPIRED otherwise
    preempting/<id> created       PREEMPTED (the victim's allocation)
    queue/<id> created            QUEUED
    alive/<node> created/deleted  NODE_UP / NODE_DOWN (a re-put while alive is no event)
    cordoned/<node> put/deleted   NODE_CORDONED / NODE_UNCORDONED
    nodes/<node> put              GPU_UNHEALTHY / GPU_HEALTHY for GPUs whose health changed (one event
                                  per direction per record change; a new node's unhealthy GPUs count)
    audit container-start         CONTAINER_STARTED (RunContainer writes it)
    audit container-stop          CONTAINER_STOPPED (StopContainer writes it)
    audit <ms>-<id>.exit.<cid>    CONTAINER_EXITED, when the key is created (an agent reported the
                                  exit in a heartbeat: coordinator/container_exits.py; a resend
                                  rewrites nothing, and a rewrite would not be created again)

Markers, delivered whatever the type filter: HISTORY_GAP (the requested ``since_revision`` is older
than the buffer), RESYNC (the view reloaded after compaction or an outage: changes between its last
applied revision and the reload are not events) and OVERFLOW (a subscriber that fell behind by
``queue_size`` events is dropped; this is its last message).

``time_ms`` is the wall time at which this replica derived the event (etcd keeps no timestamps).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from gpulease.coordinator.domain import NodeInfo
from gpulease.coordinator.keys import Keys
from gpulease.coordinator.records import decode_alloc, decode_node, decode_pending
from gpulease.coordinator.store import KV, Event

log = logging.getLogger(__name__)

CAPACITY = 10_000
QUEUE_SIZE = 1_000
# Audit actions (audit/<ms>-<id>.<action>) that end an allocation in the deleting transaction.
_ENDING_ACTIONS = ("release", "force-release", "unclaimed")


class EventType(StrEnum):
    ALLOCATED = "allocated"
    RELEASED = "released"
    EXPIRED = "expired"
    PREEMPTED = "preempted"
    QUEUED = "queued"
    NODE_UP = "node_up"
    NODE_DOWN = "node_down"
    NODE_CORDONED = "node_cordoned"
    NODE_UNCORDONED = "node_uncordoned"
    GPU_UNHEALTHY = "gpu_unhealthy"
    GPU_HEALTHY = "gpu_healthy"
    CONTAINER_STARTED = "container_started"
    CONTAINER_STOPPED = "container_stopped"
    CONTAINER_EXITED = "container_exited"
    # Markers
    HISTORY_GAP = "history_gap"
    RESYNC = "resync"
    OVERFLOW = "overflow"


MARKERS = frozenset({EventType.HISTORY_GAP, EventType.RESYNC, EventType.OVERFLOW})


@dataclass(frozen=True)
class ClusterEvent:
    type: EventType
    revision: int
    time_ms: int
    allocation_id: str = ""
    node: str = ""
    tenant: str = ""
    principal: str = ""
    # GPU indexes ("0", "3"); "<node>:<index>" for a gang's GPUs; UUIDs where no index is known.
    gpus: tuple[str, ...] = ()
    detail: str = ""


def to_dict(ev: ClusterEvent) -> dict[str, Any]:
    """The JSON shape (the same names as the gRPC Event), for SSE and `gpuctl events --json`."""
    return {
        "type": ev.type.value, "revision": ev.revision, "time_unix_ms": ev.time_ms,
        "allocation_id": ev.allocation_id, "node": ev.node, "tenant": ev.tenant, "principal": ev.principal,
        "gpus": list(ev.gpus), "detail": ev.detail,
    }  # fmt: skip


def to_json(ev: ClusterEvent) -> str:
    return json.dumps(to_dict(ev), separators=(",", ":"))


def _now_ms() -> int:
    return int(time.time() * 1000)


# (node name, mod revision) -> the record as the view decoded it at that revision, or None.
DecodedNode = Callable[[str, int], NodeInfo | None]


class Deriver:
    """Turns watch events into ClusterEvents. Keeps only what a deletion needs to be described
    (allocation records by reference, the view holds the same bytes) and the GPU health per node."""

    def __init__(self, keys: Keys, decoded_node: DecodedNode | None = None) -> None:
        self._keys = keys
        self._decoded_node = decoded_node
        self.reset()

    def reset(self) -> None:
        self._allocs: dict[str, tuple[bytes, int]] = {}
        self._ended: dict[str, str] = {}  # allocation id -> ending audit action, until its delete
        self._health: dict[str, dict[str, tuple[str, bool, str]]] = {}  # node -> gpu key -> (index, healthy, detail)
        self._queued: set[str] = set()
        self._dequeued_rev, self._dequeued = 0, set[str]()

    def seed(self, kv: KV) -> None:
        """State from a load: remembered, no events."""
        self.derive(Event("put", kv), quiet=True)

    def derive(self, ev: Event, quiet: bool = False) -> list[ClusterEvent]:
        parts = self._keys.parse(ev.kv.key)
        if not parts:
            return []
        kind, put, kv = parts[0], ev.kind == "put", ev.kv
        created = put and kv.version == 1
        rev = kv.mod_revision
        out: list[ClusterEvent] = []

        def emit(t: EventType, **kw: Any) -> None:
            if not quiet:
                out.append(ClusterEvent(t, rev, _now_ms(), **kw))

        if len(parts) == 2 and kind == "allocs":
            alloc_id = parts[1]
            if put:
                self._allocs[alloc_id] = (kv.value, kv.create_revision)
                if created:
                    a = self._decode(alloc_id)
                    admitted = alloc_id in self._queued or (rev == self._dequeued_rev and alloc_id in self._dequeued)
                    self._queued.discard(alloc_id)
                    emit(EventType.ALLOCATED, detail=(f"{a['detail']}; admitted from the queue" if admitted
                                                      else a["detail"]), **a["fields"])  # fmt: skip
            else:
                a = self._decode(alloc_id)
                self._allocs.pop(alloc_id, None)
                action = self._ended.pop(alloc_id, "")
                if action:
                    emit(EventType.RELEASED, detail=f"{action}; {a['detail']}", **a["fields"])
                else:
                    emit(EventType.EXPIRED, detail=f"lease expired without a release; {a['detail']}", **a["fields"])
        elif len(parts) == 2 and kind == "audit" and put:
            self._audit(parts[1], kv.value, created, emit)
        elif len(parts) == 2 and kind in ("alive", "cordoned"):
            if kind == "alive" and created:
                emit(EventType.NODE_UP, node=parts[1])
            elif kind == "alive" and not put:
                emit(EventType.NODE_DOWN, node=parts[1], detail="its liveness lease lapsed or was revoked")
            elif kind == "cordoned" and created:
                emit(EventType.NODE_CORDONED, node=parts[1])
            elif kind == "cordoned" and not put:
                emit(EventType.NODE_UNCORDONED, node=parts[1])
        elif len(parts) == 2 and kind == "nodes":
            self._node(parts[1], kv.value if put else None, kv.mod_revision, emit)
        elif len(parts) == 2 and kind == "preempting" and created:
            a = self._decode(parts[1])
            try:
                notice = json.loads(kv.value)
                why = f"by request {notice.get('by', '')} ({notice.get('cause', '')}): {notice.get('reason', '')}"
            except ValueError:
                why = ""
            emit(EventType.PREEMPTED, detail=why, **a["fields"])
        elif len(parts) == 2 and kind == "queue":
            if created:
                self._queued.add(parts[1])
                try:
                    p = decode_pending(kv.value)
                    emit(EventType.QUEUED, allocation_id=p.id, tenant=p.tenant, principal=p.principal,
                         detail=f"{p.req.gpus} GPU(s) {p.req.gpu_model}".rstrip())  # fmt: skip
                except (ValueError, KeyError, TypeError):
                    emit(EventType.QUEUED, allocation_id=parts[1])
            elif not put:
                # Admission deletes it in the allocation's transaction, in whichever order.
                self._queued.discard(parts[1])
                if rev != self._dequeued_rev:
                    self._dequeued_rev, self._dequeued = rev, set()
                self._dequeued.add(parts[1])
        return out

    def _decode(self, alloc_id: str) -> dict[str, Any]:
        raw = self._allocs.get(alloc_id)
        if raw is None:
            return {"fields": {"allocation_id": alloc_id}, "detail": ""}
        try:
            a = decode_alloc(*raw)
        except (ValueError, KeyError, TypeError):
            return {"fields": {"allocation_id": alloc_id}, "detail": "unreadable record"}
        if a.is_gang:
            gpus = tuple(f"{m.node}:{g.index}" for m in a.members for g in m.gpus)
            where = f"nodes={','.join(a.nodes)}"
        else:
            gpus = tuple(str(g.index) for g in a.gpus)
            where = f"node={a.node}"
        detail = f"{len(gpus)} GPU(s) {where} owner={a.owner or '-'} ttl={a.ttl_seconds}s"
        return {"fields": {"allocation_id": a.id, "node": a.node, "tenant": a.tenant, "principal": a.principal,
                           "gpus": gpus}, "detail": detail}  # fmt: skip

    def _audit(self, tail: str, value: bytes, created: bool, emit: Any) -> None:
        unique = tail.partition("-")[2]
        alloc_id, dot, action = unique.partition(".")
        if dot and action in _ENDING_ACTIONS:
            self._ended[alloc_id] = action
            return
        if dot and action.startswith("exit.") and created:
            self._exit(alloc_id, value, emit)
            return
        if dot:  # allocation changes with a unique key: described by their own keys
            return
        try:
            d = json.loads(value)
        except ValueError:
            return
        action = d.get("action")
        if action not in ("container-start", "container-stop") or d.get("outcome", "ok") != "ok":
            return
        target = str(d.get("target", ""))
        a = self._decode(target)
        fields = {**a["fields"], "principal": str(d.get("actor", "")), "tenant": str(d.get("tenant", ""))}
        t = EventType.CONTAINER_STARTED if action == "container-start" else EventType.CONTAINER_STOPPED
        emit(t, detail=str(d.get("detail", "")), **fields)

    def _exit(self, alloc_id: str, value: bytes, emit: Any) -> None:
        try:
            d = json.loads(value)
        except ValueError:
            d = {}
        a = self._decode(alloc_id)
        fields = {**a["fields"], "allocation_id": alloc_id, "node": str(d.get("node", "")),
                  "tenant": str(d.get("tenant", "")), "principal": str(d.get("principal", ""))}  # fmt: skip
        container = str(d.get("container", ""))[:12]
        detail = str(d.get("detail", ""))
        emit(EventType.CONTAINER_EXITED, detail=f"container {container}: {detail}" if container else detail, **fields)

    def _node(self, name: str, value: bytes | None, revision: int, emit: Any) -> None:
        before = self._health.pop(name, {})
        if value is None:
            return
        # The view has usually decoded this very version already: decoding it again cost a third of
        # the CPU of a 10,000-node load (python -m bench.resync, view_load_cpu_s).
        info = self._decoded_node(name, revision) if self._decoded_node is not None else None
        try:
            info = info or decode_node(value)
        except (ValueError, KeyError, TypeError):
            return
        now = {(g.uuid or str(g.index)): (str(g.index), g.healthy, g.health_detail) for g in info.gpus}
        self._health[name] = now
        sick = [k for k, (_, ok, _) in now.items() if not ok and before.get(k, ("", True, ""))[1]]
        well = [k for k, (_, ok, _) in now.items() if ok and k in before and not before[k][1]]
        if sick:
            emit(EventType.GPU_UNHEALTHY, node=name, gpus=tuple(now[k][0] for k in sick),
                 detail="; ".join(f"GPU {now[k][0]} ({k}): {now[k][2] or 'unhealthy'}" for k in sick))  # fmt: skip
        if well:
            emit(EventType.GPU_HEALTHY, node=name, gpus=tuple(now[k][0] for k in well),
                 detail="; ".join(f"GPU {now[k][0]} ({k}) healthy again" for k in well))  # fmt: skip


@dataclass(eq=False)  # hashed by identity: kept in a set
class _Subscriber:
    types: frozenset[EventType]
    limit: int
    # Bounded by hand (an asyncio.Queue cannot take the overflow marker once full).
    items: deque[ClusterEvent] = field(default_factory=deque)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    last_revision: int = 0

    def wants(self, ev: ClusterEvent) -> bool:
        return not self.types or ev.type in self.types or ev.type in MARKERS

    def offer(self, ev: ClusterEvent) -> bool:
        """False when full: the subscriber gets the overflow marker as its last message."""
        if len(self.items) >= self.limit:
            self.items.append(ClusterEvent(EventType.OVERFLOW, self.last_revision, _now_ms(), detail=(
                f"this subscriber fell {self.limit} events behind and was dropped; resume with "
                f"since_revision={self.last_revision}")))  # fmt: skip
            self.ready.set()
            return False
        self.items.append(ev)
        self.last_revision = ev.revision
        self.ready.set()
        return True


class EventLog:
    """The ring buffer and subscribers of one replica. Fed synchronously by the view; never blocks it."""

    def __init__(
        self,
        keys: Keys,
        capacity: int = CAPACITY,
        queue_size: int = QUEUE_SIZE,
        decoded_node: DecodedNode | None = None,
    ) -> None:
        self._deriver = Deriver(keys, decoded_node)
        self._buffer: deque[ClusterEvent] = deque(maxlen=capacity)
        self._queue_size = queue_size
        # Events with a revision above this are all in the buffer (or none happened).
        self.floor = 0
        self.revision = 0
        self._loaded = False
        self._subs: set[_Subscriber] = set()

    # --- fed by the view ---------------------------------------------------------------

    def load(self, revision: int, kvs: Iterable[KV]) -> None:
        self._deriver.reset()
        for kv in kvs:
            self._deriver.seed(kv)
        if self._loaded:
            self._publish([ClusterEvent(EventType.RESYNC, revision, _now_ms(), detail=(
                f"the view reloaded at revision {revision}; changes after revision {self.revision} up to it "
                "are not in the stream"))])  # fmt: skip
        self._loaded = True
        self.floor = revision
        self.revision = revision

    def apply(self, events: Sequence[Event]) -> None:
        out: list[ClusterEvent] = []
        for ev in events:
            try:
                out.extend(self._deriver.derive(ev))
            except Exception:  # an event we cannot describe must never stop the view
                log.exception("events: could not derive an event from %s %s", ev.kind, ev.kv.key)
        if events:
            self.revision = events[-1].kv.mod_revision
        self._publish(out)

    def _publish(self, out: list[ClusterEvent]) -> None:
        for ev in out:
            if len(self._buffer) == self._buffer.maxlen:
                self.floor = max(self.floor, self._buffer[0].revision)
            self._buffer.append(ev)
            for sub in list(self._subs):
                if sub.wants(ev) and not sub.offer(ev):
                    self._subs.discard(sub)

    # --- read ----------------------------------------------------------------------------

    def recent(self) -> list[ClusterEvent]:
        return list(self._buffer)

    async def subscribe(
        self, since_revision: int = 0, types: Collection[EventType] = (), follow: bool = True
    ) -> AsyncIterator[ClusterEvent]:
        """Buffered events newer than ``since_revision`` (0: all buffered), then, with ``follow``,
        new ones as they come. A HISTORY_GAP marker comes first when ``since_revision`` is older
        than the buffer; OVERFLOW is the last message of a subscriber dropped for falling behind."""
        sub = _Subscriber(frozenset(types), self._queue_size)
        # Registered and the buffer copied in one synchronous step: nothing is missed or repeated.
        if follow:
            self._subs.add(sub)
        replay = [ev for ev in self._buffer if ev.revision > since_revision and sub.wants(ev)]
        floor = self.floor
        try:
            if 0 < since_revision < floor:
                yield ClusterEvent(EventType.HISTORY_GAP, floor, _now_ms(), detail=(
                    f"events from revision {since_revision + 1} to {floor} are not in this replica's buffer "
                    f"(it holds revisions above {floor}); the audit log has allocation changes"))  # fmt: skip
            for ev in replay:
                yield ev
            while follow:
                if not sub.items:
                    sub.ready.clear()
                    await sub.ready.wait()
                    continue
                ev = sub.items.popleft()
                yield ev
                if ev.type is EventType.OVERFLOW:
                    return
        finally:
            self._subs.discard(sub)
