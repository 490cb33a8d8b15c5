"""Leases granted ahead of demand, so an Allocate does not wait for a LeaseGrant round trip.

Each pooled lease is young (at most `max_age` seconds old). Once its allocation commits, the
lease's age *at that moment* decides: one that has lost more than 1 % of its TTL is renewed to
the full TTL before the caller is answered (`needs_renewal`; see AllocationService). At busy
times leases leave the pool within milliseconds, and skipping that renewal saves an etcd call
per allocation.

Pools exist only for TTLs that were asked for, refill only when used (after the allocation
that used one has its answer, see `replenish`), and never grow past `size`: an idle coordinator
grants nothing. Unused leases simply expire (nothing is attached to them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque

from gpulease.coordinator.store import Store

log = logging.getLogger(__name__)


# A lease that has lost less than this share of its TTL is not renewed at commit.
RENEW_AFTER_FRACTION = 0.01


def needs_renewal(ttl: int, age: float) -> bool:
    """Whether a lease `age` seconds old when its allocation committed must be renewed before the
    answer, so that the allocation keeps (within 1 %) the TTL it asked for."""
    return age > ttl * RENEW_AFTER_FRACTION


class LeasePool:
    def __init__(self, store: Store, *, size: int = 16, max_age: float = 2.0, max_ttls: int = 8) -> None:
        self._store = store
        self._size = size
        self._max_age = max_age
        self._max_ttls = max_ttls
        self._pools: OrderedDict[int, deque[tuple[int, float]]] = OrderedDict()
        self._refilling: dict[int, asyncio.Task[None]] = {}

    async def take(self, ttl: int) -> tuple[int, float]:
        """(lease id, time.monotonic() when it was granted, or when the grant was asked for: the
        lease's clock may have started then)."""
        pool = self._pool(ttl)
        now = time.monotonic()
        while pool:
            lease, granted = pool.popleft()
            if now - granted <= self._max_age:
                return lease, granted
        self._refill(ttl)
        return await self._store.grant(ttl), now

    def replenish(self, ttl: int) -> None:
        """Top the pool up again; callers do this once the allocation that took a lease has its
        answer. Refilling inside take() would queue a LeaseGrant in etcd just ahead of that
        allocation's own transaction, a raft write on the critical path."""
        if ttl in self._pools:
            self._refill(ttl)

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

    async def settle(self) -> None:
        """Wait for the refills in flight (pools then hold what they will hand out next)."""
        await asyncio.gather(*self._refilling.values(), return_exceptions=True)

    async def close(self) -> None:
        for task in self._refilling.values():
            task.cancel()
        await asyncio.gather(*self._refilling.values(), return_exceptions=True)
