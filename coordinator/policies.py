"""Admin-set policy in etcd: tenant quotas (``quotas/<tenant>``), priority classes
(``priorities/<name>``) and calendar reservations (``reservations/<name>``, on a lease that ends
shortly after the window). Each change is one transaction with its audit entry; every replica sees
it through its view and applies it to the next placement (and the allocation transaction compares
the quota records it judged by, so a change can never be missed by a commit in flight)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gpulease.common.identity import NAME_RE, Principal
from gpulease.coordinator import priority_classes
from gpulease.coordinator.audit import AuditLog
from gpulease.coordinator.domain import Reservation
from gpulease.coordinator.keys import Keys, range_end
from gpulease.coordinator.priority_classes import PriorityClass
from gpulease.coordinator.quota import DEFAULT_TENANT_KEY, Quota, Usage, borrowed
from gpulease.coordinator.records import decode_reservation, encode_quota, encode_reservation
from gpulease.coordinator.reservations import choose_nodes
from gpulease.coordinator.store import Cmp, Delete, Get, Put, Store
from gpulease.coordinator.view import ClusterView
from gpulease.errors import AlreadyExists, Conflict, InvalidRequest, NotFound

MAX_GPUS = 1_000_000
MAX_LIFETIME_S = 365 * 86400
# A reservation's window ends at most this far ahead; its key outlives the end by RESERVATION_SLACK_S.
MAX_RESERVATION_AHEAD_S = 366 * 86400
RESERVATION_SLACK_S = 60


@dataclass(frozen=True)
class TenantStatus:
    tenant: str
    quota: Quota | None
    from_default: bool
    usage: Usage
    borrowed: int
    pending: int
    fair_share_gpu_hours: float


def validate_quota(tenant: str, q: Quota) -> Quota:
    if tenant != DEFAULT_TENANT_KEY and not NAME_RE.match(tenant):
        raise InvalidRequest(f"{tenant[:64]!r} is not a valid tenant name ('*' sets the default quota)")

    def count(what: str, n: int | None, top: int = MAX_GPUS) -> None:
        if n is not None and not 0 <= n <= top:
            raise InvalidRequest(f"{what} must be 0 to {top}, not {n}")

    count("gpus", q.gpus)
    count("cpus", q.cpus)
    count("memory_bytes", q.memory_bytes, 2**62)
    count("borrow", q.borrow)
    count("max_lifetime_seconds", q.max_lifetime_s, MAX_LIFETIME_S)
    if q.max_lifetime_s and q.max_lifetime_s < 5:
        raise InvalidRequest("max_lifetime_seconds must be 0 (no limit) or at least 5")
    for model, n in q.models.items():
        if not model or len(model) > 256:
            raise InvalidRequest("a per-model quota needs the model's exact name (at most 256 characters)")
        count(f"the quota of model {model!r}", n)
    if len(q.models) > 64:
        raise InvalidRequest("at most 64 per-model quotas")
    if not math.isfinite(q.weight) or not 0 <= q.weight <= 1e6:
        raise InvalidRequest("weight must be 0 (the nominal GPUs) to 1000000")
    if q.borrow and q.gpus is None and not q.models:
        raise InvalidRequest("borrow needs a nominal quota to borrow above (--gpus or --model)")
    return q


class Policies:
    def __init__(self, store: Store, keys: Keys, view: ClusterView, audit: AuditLog) -> None:
        self._store = store
        self._keys = keys
        self._view = view
        self._audit = audit

    async def set_quota(self, by: Principal, tenant: str, q: Quota) -> Quota:
        validate_quota(tenant, q)
        detail = (f"gpus={q.gpus} models={dict(q.models)} cpus={q.cpus} memory={q.memory_bytes} borrow={q.borrow} "
                  f"lifetime={q.max_lifetime_s} weight={q.weight}")  # fmt: skip
        out = await self._store.txn(
            [], [Put(self._keys.quota(tenant), encode_quota(q)), self._audit.entry_put(by, "quota-set", tenant,
                                                                                       detail=detail)]
        )  # fmt: skip
        await self._view.wait_for_revision(out.revision, 1.0)
        return q

    async def delete_quota(self, by: Principal, tenant: str) -> bool:
        return await self._delete(by, self._keys.quota(tenant), "quota-delete", tenant)

    async def _delete(self, by: Principal, key: str, action: str, target: str) -> bool:
        """Delete a policy record with its audit entry, if it exists; True when it did."""
        out = await self._store.txn([Cmp(key, "create", ">", 0)],
                                    [Delete(key), self._audit.entry_put(by, action, target)])  # fmt: skip
        if out.succeeded:
            await self._view.wait_for_revision(out.revision, 1.0)
        return out.succeeded

    def statuses(self, pending: Mapping[str, int], fair_usage: Mapping[str, float]) -> list[TenantStatus]:
        """Every tenant with a quota, usage or pending requests; '*' (the default) when set."""
        book = self._view.quota_book()
        tenants = set(book.quotas) | set(book.usage) | set(pending)
        out = []
        for t in sorted(tenants):
            if t == DEFAULT_TENANT_KEY:
                q = book.quotas[t][0]
                out.append(TenantStatus(t, q, False, Usage(), 0, 0, 0.0))
                continue
            quota, from_default = book.quota_for(t)
            usage = book.usage_of(t)
            out.append(TenantStatus(t, quota, from_default, usage, borrowed(quota, usage), pending.get(t, 0),
                                    fair_usage.get(t, 0.0) / 3600))  # fmt: skip
        return out

    async def set_class(self, by: Principal, c: PriorityClass) -> PriorityClass:
        c = priority_classes.validate(c)
        ops = [Put(self._keys.priority_class(c.name), priority_classes.encode(c))]
        if c.is_default:  # one default: the others stored as default lose the mark
            for name, raw in self._view.table("priorities").items():
                other = priority_classes.decode(name, raw)
                if name != c.name and other.is_default:
                    unmarked = PriorityClass(other.name, other.value, False, other.grace_s, other.min_runtime_s)
                    ops.append(Put(self._keys.priority_class(name), priority_classes.encode(unmarked)))
        detail = f"value={c.value} default={c.is_default} grace={c.grace_s} min_runtime={c.min_runtime_s}"
        out = await self._store.txn([], [*ops, self._audit.entry_put(by, "priority-set", c.name, detail=detail)])
        await self._view.wait_for_revision(out.revision, 1.0)
        return c

    async def delete_class(self, by: Principal, name: str) -> bool:
        if not await self._delete(by, self._keys.priority_class(name), "priority-delete", name):
            raise NotFound(f"no stored priority class {name!r} (configured classes are changed in the coordinator's "
                           "settings)")  # fmt: skip
        return True

    # --- calendar reservations ---------------------------------------------------------------

    def reservations(self) -> list[Reservation]:
        """The reservations this replica's view holds, by start then name (ended ones until their
        lease lapses, shortly after their end)."""
        out = []
        for name, raw in self._view.table("reservations").items():
            try:
                out.append(decode_reservation(name, raw))
            except (ValueError, KeyError, TypeError):
                continue
        return sorted(out, key=lambda r: (r.start_ms, r.name))

    async def create_reservation(self, by: Principal, name: str, tenant: str, gpus: int, nodes: Sequence[str],
                                 model: str, start_ms: int, end_ms: int) -> Reservation:  # fmt: skip
        """Hold ``gpus`` GPUs (of ``model``) for ``tenant`` from ``start_ms`` (0: now) to ``end_ms``, on
        ``nodes`` or on nodes chosen here (coordinator/reservations.py), in one transaction with its
        audit entry, on a lease that ends RESERVATION_SLACK_S after the window. The transaction
        compares the reservations/ range against the view that judged the free capacity, so two
        creations racing for one node's GPUs cannot both pass."""
        self._view.ensure_synced()
        now = int(time.time() * 1000)
        start_ms = start_ms or now
        if not NAME_RE.match(name):
            raise InvalidRequest(f"{name[:64]!r} is not a valid reservation name (letters, digits, '.', '_', '-')")
        if not NAME_RE.match(tenant):
            raise InvalidRequest(f"{tenant[:64]!r} is not a valid tenant name")
        if not 1 <= gpus <= MAX_GPUS:
            raise InvalidRequest(f"gpus must be 1 to {MAX_GPUS}, not {gpus}")
        if len(model) > 256:
            raise InvalidRequest("gpu_model is at most 256 characters")
        if end_ms <= start_ms:
            raise InvalidRequest(f"the window ends ({_iso(end_ms)}) at or before it starts ({_iso(start_ms)}): "
                                 "--end must be after --start")  # fmt: skip
        if end_ms <= now:
            raise InvalidRequest(f"the window ended already ({_iso(end_ms)}, now {_iso(now)}): a reservation must end "
                                 "in the future")  # fmt: skip
        if end_ms > now + MAX_RESERVATION_AHEAD_S * 1000:
            raise InvalidRequest(f"a reservation ends at most {MAX_RESERVATION_AHEAD_S // 86400} days from now")
        if len(set(nodes)) != len(nodes):
            raise InvalidRequest("a node is named twice")
        revision = self._view.revision
        chosen = choose_nodes(self._view.snapshot().nodes, gpus, model, list(nodes), self.reservations(), start_ms,
                              end_ms)  # fmt: skip
        r = Reservation(name, tenant, start_ms, end_ms, chosen, model, now, str(by))
        key = self._keys.reservation(name)
        lease = await self._store.grant(max(5, (end_ms - now) // 1000 + RESERVATION_SLACK_S))
        where = ",".join(f"{n}:{k}" for n, k in sorted(chosen.items()))
        detail = f"tenant={tenant} gpus={where} model={model or '-'} start={_iso(start_ms)} end={_iso(end_ms)}"
        prefix = self._keys.reservations_prefix()
        try:
            out = await self._store.txn(
                [Cmp(key, "create", "==", 0), Cmp(prefix, "mod", "<", revision + 1, range_end(prefix))],
                [Put(key, encode_reservation(r), lease),
                 self._audit.entry_put(by, "reservation-create", name, detail=detail)],
                [Get(key)],
            )  # fmt: skip
        except Exception:
            await self._store.revoke(lease)
            raise
        if not out.succeeded:
            await self._store.revoke(lease)
            if out.reads and out.reads[0]:
                raise AlreadyExists(f"reservation {name!r} exists; delete it first (gpuctl reservation delete {name})")
            raise Conflict("another reservation was written meanwhile; retry")
        await self._view.wait_for_revision(out.revision, 1.0)
        return r

    async def delete_reservation(self, by: Principal, name: str) -> bool:
        """Remove a reservation (and its audit entry); False when there was none. Its lease is revoked."""
        key = self._keys.reservation(name)
        found = await self._store.get(key)
        if found is None:
            return False
        out = await self._store.txn([Cmp(key, "create", "==", found.create_revision)],
                                    [Delete(key), self._audit.entry_put(by, "reservation-delete", name)])  # fmt: skip
        if out.succeeded and found.lease:
            await self._store.revoke(found.lease)
        await self._view.wait_for_revision(out.revision, 1.0)
        return out.succeeded


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))
