"""Preemption, carried out: the protocol around the pure decision (coordinator/preemption_plan.py).

1. Notice. One transaction, compared on the preemptor still pending (queue/<id>), each victim still
   live (allocs/<v> create revision) and not already preempted (preempting/<v> absent), and the
   preemptor holding no claim yet (claims/<id> absent), writes:
     preempting/<v>  {"by","tenant","cause","deadline_ms","reason","lease"} on the VICTIM's lease
                     (it ends with the victim, whichever way it ends);
     claims/<id>     {"node","gpus","victims"} on the PREEMPTOR's waiting lease: the GPUs it freed
                     are held for it until its admission commits (which deletes the claim) or it
                     leaves the queue (its waiting lease lapses and the claim with it);
     one audit entry per victim ("preempt", with by and cause).
   Two replicas preempting for two requests cannot pick the same victim (preempting/<v> compare).
2. Grace. The victim's holder learns it from KeepAlive (state PREEMPTING, by, cause, deadline); its
   lease is still renewed until the deadline. Its containers are stopped at once with the class's
   grace as the SIGTERM-to-SIGKILL delay.
3. Revocation. Any replica that sees a notice past its deadline revokes the victim's lease
   (idempotent), which removes every key it held; the preemptor is then admitted on its claimed
   node by the ordinary admission transaction.
A victim that releases earlier simply frees its GPUs earlier.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from gpulease.common.logs import log_fields
from gpulease.coordinator.audit import entry_put
from gpulease.coordinator.domain import Allocation, PendingRequest
from gpulease.coordinator.keys import Keys
from gpulease.coordinator.preemption_plan import Candidate, Preemption, claimed_gpus
from gpulease.coordinator.priority_classes import Classes
from gpulease.coordinator.store import Cmp, Put, Store, StoreUnavailable
from gpulease.coordinator.view import ClusterView

log = logging.getLogger(__name__)
T = TypeVar("T")

# Stops the containers of an allocation (SIGTERM, SIGKILL after grace seconds); set once the
# container forwarder exists (coordinator/main.py).
StopContainers = Callable[[Allocation, int], Awaitable[None]]


@dataclass(frozen=True)
class Notice:
    """What a victim is told: which request it makes room for, why, and when its lease is revoked."""

    alloc_id: str
    by: str
    tenant: str
    cause: str
    deadline_ms: int
    reason: str
    lease: int


@dataclass(frozen=True)
class Claim:
    pending_id: str
    node: str
    gpus: tuple[int, ...]
    victims: tuple[str, ...]

    @property
    def pairs(self) -> frozenset[tuple[str, int]]:
        return frozenset((self.node, i) for i in self.gpus)


def decode_notice(alloc_id: str, raw: bytes) -> Notice | None:
    try:
        d: dict[str, Any] = json.loads(raw)
        return Notice(alloc_id, str(d["by"]), str(d.get("tenant", "")), str(d["cause"]), int(d["deadline_ms"]),
                      str(d.get("reason", "")), int(d.get("lease", 0)))  # fmt: skip
    except (ValueError, KeyError, TypeError):
        return None


def decode_claim(pending_id: str, raw: bytes) -> Claim | None:
    try:
        d: dict[str, Any] = json.loads(raw)
        return Claim(pending_id, str(d["node"]), tuple(int(i) for i in d["gpus"]), tuple(d.get("victims", ())))
    except (ValueError, KeyError, TypeError):
        return None


def _decoded(table: Mapping[str, bytes], decode: Callable[[str, bytes], T | None]) -> dict[str, T]:
    """A view table's records, decoded by key; unreadable ones are left out."""
    out = {}
    for key, raw in table.items():
        record = decode(key, raw)
        if record is not None:
            out[key] = record
    return out


def candidate(a: Allocation, view: ClusterView, classes: Classes) -> Candidate | None:
    """The allocation as the pure plan sees it (None: its node is unknown to the view)."""
    node = view.node(a.node)
    if node is None:
        return None
    by_uuid = {g.uuid: g.index for g in node.info.gpus}
    klass = classes.by_name.get(a.priority_class)
    return Candidate(a.id, a.node, frozenset(by_uuid[g.uuid] for g in a.gpus if g.uuid in by_uuid), a.cpus,
                     a.memory_bytes, a.tenant, a.priority, a.preemptible, a.created_unix_ms,
                     klass.min_runtime_s if klass else 0)  # fmt: skip


