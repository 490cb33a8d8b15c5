"""What may run on this node, as the coordinator (and so etcd) says: fencing tokens and vouchers.

The agent never trusts a caller's word that an allocation is live. Before it creates a container
it reads the allocation through the coordinator (GetAllocation is a linearizable etcd read) and
requires that it is live, on this node, and at the revision (fencing token) the caller carries.
The container's GPUs, CPUs and memory then come from that record, never from the caller.

``Vouchers`` remembers when the coordinator last confirmed each allocation and with which TTL:
the enforcer uses it to stop containers the agent can no longer vouch for during an outage.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import grpc

from gpulease.agent.channel import NodeServiceSource, node_service_source
from gpulease.common import rpc_status
from gpulease.common.settings import AGENT_CALL_TIMEOUT_S, MIN_TTL_S
from gpulease.errors import (
    AllocationNotFound,
    GpuLeaseError,
    InvalidRequest,
    StaleFencingToken,
    Unavailable,
)
from gpulease.v1.coordinator_pb2 import GetAllocationRequest, ListAllocationsRequest
from gpulease.v1.types_pb2 import Allocation

log = logging.getLogger(__name__)

# A fencing check is on the StartContainer path: fail fast rather than hang the caller.
DEFAULT_RPC_TIMEOUT_S = AGENT_CALL_TIMEOUT_S
# The shortest TTL an allocation can have (the coordinator refuses shorter ones): assumed for an
# allocation the agent has never seen a record of.
MIN_ALLOCATION_TTL_S = float(MIN_TTL_S)


class CoordinatorClient:
    """The two reads the agent needs, with errors turned into gpulease errors.

    Anything that means "the coordinator could not answer" (no connection, deadline, the
    coordinator's own UNAVAILABLE) becomes ``Unavailable``; an answer the coordinator gave
    (NOT_FOUND, INVALID_ARGUMENT, ...) keeps its class.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel | NodeServiceSource,
        address: str,
        *,
        timeout: float = DEFAULT_RPC_TIMEOUT_S,
    ) -> None:
        # A CoordinatorChannel (renewed when the TLS files change), or one plain channel.
        self._channel = node_service_source(channel)
        self._address = address
        self._timeout = timeout

    @property
    def address(self) -> str:
        # The replica the channel calls now (a CoordinatorChannel fails over between several).
        return str(getattr(self._channel, "target", self._address))

    async def get_allocation(self, allocation_id: str, *, timeout: float | None = None) -> Allocation | None:
        """The live allocation, or None when it is not live (released, expired, never existed)."""
        try:
            response = await self._channel.node_service().GetNodeAllocation(
                GetAllocationRequest(allocation_id=allocation_id), timeout=timeout or self._timeout
            )
        except grpc.aio.AioRpcError as e:
            err = self._error(e, f"GetAllocation({allocation_id})")
            if isinstance(err, AllocationNotFound):
                return None
            raise err from None
        allocation: Allocation = response.allocation
        return allocation

    async def list_allocations(self, node: str, *, timeout: float | None = None) -> list[Allocation]:
        """Every live allocation on ``node`` (read from etcd by the coordinator)."""
        try:
            response = await self._channel.node_service().ListNodeAllocations(
                ListAllocationsRequest(node=node), timeout=timeout or self._timeout
            )
        except grpc.aio.AioRpcError as e:
            raise self._error(e, f"ListAllocations(node={node})") from None
        return list(response.allocations)

    def _error(self, e: grpc.aio.AioRpcError, call: str) -> GpuLeaseError:
        # The one rule (gpulease.common.rpc_status): "did not answer" is Unavailable, so a fence never
        # starts anything on a guess; the coordinator's own answers keep their class.
        return rpc_status.decode(e, f"coordinator at {self._address}", call)


@dataclass(frozen=True)
class Voucher:
    allocation_id: str
    revision: int
    ttl_seconds: float
    gpu_indexes: tuple[int, ...]
    # time.monotonic() when the coordinator last said the allocation was live (the request's start).
    confirmed_at: float


