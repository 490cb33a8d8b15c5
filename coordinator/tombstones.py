"""Release-time tombstones for request ids: an attempt the client moved on from never commits later.

A client whose Allocate timed out on one replica sends it again, with the same request id, to
another; it gets an allocation there, uses it and releases it. The first attempt may still be
queued in that replica's batcher, or in etcd: before tombstones it then committed, since the
release had deleted `reqs/<request_id>` and the commit compares that key absent, and held GPUs for
nobody until its TTL ran out (issue 17).

Release (and CancelRequest) therefore *replace* `reqs/<request_id>` with a tombstone on a lease of
its own instead of deleting it. Every allocation transaction already compares that key absent, so
no attempt of a released request id can commit while the tombstone lives, with no extra compare.

How long it must live: an attempt commits only while its allocation lease is alive. That lease is
taken when the attempt is submitted (from a pool of leases at most 2 s old), an attempt is never
submitted more than `ATTEMPT_BOUND_S` after it arrived (the batcher fails older ones, see
`Batcher`), and a lease lives at most twice its TTL (a new etcd leader restarts every lease's
clock once). So `ATTEMPT_BOUND_S + 2 * ttl + MARGIN_S` after the release, no attempt of that
request can commit any more, and the tombstone may go. A request id reused after that allocates
anew; one reused before is refused with `RequestReleased` (an idempotency key names one request).

Tombstones share leases: one per power-of-two bucket of the life needed, used while it has that
much left, so releases cost no LeaseGrant of their own.
"""

from __future__ import annotations

import time

from gpulease.coordinator.store import Store
from gpulease.errors import RequestReleased

# The longest an Allocate attempt may wait between its arrival and its commit being sent.
ATTEMPT_BOUND_S = 60
MARGIN_S = 10
# The value of a tombstone in reqs/<request_id> (an allocation id never starts with '~').
PREFIX = b"~released "


def life_needed(ttl_s: int) -> int:
    """Seconds a tombstone for a request of TTL ``ttl_s`` must outlive its release."""
    return ATTEMPT_BOUND_S + 2 * ttl_s + MARGIN_S


def value(alloc_id: str, release_id: str = "") -> bytes:
    """A tombstone: the allocation released (or "" for a cancel) and the release call's id."""
    return PREFIX + f"{alloc_id} {release_id}".rstrip().encode()


def is_tombstone(raw: bytes) -> bool:
    return raw.startswith(PREFIX)


def released_id(raw: bytes) -> str:
    """The allocation a tombstone records the release of."""
    return raw[len(PREFIX) :].decode(errors="replace").partition(" ")[0]


def release_id(raw: bytes) -> str:
    """The id of the release call that wrote the tombstone ("" when it gave none)."""
    return raw[len(PREFIX) :].decode(errors="replace").partition(" ")[2]


def released(request_id: str) -> RequestReleased:
    """What an attempt of a released request id is answered."""
    return RequestReleased(
        f"request id {request_id!r} was released or cancelled a short while ago, and an idempotency key names "
        "one request: it does not allocate again. Use a new request id for a new request"
    )


def bucket(need_s: int) -> int:
    """The smallest power of two >= need_s: leases are shared within a bucket."""
    return 1 << max(0, need_s - 1).bit_length()


class TombstoneLeases:
    """Leases for tombstones, each reused while it has at least the life a tombstone needs."""

    def __init__(self, store: Store) -> None:
        self._store = store
        # bucket -> (lease id, time.monotonic() by which it has surely expired... or not before)
        self._leases: dict[int, tuple[int, float]] = {}

    async def lease_for(self, ttl_s: int) -> int:
        need = life_needed(ttl_s)
        b = bucket(need)
        now = time.monotonic()
        held = self._leases.get(b)
        if held is not None and held[1] - now >= need:
            return held[0]
        # Clock read before the grant: etcd's clock for the lease starts later, so this is early.
        lease = await self._store.grant(2 * b)
        self._leases[b] = (lease, now + 2 * b)
        return lease

    def forget(self, lease: int) -> None:
        """A lease etcd no longer knows (LeaseNotFound): never hand it out again."""
        for b, (held, _) in list(self._leases.items()):
            if held == lease:
                del self._leases[b]
