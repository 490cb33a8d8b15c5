"""Leases granted ahead of demand, so an Allocate does not wait for a LeaseGrant round trip.

Each pooled lease is young (at most `max_age` seconds old) and is renewed to its full TTL right
after the allocation commits, so the allocation still gets its whole TTL; if that renewal
fails, it is at most `max_age` short. Pools exist only for TTLs that were asked for, refill
only when used, and never grow past `size`: an idle coordinator grants nothing. Unused leases
simply expire (nothing is attached to them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque

from coordinator.store import Store

log = logging.getLogger(__name__)


class LeasePool:
    def __init__(self, store: Store, *, size: int = 16, max_age: float = 2.0, max_ttls: int = 8) -> None:
        self._store = store
        self._size = size
        self._max_age = max_age
        self._max_ttls = max_ttls
        self._pools: OrderedDict[int, deque[tuple[int, float]]] = OrderedDict()
        self._refilling: dict[int, asyncio.Task[None]] = {}

    async def take(self, ttl: int) -> tuple[int, bool]:
        """(lease id, pooled). A pooled lease must be renewed once the allocation commits."""
        pool = self._pool(ttl)
        now = time.monotonic()
        while pool:
            lease, granted = pool.popleft()
            if now - granted <= self._max_age:
                self._refill(ttl)
                return lease, True
        self._refill(ttl)
        return await self._store.grant(ttl), False

    def _pool(self, ttl: int) -> deque[tuple[int, float]]:
        if ttl in self._pools:
            self._pools.move_to_end(ttl)
        else:
            self._pools[ttl] = deque()
            while len(self._pools) > self._max_ttls:  # a bounded set of TTLs gets pools
                self._pools.popitem(last=False)
        return self._pools[ttl]

    def _refill(self, ttl: int) -> None:
        task = self._refilling.get(ttl)
        if task is None or task.done():
            self._refilling[ttl] = asyncio.create_task(self._fill(ttl), name=f"lease-pool-{ttl}")

    async def _fill(self, ttl: int) -> None:
        pool = self._pools.get(ttl)
        try:
            while pool is not None and len(pool) < self._size and self._pools.get(ttl) is pool:
                lease = await self._store.grant(ttl)
                pool.append((lease, time.monotonic()))
        except Exception as exc:  # the pool is an optimisation: take() grants directly meanwhile
            log.debug("lease pool refill for ttl %ds failed: %s", ttl, exc)

    async def close(self) -> None:
        for task in self._refilling.values():
            task.cancel()
        await asyncio.gather(*self._refilling.values(), return_exceptions=True)
