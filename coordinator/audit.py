"""The audit log: who did what to which object, when, with what outcome, at which etcd revision.

Entries live in etcd under audit/<ms>-<unique> (sorted by time), as JSON. An entry for a change
that is an etcd transaction is one more Put in that transaction (`entry_put`), so no change goes
unrecorded and no entry exists for a change that did not happen; its revision is the
transaction's, read back as the key's mod_revision. Other events (container start and stop on
an agent, refusals) are written on their own (`record`), best effort.

Retention is bounded by age and count: any replica's sweep deletes the oldest range in one call
(keys sort by time), so concurrent sweeps are harmless.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from gpulease.common.identity import Principal
from gpulease.coordinator.keys import Keys, range_end
from gpulease.coordinator.store import Put, Store, StoreUnavailable

log = logging.getLogger(__name__)

SWEEP_EVERY_S = 60.0
# Refusals are written at most this often per actor (a flood of denied calls must not flood etcd);
# the rest are counted and the count goes into the next entry.
DENIED_PER_ACTOR_S = 1.0
_DENIED_ACTORS_KEPT = 4096


@dataclass(frozen=True)
class AuditPolicy:
    max_age_s: float = 90 * 86400.0
    max_entries: int = 100_000


@dataclass(frozen=True)
class Entry:
    time_unix_ms: int
    actor: str
    tenant: str
    action: str
    target: str
    outcome: str
    revision: int
    detail: str


def _entry_id(ms: int, unique: str = "") -> str:
    return f"{ms:013d}-{unique or secrets.token_hex(6)}"


def entry_put(
    keys: Keys, actor: Principal | str, action: str, target: str, *, tenant: str = "", outcome: str = "ok",
    detail: str = "", unique: str = "", ms: int = 0, extra: Mapping[str, str] | None = None,
) -> Put:  # fmt: skip
    """The Put of one entry, to go into the transaction of the change it records. ``unique``
    (e.g. "<allocation id>.release") makes the key tell watchers what happened without a read.
    ``ms`` (default: now) is the entry's time, and part of its key: an entry whose ``ms`` and
    ``unique`` derive from the thing recorded has the same key every time it is written. ``extra``
    adds fields to the JSON document."""
    ms = ms or int(time.time() * 1000)
    if isinstance(actor, Principal):
        tenant = tenant or actor.tenant
    doc = {"ms": ms, "actor": str(actor), "tenant": tenant, "action": action, "target": target,
           "outcome": outcome, "detail": detail, **(extra or {})}  # fmt: skip
    return Put(keys.audit(_entry_id(ms, unique)), json.dumps(doc, separators=(",", ":")).encode())


def unique_part(key_tail: str) -> str:
    """'0001764489600000-abc123.release' -> 'abc123.release' (what entry_put's ``unique`` was)."""
    return key_tail.partition("-")[2]


class AuditLog:
    def __init__(self, store: Store, keys: Keys, policy: AuditPolicy | None = None) -> None:
        self._store = store
        self._keys = keys
        self.policy = policy or AuditPolicy()
        self._denied: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._pending: set[asyncio.Task[None]] = set()

    def entry_put(
        self, actor: Principal | str, action: str, target: str, *, outcome: str = "ok", detail: str = "",
        unique: str = "",
    ) -> Put:  # fmt: skip
        """The Put that records this change inside the change's own transaction."""
        return entry_put(self._keys, actor, action, target, outcome=outcome, detail=detail, unique=unique)

    async def record(
        self, actor: Principal | str, action: str, target: str, *, outcome: str = "ok", detail: str = ""
    ) -> None:
        """An entry on its own (not part of an etcd change). Never raises: logged when etcd refuses."""
        put = self.entry_put(actor, action, target, outcome=outcome, detail=detail)
        try:
            await self._store.put(put.key, put.value)
        except StoreUnavailable as exc:
            log.warning("audit entry not written (%s %s %s by %s): %s", action, target, outcome, actor, exc)

    def denied(self, actor: Principal | str, rpc: str, reason: str) -> None:
        """Record a refusal in the background, at most one entry per actor per DENIED_PER_ACTOR_S."""
        key = str(actor)
        now = time.monotonic()
        last, dropped = self._denied.pop(key, (0.0, 0))
        if now - last < DENIED_PER_ACTOR_S:
            self._denied[key] = (last, dropped + 1)
            return
        self._denied[key] = (now, 0)
        while len(self._denied) > _DENIED_ACTORS_KEPT:
            self._denied.popitem(last=False)
        detail = f"{dropped} more refusals of this actor not recorded" if dropped else ""
        task = asyncio.ensure_future(self.record(actor, "denied", rpc, outcome=reason, detail=detail))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def read(self, since_ms: int = 0, actor: str = "", limit: int = 1000) -> list[Entry]:
        """Entries at or after since_ms (by this actor), oldest first, at most the newest `limit`."""
        prefix = self._keys.audit_prefix()
        start = self._keys.audit(f"{max(0, since_ms):013d}")
        _, kvs = await self._store.get_prefix(start, range_end(prefix))
        out: list[Entry] = []
        for kv in kvs:
            try:
                d = json.loads(kv.value)
            except ValueError:
                continue
            if actor and d.get("actor") != actor:
                continue
            out.append(Entry(int(d.get("ms", 0)), str(d.get("actor", "")), str(d.get("tenant", "")),
                             str(d.get("action", "")), str(d.get("target", "")), str(d.get("outcome", "")),
                             kv.mod_revision, str(d.get("detail", ""))))  # fmt: skip
        return out[-limit:] if limit > 0 else out

    async def sweep(self) -> int:
        """Delete entries past the age or count limit; returns how many went."""
        prefix = self._keys.audit_prefix()
        end = range_end(prefix)
        cutoff = self._keys.audit(f"{int((time.time() - self.policy.max_age_s) * 1000):013d}")
        removed = await self._store.delete_range(prefix, cutoff.encode())
        _, keys = await self._store.get_prefix(prefix, end)
        excess = len(keys) - self.policy.max_entries
        if excess > 0:
            removed += await self._store.delete_range(prefix, keys[excess].key.encode())
        return removed

    async def run(self) -> None:
        while True:
            try:
                removed = await self.sweep()
                if removed:
                    log.info("audit: %d entries past retention removed", removed)
            except StoreUnavailable as exc:
                log.warning("audit: retention sweep failed: %s", exc)
            await asyncio.sleep(SWEEP_EVERY_S)

    async def close(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
