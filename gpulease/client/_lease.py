"""What an allocation handle knows about its lease: when it was last renewed, whether it was
released, and whether (and why) it is lost; and every decision of the keepalive loop and of the
release at the end of a ``with`` block. Shared by the sync and the asyncio handles, whose
sessions only wait and send (a thread or a task; see ``Renewal`` for the loop).

A renewal may bring a preemption notice (the allocation makes room for a request of higher
priority, and its lease is revoked at a deadline): the tracker records it once and calls the
handle's ``on_preempted`` callback; from then on, uses of the allocation raise AllocationPreempted
(its lease is still renewed until the deadline, so the holder can wind down).

Renewals happen every ttl/3. A lease is lost when the coordinator says the allocation is gone
(AllocationNotFound from KeepAlive), or when no renewal succeeded for longer than its TTL: by
then the lease has expired in etcd and the GPUs may belong to someone else.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

from gpulease.client import _ops
from gpulease.errors import AllocationLost, AllocationNotFound, AllocationPreempted, GpuLeaseError
from gpulease.v1 import coordinator_pb2 as pb

log = logging.getLogger("gpulease.client")

# Renew this often, in TTLs; and at least this often after a failed renewal (seconds).
RENEW_FRACTION = 1 / 3
MIN_INTERVAL_S = 0.5
RETRY_INTERVAL_S = 1.0


@dataclass(frozen=True)
class Renewal:
    """One attempt of a keepalive loop. The loop, whose decisions are all the tracker's; the sync
    thread and the asyncio task only wait and send:

        wait = 0.0                               # renew at once
        while wait is not None:                  # None: the lease is lost, the loop ends
            (wait ``wait`` seconds; end if told to stop)
            renewal = tracker.renewal(client_timeout)
            (send renewal.op with renewal.timeout and renewal.budget; error: what it raised, or None)
            wait = tracker.after_attempt(error)  # every ttl/3 after a success, sooner after a failure
    """

    op: _ops.Op[pb.KeepAliveResponse, int]
    # The deadline of this attempt, and how long UNAVAILABLE may be retried within it.
    timeout: float
    budget: float


class LeaseTracker:
    def __init__(self, allocation_id: str, ttl_seconds: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.allocation_id = allocation_id
        self._clock = clock
        self._lock = threading.Lock()
        self.ttl = float(max(1, ttl_seconds))
        self._last_renewal = clock()
        self._lost: str | None = None
        self.released = False
        self.preempted: AllocationPreempted | None = None
        self.on_preempted: Callable[[AllocationPreempted], None] | None = None

    # --- renewal bookkeeping ------------------------------------------------------------------

    def reset(self, ttl_seconds: int | None = None) -> None:
        """Count the TTL from now (a keepalive loop starting on a handle of unknown age)."""
        with self._lock:
            if ttl_seconds:
                self.ttl = float(max(1, ttl_seconds))
            self._last_renewal = self._clock()

    @property
    def interval(self) -> float:
        return max(MIN_INTERVAL_S, self.ttl * RENEW_FRACTION)

    def renewed(self) -> None:
        with self._lock:
            self._last_renewal = self._clock()

    def since_renewal(self) -> float:
        with self._lock:
            return self._clock() - self._last_renewal

    def time_left(self) -> float:
        """Seconds until the lease expires if no renewal succeeds meanwhile."""
        return self.ttl - self.since_renewal()

    def retry_wait(self) -> float:
        return min(self.interval, RETRY_INTERVAL_S, max(0.0, self.time_left()))

    # --- one step of a keepalive loop (the sync thread and the asyncio task share these) ---------

    def renewal(self, timeout: float) -> Renewal:
        """The next renewal, for a client whose calls take ``timeout``: retry for as long as the
        lease can last, but give even a late first try a real chance."""
        budget = max(self.time_left(), 0.0)
        return Renewal(self.keep_alive_op(), min(timeout, max(budget, MIN_INTERVAL_S)), budget)

    def keep_alive_op(self) -> _ops.Op[pb.KeepAliveResponse, int]:
        return _ops.keep_alive(self.allocation_id, self.notice)

    def notice(self, err: AllocationPreempted) -> None:
        """A renewal said the allocation is being preempted: record it (once) and tell the callback."""
        with self._lock:
            if self.preempted is not None:
                return
            self.preempted = err
            callback = self.on_preempted
        log.warning("%s", err.message)
        if callback is not None:
            try:
                callback(err)
            except Exception:  # the holder's code must not stop the renewals that give it its grace
                log.exception("the on_preempted callback of allocation %s raised", self.allocation_id)

    def after_attempt(self, err: BaseException | None) -> float | None:
        """Record a renewal's outcome (``err`` None: success). Returns the seconds to wait before
        the next one, or None when the lease is lost and the loop should end."""
        if err is None:
            self.renewed()
            return self.interval
        if isinstance(err, GpuLeaseError):
            lost = self.keepalive_failed(err)
            if lost is None:
                log.warning("keepalive of allocation %s failed, will retry: %s", self.allocation_id, err.message)
        else:  # a bug, not a verdict on the lease: keep trying until it runs out
            log.error("keepalive of allocation %s failed", self.allocation_id, exc_info=err)
            lost = self.expired(f"keepalive raised {type(err).__name__}")
        if lost is not None:
            log.error("%s", lost.message)
            return None
        return self.retry_wait()

    @contextmanager
    def renewing(self) -> Iterator[None]:
        """Around a renewal asked for by hand (``keep_alive()``): the allocation must be live; a
        success counts, and a failure that makes the lease lost raises AllocationLost instead."""
        self.check_live()
        try:
            yield
        except GpuLeaseError as err:
            lost = self.keepalive_failed(err)
            if lost is not None:
                raise lost from None
            raise
        self.renewed()

    @contextmanager
    def final_release(self, retry_deadline: float) -> Iterator[float]:
        """Around the release at the end of a ``with`` block; yields its retry budget: past the
        lease's end the GPUs come back anyway, so no longer than that. A failure is logged, not
        raised (the block's own outcome stands); so is a lost lease."""
        try:
            yield min(retry_deadline, max(self.time_left(), 1.0))
        except GpuLeaseError as err:
            log.warning("could not release allocation %s (%s); its lease expires within %gs",
                        self.allocation_id, err.message, self.ttl)  # fmt: skip
        if self.lost:
            log.warning("%s", self.lost_reason)

    def keepalive_failed(self, err: GpuLeaseError) -> AllocationLost | None:
        """Record a failed renewal; returns the AllocationLost error when that makes the lease lost."""
        if isinstance(err, AllocationNotFound):
            return self.mark_lost(f"the coordinator no longer knows it ({err.message})")
        return self.expired(f"last error: {type(err).__name__}: {err.message}")

    def expired(self, detail: str = "") -> AllocationLost | None:
        """Mark the lease lost if no renewal succeeded for longer than its TTL."""
        since = self.since_renewal()
        if since <= self.ttl:
            return None
        why = f"no keepalive succeeded for {since:.1f}s, longer than its {self.ttl:g}s TTL"
        return self.mark_lost(f"{why} ({detail})" if detail else why)

    # --- lost / released ----------------------------------------------------------------------

    def mark_lost(self, why: str) -> AllocationLost:
        """Mark the lease lost (the first reason sticks) and return the error that uses now raise."""
        with self._lock:
            if self._lost is None and not self.released:
                at = datetime.now().astimezone().isoformat(timespec="seconds")
                self._lost = f"allocation {self.allocation_id} was lost at {at}: {why}; its GPUs may already be reused"
        return AllocationLost(self._lost or f"allocation {self.allocation_id} was released")

    @property
    def lost(self) -> bool:
        return self._lost is not None

    @property
    def lost_reason(self) -> str | None:
        return self._lost

    def check_not_lost(self) -> None:
        if self._lost is not None:
            if self.preempted is not None:
                raise AllocationPreempted(f"{self.preempted.message} ({self._lost})", by=self.preempted.by,
                                          cause=self.preempted.cause,
                                          deadline_unix_ms=self.preempted.deadline_unix_ms)  # fmt: skip
            raise AllocationLost(self._lost)

    def check_live(self) -> None:
        """Before using the allocation: raise AllocationLost if lost, AllocationNotFound if released."""
        self.check_not_lost()
        if self.preempted is not None:
            raise self.preempted
        if self.released:
            raise AllocationNotFound(f"allocation {self.allocation_id} was released by this client")

    def mark_released(self, released: bool = True) -> bool:
        """Record that the allocation was released; returns ``released`` (whether the Release call
        that did it ended a live allocation)."""
        with self._lock:
            self.released = True
        return released