class Vouchers:
    """When the coordinator last confirmed each allocation of this node, and its TTL."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # Copy on write, each write under the lock: fences (main loop), the enforcer (control loop)
        # and the inventory thread use it from different threads.
        self._lock = threading.Lock()
        self._by_id: dict[str, Voucher] = {}
        self._last_list: float | None = None
        self._started = clock()

    def now(self) -> float:
        return self._clock()

    def confirm(self, alloc: Allocation, at: float) -> None:
        """One allocation was live at ``at`` (a fencing check)."""
        with self._lock:
            current = self._by_id.get(alloc.id)
            if current is None or current.confirmed_at <= at:
                # Copy on write: the inventory thread reads the mapping while the loop updates it.
                self._by_id = {**self._by_id, alloc.id: _voucher(alloc, at)}

    def replace(self, allocs: Iterable[Allocation], at: float) -> None:
        """The complete list of the node's live allocations as of ``at``: anything else is not live."""
        fresh = {a.id: _voucher(a, at) for a in allocs}
        with self._lock:
            # A fencing check that finished after the list began is newer news: keep it.
            for alloc_id, v in self._by_id.items():
                if alloc_id not in fresh and v.confirmed_at > at:
                    fresh[alloc_id] = v
            self._by_id = fresh
            self._last_list = at

    def reaffirm(self, allocation_ids: Iterable[str], at: float) -> None:
        """The coordinator said at ``at`` that the node's allocations have not changed since the
        last list: those of ``allocation_ids`` (that list's) are still live, nothing else is."""
        ids = set(allocation_ids)
        with self._lock:
            self._by_id = {
                k: (replace(v, confirmed_at=at) if k in ids and v.confirmed_at < at else v)
                for k, v in self._by_id.items()
            }
            if self._last_list is not None:
                self._last_list = max(self._last_list, at)

    def get(self, allocation_id: str) -> Voucher | None:
        return self._by_id.get(allocation_id)

    @property
    def last_list(self) -> float | None:
        """When the last successful list of the node's allocations began, or None."""
        return self._last_list

    def holders(self) -> dict[int, str]:
        """GPU index -> the allocation holding it, as last vouched for (metrics)."""
        return {i: alloc_id for alloc_id, v in self._by_id.items() for i in v.gpu_indexes}

    def allocated_gpu_indexes(self) -> frozenset[int]:
        return frozenset(i for v in self._by_id.values() for i in v.gpu_indexes)

    def unvouched_for(self, allocation_id: str) -> tuple[float, float]:
        """(seconds since the allocation was last confirmed live, its TTL).

        An allocation with no record counts from the last successful list (or the agent's start),
        with the shortest TTL an allocation can have.
        """
        v = self._by_id.get(allocation_id)
        if v is not None:
            return self._clock() - v.confirmed_at, v.ttl_seconds
        since = self._last_list if self._last_list is not None else self._started
        return self._clock() - since, MIN_ALLOCATION_TTL_S


def _voucher(alloc: Allocation, at: float) -> Voucher:
    ttl = float(alloc.ttl_seconds or MIN_ALLOCATION_TTL_S)
    return Voucher(alloc.id, alloc.revision, ttl, tuple(g.index for g in alloc.gpus), at)


class Fence:
    """Checks a fencing token against the coordinator before anything is created."""

    def __init__(self, coordinator: CoordinatorClient, node: str, vouchers: Vouchers) -> None:
        self._coordinator = coordinator
        self._node = node
        self._vouchers = vouchers

    async def confirm(self, allocation_id: str, revision: int) -> Allocation:
        """The live allocation record, if ``allocation_id`` is live on this node at ``revision``.

        StaleFencingToken when it is not live, is on another node, or has another revision;
        Unavailable when the coordinator cannot be asked (nothing is ever started unvouched).
        """
        if revision <= 0:
            raise InvalidRequest(f"revision (the allocation's fencing token) must be positive, got {revision}")
        asked_at = self._vouchers.now()
        try:
            alloc = await self._coordinator.get_allocation(allocation_id)
        except Unavailable as e:
            raise Unavailable(
                f"cannot confirm allocation {allocation_id} with the coordinator, so no container is started: "
                f"{e.message}"
            ) from None
        if alloc is None:
            raise StaleFencingToken(
                f"stale fencing token for allocation {allocation_id}: expected a live allocation at revision "
                f"{revision}, but it is not live (released, expired or never existed)"
            )
        if alloc.node != self._node:
            raise StaleFencingToken(
                f"allocation {allocation_id} is on node {alloc.node!r}, not on this node {self._node!r}: "
                "refusing to start its container here"
            )
        if alloc.revision != revision:
            raise StaleFencingToken(
                f"stale fencing token for allocation {allocation_id}: the request carries revision {revision}, "
                f"the live allocation has revision {alloc.revision}"
            )
        self._vouchers.confirm(alloc, asked_at)
        return alloc