class Preemptions:
    def __init__(self, store: Store, keys: Keys, view: ClusterView) -> None:
        self._store = store
        self._keys = keys
        self._view = view
        self.stop_containers: StopContainers | None = None
        self._revoking: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def notices(self) -> dict[str, Notice]:
        return _decoded(self._view.table("preempting"), decode_notice)

    def notice(self, alloc_id: str) -> Notice | None:
        raw = self._view.table("preempting").get(alloc_id)
        return decode_notice(alloc_id, raw) if raw is not None else None

    def claims(self) -> dict[str, Claim]:
        return _decoded(self._view.table("claims"), decode_claim)

    async def preempt(self, entry: PendingRequest, p: Preemption, classes: Classes) -> bool:
        """Notify the victims and claim their GPUs for ``entry``; False when a compare failed (a
        victim ended or was taken by another preemptor, or the request left): plan again."""
        k = self._keys
        victims = [a for a in (self._view.allocation(v) for v in p.victims) if a is not None]
        if len(victims) != len(p.victims):
            return False
        now = int(time.time() * 1000)
        compares = [Cmp(k.queue(entry.id), "version", ">", 0), Cmp(k.claim(entry.id), "version", "==", 0)]
        success: list[Put] = []
        for v in victims:
            grace = classes.grace_of(v.priority_class)
            reason = (f"preempted by request {entry.id} of tenant {entry.tenant} ({p.cause}: priority {entry.priority} "
                      f"over {v.priority})" if p.cause == "priority" else
                      f"preempted by request {entry.id}: tenant {entry.tenant} reclaims its quota from {v.tenant}, "
                      "which borrowed it")  # fmt: skip
            notice = {"by": entry.id, "tenant": entry.tenant, "cause": str(p.cause), "deadline_ms": now + grace * 1000,
                      "reason": reason, "lease": v.lease_id}  # fmt: skip
            compares += [Cmp(k.alloc(v.id), "create", "==", v.revision), Cmp(k.preempting(v.id), "version", "==", 0)]
            success.append(Put(k.preempting(v.id), json.dumps(notice).encode(), v.lease_id))
            success.append(entry_put(k, "system:queue", "preempt", v.id, tenant=v.tenant, unique=f"{v.id}.preempt",
                                     detail=f"by={entry.id} by_tenant={entry.tenant} cause={p.cause} "
                                            f"grace={grace}s"))  # fmt: skip
        claim = {"node": p.node, "gpus": sorted(i for _, i in claimed_gpus(p)), "victims": list(p.victims)}
        success.append(Put(k.claim(entry.id), json.dumps(claim).encode(), entry.lease_id))
        out = await self._store.txn(compares, success)
        if not out.succeeded:
            return False
        log.info(
            "queue: request %s preempts %s on %s (%s)",
            entry.id,
            ", ".join(p.victims),
            p.node,
            p.cause,
            extra=log_fields(allocation_id=entry.id, node=p.node),
        )
        for v in victims:
            self._spawn(self._stop(v, classes.grace_of(v.priority_class)))
        return True

    async def _stop(self, victim: Allocation, grace: int) -> None:
        if self.stop_containers is None:
            return
        try:
            await self.stop_containers(victim, grace)
        except Exception as exc:  # the revocation at the deadline ends it anyway (the agent enforces)
            log.warning("preemption: stopping the containers of %s failed: %s", victim.id, exc)

    def sweep(self, now_ms: int, notices: Mapping[str, Notice] | None = None) -> None:
        """Revoke the leases of victims past their deadline (any replica; revocation is idempotent)."""
        for n in (notices if notices is not None else self.notices()).values():
            if n.deadline_ms <= now_ms and n.alloc_id not in self._revoking and n.lease:
                self._revoking.add(n.alloc_id)
                self._spawn(self._revoke(n))

    async def _revoke(self, n: Notice) -> None:
        try:
            await self._store.revoke(n.lease)
            log.info(
                "preemption: revoked the lease of %s (its grace ended)",
                n.alloc_id,
                extra=log_fields(allocation_id=n.alloc_id),
            )
        except StoreUnavailable as exc:
            log.warning("preemption: revoking %s failed (%s); retrying on the next pass", n.alloc_id, exc)
        finally:
            self._revoking.discard(n.alloc_id)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
