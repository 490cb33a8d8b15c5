"""What the sync and the asyncio handles share.

An allocation handle *has* the coordinator's record (``info``, an AllocationInfo) and a session:
the channels it sends through and the lease's tracker (gpulease.client._lease), plus what the
sync or asyncio session adds (keepalive thread or task, SIGTERM guard). The record's fields read
through the handle (``alloc.id`` is ``alloc.info.id``). Handles and clients talk through the
session's methods only; neither reaches into the other's private state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import FrozenInstanceError, fields
from typing import Any, Generic, NoReturn, Self, TypeVar, overload

from gpulease.client import _ops
from gpulease.client._calls import ContainerStart
from gpulease.client._failover import Rotation
from gpulease.client._lease import LeaseTracker
from gpulease.client.models import AllocatedGpu, AllocationInfo, AllocationMember, Container
from gpulease.errors import (
    AllocationPreempted,
    DeadlineExceeded,
    GpuLeaseError,
    Internal,
    InvalidRequest,
    RateLimited,
    Unavailable,
)

log = logging.getLogger("gpulease.client")

C = TypeVar("C", bound=Rotation)
S = TypeVar("S", bound="SessionBase[Any]")
A = TypeVar("A", bound="AllocationHandle[Any]")
T = TypeVar("T")

# ContainerHandle.wait() waits in steps this long, checking in between that the lease is not lost.
WAIT_STEP_S = 30.0


class SessionBase(Generic[C]):
    """A handle's link to its client: the channels (``rpc``) and the lease's tracker."""

    def __init__(self, rpc: C, info: AllocationInfo) -> None:
        self.rpc = rpc
        self.tracker = LeaseTracker(info.id, info.ttl_seconds)
        # True while the handle is used as a context manager.
        self.entered = False

    def live(self) -> Self:
        """This session, for a call that needs the allocation live: AllocationLost if lost,
        AllocationNotFound if released."""
        self.tracker.check_live()
        return self

    def usable(self) -> Self:
        """This session, for a call on the allocation's containers: AllocationLost if lost (a
        released allocation's containers can still be read)."""
        self.tracker.check_not_lost()
        return self

    def start_keeper(self) -> None:
        raise NotImplementedError

    def enter(self) -> None:
        """The handle's ``with`` block begins: keep the lease alive meanwhile."""
        self.tracker.check_live()
        if self.entered:
            raise InvalidRequest(f"allocation {self.tracker.allocation_id} is already in use as a context manager")
        self.start_keeper()
        self.entered = True

    def refuse_second_keeper(self, keeping: bool) -> None:
        """``keeping``: a keepalive loop of this handle runs already."""
        if keeping:
            raise InvalidRequest(f"allocation {self.tracker.allocation_id} is already being kept alive")

    def prepare_keepalive(self, ttl: int | None) -> None:
        """Before ``keepalive()`` starts the loop: the allocation must be live; ``ttl``, when given,
        paces the renewals, its time counted from now."""
        self.tracker.check_live()
        if ttl:
            self.tracker.reset(ttl)


