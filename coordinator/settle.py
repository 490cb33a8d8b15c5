"""Settling allocations whose commit outcome is unknown, so that nothing is held for nobody.

A transaction whose answer was lost (a timeout, a broken connection) may or may not have
committed, and may still commit later if etcd had it queued. Three rules make that safe:

- **Decide, don't guess.** `decide` puts `reqs/<request_id>` = "" on the allocation's own lease
  if that key is absent. Then the lost transaction can never commit (it compares that key
  absent), and the answer is final: nothing was allocated. If the key is there, it names who
  holds the request id: this allocation (it committed), or another one.
- **A retry that was handed an allocation owns it.** Every answer that returns an existing
  allocation to a retry (`reused=true`) first *claims* it: `claimed/<id>` is put on its lease,
  if it is still the same allocation. A settler removes an allocation only in a transaction that
  compares `claimed/<id>` absent, so a claimed allocation is never taken from its holder, and an
  allocation the settler removed can no longer be claimed.
- **Finish the job whoever is left.** When the outcome stays unknown past the bounded wait, the
  caller is told UNAVAILABLE and the allocation is recorded under `unsettled/<id>` (no lease) once
  etcd answers again; a background task, and every replica's periodic sweep, settle it: remove it
  unless claimed, revoke its lease, delete the record. Every step is idempotent, so replicas may
  race on the same record.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable

from gpulease.common.logs import log_fields
from gpulease.coordinator import tombstones
from gpulease.coordinator.audit import entry_put
from gpulease.coordinator.domain import Allocation
from gpulease.coordinator.keys import Keys, range_end
from gpulease.coordinator.records import decode_alloc
from gpulease.coordinator.store import KV, Cmp, Delete, Get, LeaseNotFound, OutcomeUnknown, Put, Store

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 10.0
RETRY_FIRST_S = 0.1
RETRY_MAX_S = 2.0


class Settler:
    def __init__(self, store: Store, keys: Keys) -> None:
        self._store = store
        self._keys = keys
        self._background: set[asyncio.Task[None]] = set()
        self.settled = 0  # in-doubt allocations settled and their records cleared

    # --- single, linearizable steps --------------------------------------------------------

    async def decide(self, draft: Allocation) -> Allocation | None:
        """Final outcome for a draft whose commit is in doubt: the live allocation holding its
        request id (this draft's own record when it committed; another one when the id was taken),
        or None when nothing holds it: then the draft can never commit. Raises StoreUnavailable
        (and OutcomeUnknown) when etcd does not answer: still in doubt."""
        req = self._keys.req(draft.request_id)
        try:
            out = await self._store.txn([Cmp(req, "version", "==", 0)], [Put(req, b"", draft.lease_id)], [Get(req)])
        except LeaseNotFound:
            # The draft's lease is gone, and with it anything the draft could have written.
            return await self.by_request_id(draft.request_id)
        if out.succeeded:
            return None
        kv = out.reads[0][0] if out.reads and out.reads[0] else None
        if kv is None:  # gone between the compare and the read: cannot be, but decide again
            raise OutcomeUnknown(f"request key {req} vanished while settling; deciding again")
        if tombstones.is_tombstone(kv.value):
            return None  # released or cancelled: nothing of this request can commit while it lives
        if not kv.value:
            if kv.lease == draft.lease_id:
                return None  # blocked by an earlier decide of ours
            # Another in-doubt draft of the same request id blocked it: once that one's lease is
            # revoked the key is gone, and this draft could still commit. Not decided yet.
            raise OutcomeUnknown(f"request {draft.request_id} is being settled elsewhere; deciding again")
        holder = await self.by_id(kv.value.decode())
        if holder is None:  # it ended in between, freeing the request id: decide again
            raise OutcomeUnknown(f"the allocation holding request {draft.request_id} just ended; deciding again")
        return holder

    async def claim(self, alloc: Allocation) -> Allocation | None:
        """The allocation, now claimed by whoever it is handed to, or None if it is no longer live
        (or is another allocation under the same id now)."""
        out = await self._store.txn(
            [Cmp(self._keys.alloc(alloc.id), "create", "==", alloc.revision)],
            [Put(self._keys.claimed(alloc.id), b"", alloc.lease_id)],
        )
        return alloc if out.succeeded else None

    async def remove_unclaimed(self, alloc: Allocation) -> bool:
        """Delete every key of `alloc` unless a retry claimed it. True when removed."""
        k = self._keys
        keys = k.of_allocation(alloc)
        audit = entry_put(k, "system:settler", "release", alloc.id, tenant=alloc.tenant, unique=f"{alloc.id}.unclaimed",
                          detail="a commit in doubt that no caller was handed")  # fmt: skip
        out = await self._store.txn(
            [Cmp(k.claimed(alloc.id), "version", "==", 0), Cmp(k.alloc(alloc.id), "create", "==", alloc.revision)],
            [audit, *(Delete(key) for key in keys)],
        )
        return out.succeeded

    # --- in the background, until done -----------------------------------------------------

    def finish_later(self, draft: Allocation, why: str) -> None:
        """Settle `draft` in the background: record it, then remove it unless claimed."""
        task = asyncio.ensure_future(self.finish(draft, why))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def revoke_later(self, lease: int, ttl: int) -> None:
        """Revoke a lease that carries nothing anyone was told about, retrying until it is gone."""
        task = asyncio.ensure_future(self._revoke_until_gone(lease, ttl))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def finish(self, draft: Allocation, why: str) -> None:
        record = json.dumps({"lease": draft.lease_id, "request_id": draft.request_id, "ttl": draft.ttl_seconds})
        await self._retry(lambda: self._store.put(self._keys.unsettled(draft.id), record.encode()),
                          f"record unsettled allocation {draft.id}")  # fmt: skip
        log.warning(
            "allocation %s (request %s): %s; settling it in the background",
            draft.id,
            draft.request_id,
            why,
            extra=log_fields(allocation_id=draft.id, request_id=draft.request_id),
        )
        await self._retry(lambda: self._settle(draft), f"settle allocation {draft.id}")
        await self._retry(lambda: self._store.delete(self._keys.unsettled(draft.id)), f"clear record {draft.id}")
        self.settled += 1

    async def _settle(self, draft: Allocation) -> None:
        holder = await self.decide(draft)
        if holder is not None and holder.id == draft.id:
            if await self.remove_unclaimed(holder):
                log.warning(
                    "allocation %s committed but nobody was told: removed",
                    draft.id,
                    extra=log_fields(allocation_id=draft.id),
                )
            else:
                log.info(
                    "allocation %s committed and a retry claimed it: kept",
                    draft.id,
                    extra=log_fields(allocation_id=draft.id),
                )
                return
        # Not committed (and now never will), removed, or another allocation holds the request id:
        # this draft's lease carries nothing anyone holds.
        await self._store.revoke(draft.lease_id)

    async def sweep(self) -> int:
        """Settle every recorded allocation (those of a coordinator that died meanwhile too)."""
        prefix = self._keys.unsettled_prefix()
        _, kvs = await self._store.get_prefix(prefix, range_end(prefix))
        for kv in kvs:
            draft = _draft(kv, prefix)
            if draft is None:
                await self._store.delete(kv.key)
                continue
            await self._settle(draft)
            await self._store.delete(kv.key)
            self.settled += 1
        return len(kvs)

    async def run(self) -> None:
        """Sweep now and then; runs until cancelled."""
        while True:
            try:
                await self.sweep()
            except Exception as exc:  # etcd away: the next sweep tries again
                log.debug("unsettled sweep failed: %s", exc)
            await asyncio.sleep(SWEEP_INTERVAL_S)

    async def close(self, drain: float = 5.0) -> None:
        """Let background revokes and settles finish (at most `drain` seconds), then cancel the rest:
        a lease left behind lapses by itself, and a recorded allocation is another replica's job."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=drain)
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    # --- helpers ---------------------------------------------------------------------------

    async def _revoke_until_gone(self, lease: int, ttl: int) -> None:
        # Past the TTL the lease is gone by itself; trying longer would only log noise.
        deadline = time.monotonic() + ttl
        delay = RETRY_FIRST_S
        while True:
            try:
                await self._store.revoke(lease)
                return
            except Exception as exc:
                if time.monotonic() + delay > deadline:
                    log.warning("could not revoke lease %x (%s); it lapses by itself within its TTL", lease, exc)
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def _retry(self, step: Callable[[], Awaitable[object]], what: str) -> None:
        delay = RETRY_FIRST_S
        while True:
            try:
                await step()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("%s: %s; retrying in %.1fs", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    # --- linearizable reads (the allocation service uses them too) ---------------------------

    async def by_request_id(self, request_id: str) -> Allocation | None:
        """The live allocation holding `request_id`; None if none does (or a settler's "" or a
        release's tombstone blocks it)."""
        kv = await self._store.get(self._keys.req(request_id))
        if kv is None or not kv.value or tombstones.is_tombstone(kv.value):
            return None
        return await self.by_id(kv.value.decode())

    async def by_id(self, alloc_id: str) -> Allocation | None:
        kv = await self._store.get(self._keys.alloc(alloc_id))
        return decode_alloc(kv.value, kv.create_revision) if kv else None


def _draft(kv: KV, prefix: str) -> Allocation | None:
    try:
        d = json.loads(kv.value)
        return Allocation(id=kv.key[len(prefix) :], node="", gpus=(), cpus=0, memory_bytes=0,
                          ttl_seconds=int(d.get("ttl", 0)), lease_id=int(d["lease"]), revision=0,
                          request_id=str(d["request_id"]))  # fmt: skip
    except (ValueError, KeyError, TypeError):
        log.warning("unreadable unsettled record %s: %r; dropping it", kv.key, kv.value[:100])
        return None
