"""Fair share (Slurm's, in small): each tenant's GPU usage, decayed with a half-life, orders the
queue among requests of equal priority (lower usage per weight first).

The ledger is one etcd key, ``fairshare``: ``{"at_ms": T, "usage": {tenant: decayed GPU-seconds}}``.
Any replica that finds it older than the interval advances it to now (decay the old figures, add
what each tenant holds now times the time since T) and writes it with a compare on the revision it
read, so one replica wins each step and the others see the result through their view. Between
steps every replica computes the same current figures from the ledger and the view. Fairness is an
ordering, not a safety property: a lost step or a slightly stale figure only reorders, and every
admission still goes through the allocation transaction. A coordinator restart loses nothing (the
ledger is in etcd); usage held while no coordinator ran is not counted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from gpulease.coordinator.keys import Keys
from gpulease.coordinator.quota import decayed
from gpulease.coordinator.store import Cmp, Put, Store, StoreUnavailable
from gpulease.coordinator.view import ClusterView

log = logging.getLogger(__name__)

# Figures under this many GPU-seconds are dropped from the ledger (a tenant long gone).
FORGET_BELOW = 1.0


def decode(raw: bytes | None, now_ms: int) -> tuple[int, dict[str, float]]:
    if not raw:
        return now_ms, {}
    try:
        d: dict[str, Any] = json.loads(raw)
        return int(d["at_ms"]), {str(k): float(v) for k, v in d.get("usage", {}).items()}
    except (ValueError, KeyError, TypeError):
        log.warning("fair share: unreadable ledger; starting from zero")
        return now_ms, {}


def advance(at_ms: int, usage: Mapping[str, float], held: Mapping[str, int], now_ms: int,
            half_life_s: float) -> dict[str, float]:  # fmt: skip
    """The figures at ``now_ms``: the ledger's, decayed, plus what each tenant holds now for the time
    since the ledger was written (as if held all along: the ledger is advanced every few seconds)."""
    elapsed = max(0.0, (now_ms - at_ms) / 1000)
    out = {t: decayed(v, elapsed, half_life_s) for t, v in usage.items()}
    for t, gpus in held.items():
        out[t] = out.get(t, 0.0) + gpus * elapsed
    return out


class FairShare:
    def __init__(self, store: Store, keys: Keys, view: ClusterView, half_life_s: float, interval_s: float = 5.0):
        self._store = store
        self._keys = keys
        self._view = view
        self.half_life_s = half_life_s
        self._interval = interval_s

    def _held(self) -> dict[str, int]:
        return {t: u.gpus for t, u in self._view.quota_book().usage.items() if u.gpus}

    def usage(self, now_ms: int | None = None) -> dict[str, float]:
        """Decayed GPU-seconds per tenant, now."""
        now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
        raw = self._view.fairshare[0] if self._view.fairshare else None
        at, figures = decode(raw, now_ms)
        return advance(at, figures, self._held(), now_ms, self.half_life_s)

    async def step(self) -> bool:
        """Advance the ledger if it is stale; True when this replica wrote it."""
        now = int(time.time() * 1000)
        seen = self._view.fairshare
        at, _ = decode(seen[0] if seen else None, now)
        if seen and now - at < self._interval * 1000:
            return False
        figures = {t: v for t, v in self.usage(now).items() if v >= FORGET_BELOW}
        doc = json.dumps({"at_ms": now, "usage": figures}, separators=(",", ":"), sort_keys=True).encode()
        key = self._keys.fairshare()
        out = await self._store.txn([Cmp(key, "mod", "==", seen[1] if seen else 0)], [Put(key, doc)])
        return out.succeeded

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            if not self._view.synced.is_set():
                continue
            try:
                await self.step()
            except StoreUnavailable as exc:
                log.debug("fair share: ledger not advanced: %s", exc)
            except Exception:
                log.exception("fair share: ledger step failed")