class _Field(Generic[T]):
    """A field of the handle's record, read through the handle; read-only, like the record."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, handle: None, owner: type) -> _Field[T]: ...
    @overload
    def __get__(self, handle: AllocationHandle[Any], owner: type) -> T: ...
    def __get__(self, handle: AllocationHandle[Any] | None, owner: type) -> _Field[T] | T:
        if handle is None:
            return self
        value: T = getattr(handle.info, self._name)
        return value

    def __set__(self, handle: AllocationHandle[Any], value: object) -> NoReturn:
        raise FrozenInstanceError(f"cannot assign to field {self._name!r}")


class AllocationHandle(Generic[S]):
    """An allocation record (``info``) and a session bound to the client that made or fetched it.

    The record's fields read through the handle. Equal handles hold equal records; pickled or
    copied, a handle is its record (an AllocationInfo): threads, locks and channels do not travel.
    """

    __slots__ = ("_info", "_session")

    id = _Field[str]()
    node = _Field[str]()
    gpus = _Field[tuple[AllocatedGpu, ...]]()
    cpus = _Field[int]()
    memory_bytes = _Field[int]()
    ttl_seconds = _Field[int]()
    # etcd revision that created the allocation: the fencing token agents check.
    revision = _Field[int]()
    owner = _Field[str]()
    request_id = _Field[str]()
    created_unix_ms = _Field[int]()
    # host:port of the node's agent.
    node_address = _Field[str]()
    # Who made it ("user:alice") and the tenant it counts against.
    principal = _Field[str]()
    tenant = _Field[str]()
    # May be preempted; its priority class; its declared runtime (0 = none).
    preemptible = _Field[bool]()
    priority_class = _Field[str]()
    max_runtime_seconds = _Field[int]()
    # Every node it holds something on, the first member first (a gang has several).
    members = _Field[tuple[AllocationMember, ...]]()

    def __init__(self, info: AllocationInfo, session: S) -> None:
        self._info = info
        self._session = session

    @property
    def preempted(self) -> AllocationPreempted | None:
        """The preemption notice, once a renewal brought one (by whom, why, deadline); else None."""
        return self._session.tracker.preempted

    def on_preempted(self, callback: Callable[[AllocationPreempted], None]) -> None:
        """Call ``callback`` (from the keepalive thread or task) when the allocation is chosen as a
        preemption victim: checkpoint and wind down before its deadline. At once if already told."""
        tracker = self._session.tracker
        tracker.on_preempted = callback
        if tracker.preempted is not None:
            callback(tracker.preempted)

    # Start a container on this allocation's GPUs; see Client.run_container.
    run_container = ContainerStart(_ops.run_container)

    def _start(self, make: Callable[[], _ops.Op[Any, Container]]) -> Any:
        """How this handle sends RunContainer (``make`` builds it once the allocation is known to
        be live): a container handle, or a coroutine of one."""
        raise NotImplementedError

    @property
    def info(self) -> AllocationInfo:
        """The coordinator's record of this allocation."""
        return self._info

    @property
    def session(self) -> S:
        """The handle's link to its client (for the package: container handles call through it)."""
        return self._session

    @property
    def gpu_indexes(self) -> tuple[int, ...]:
        return self._info.gpu_indexes

    def to_dict(self) -> dict[str, Any]:
        return self._info.to_dict()

    # --- state ------------------------------------------------------------------------------------

    @property
    def lost(self) -> bool:
        """True once the lease was lost (see the class doc); it never becomes false again."""
        return self._session.tracker.lost

    @property
    def lost_reason(self) -> str | None:
        return self._session.tracker.lost_reason

    @property
    def released(self) -> bool:
        return self._session.tracker.released

    # --- a value: compared, hashed, shown and copied as its record ---------------------------------

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._info == other._info

    def __hash__(self) -> int:
        return hash(self._info)

    def __repr__(self) -> str:
        return type(self).__name__ + repr(self._info).removeprefix(type(self._info).__name__)

    def __reduce__(self) -> tuple[type[AllocationInfo], tuple[Any, ...]]:
        return AllocationInfo, tuple(getattr(self._info, f.name) for f in fields(AllocationInfo))


class ContainerHandleBase(Generic[A]):
    """A container running on an allocation's GPUs. Every method raises AllocationLost once the
    allocation is lost (the node's agent stops its containers then)."""

    def __init__(self, allocation: A, status: Container) -> None:
        self.allocation = allocation
        self._status = status

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, allocation={self.allocation.id!r}, state={self._status.state!r})"

    @property
    def id(self) -> str:
        return self._status.id

    @property
    def status(self) -> Container:
        """The last status seen (refreshed by wait, stop and refresh)."""
        return self._status

    def _seen(self, status: Container) -> Container:
        self._status = status
        return status

    def _found(self, containers: list[Container]) -> Container:
        """The status of this container among the allocation's (unchanged if it is not there)."""
        for c in containers:
            if c.id == self.id:
                self._status = c
        return self._status


# Log stream failures after which ContainerHandle.follow waits for the container instead: the node's
# or the allocation's log-stream limit (RATE_LIMITED), a stream that broke or could not be opened.
# Anything about the allocation, the container or the caller (lost, not found, refused) is raised.
LOG_FALLBACK_ERRORS: tuple[type[GpuLeaseError], ...] = (RateLimited, Unavailable, DeadlineExceeded, Internal)


def log_fallback(
    error: GpuLeaseError, container_id: str, on_fallback: Callable[[GpuLeaseError], object] | None
) -> None:
    """``follow``'s decision when its log stream failed with ``error``: raise it, or (a refused or
    broken stream) say why and return, so that the caller waits for the container instead."""
    if not isinstance(error, LOG_FALLBACK_ERRORS):
        raise error
    log.info("container %s: no log stream (%s); waiting for it to exit instead", container_id[:12], error.message)
    if on_fallback is not None:
        on_fallback(error)


class Waiting:
    """ContainerHandle.wait's steps: wait up to ``timeout`` seconds (None: no limit) in steps of
    at most WAIT_STEP_S, so that a lost lease is noticed in between."""

    def __init__(self, timeout: float | None) -> None:
        if timeout is not None and not timeout > 0:
            raise InvalidRequest(f"timeout must be positive, got {timeout:g}")
        self._deadline = None if timeout is None else time.monotonic() + timeout

    def step(self) -> float:
        step = WAIT_STEP_S if self._deadline is None else min(WAIT_STEP_S, self._deadline - time.monotonic())
        return max(1.0, step)

    def over(self, status: Container) -> bool:
        return status.exited or (self._deadline is not None and time.monotonic() >= self._deadline)
