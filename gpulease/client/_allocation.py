"""Allocation and container handles of the synchronous client.

with client.allocate(gpus=2, ttl="60s") as alloc:  # a keepalive thread runs meanwhile
    job = alloc.run_container("pytorch:latest", ["python", "train.py"])
    for chunk in job.logs(follow=True):
        ...
    status = job.wait()
# released here: normal exit, exception, or SIGTERM (in the main thread)
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import fields
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

from gpulease.client import _convert, _ops
from gpulease.client._lease import LeaseTracker
from gpulease.client.models import AllocationInfo, Container, LogChunk
from gpulease.errors import GpuLeaseError, InvalidRequest
from gpulease.v1 import types_pb2 as tpb

if TYPE_CHECKING:
    from gpulease.client._sync import Client

log = logging.getLogger("gpulease.client")

# How long __exit__ waits for the keepalive thread to notice it should stop (it may be inside a
# call; it is a daemon and its answer is ignored after that).
_JOIN_S = 1.0
# ContainerHandle.wait() waits in steps this long, checking in between that the lease is not lost.
_WAIT_STEP_S = 30.0

SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM while an Allocation is used as a context manager.

    A SystemExit (exit status 128 + signal number), so ``except Exception`` does not swallow it
    and the ``with`` block unwinds, releasing the allocation.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


class _SigtermGuard:
    """SIGTERM -> Terminated in the main thread, for the duration of an allocation's ``with`` block.

    A previous Python handler is called first (it may raise its own exception, e.g. Airflow's);
    SIG_IGN, or a handler installed outside Python, is left alone. While the allocation is being
    released a SIGTERM is held back, then re-delivered to the previous handler once restored.
    """

    def __init__(self, previous: SignalHandler) -> None:
        self._previous = previous
        self.exiting = False
        self._pending: int | None = None

    @classmethod
    def install(cls) -> _SigtermGuard | None:
        if threading.current_thread() is not threading.main_thread():
            return None
        previous = signal.getsignal(signal.SIGTERM)
        if previous is None or previous == signal.SIG_IGN:
            return None
        guard = cls(previous)
        signal.signal(signal.SIGTERM, guard._handle)
        return guard

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.exiting:
            self._pending = signum
            return
        if callable(self._previous):
            self._previous(signum, frame)
        raise Terminated(signum)

    def restore(self, exc: BaseException | None) -> None:
        if signal.getsignal(signal.SIGTERM) == self._handle:
            signal.signal(signal.SIGTERM, self._previous)
        # A SIGTERM during the release of a block that ended normally (or with an ordinary error)
        # still deserves its handler; one that ends by SystemExit/KeyboardInterrupt is exiting anyway.
        if self._pending is not None and (exc is None or isinstance(exc, Exception)):
            signal.raise_signal(self._pending)


class _Keeper(threading.Thread):
    """Renews the lease at once, then every ttl/3; stops when told to or when the lease is lost."""

    def __init__(self, client: Client, tracker: LeaseTracker) -> None:
        super().__init__(name=f"gpulease-keepalive-{tracker.allocation_id}", daemon=True)
        self._client = client
        self._tracker = tracker
        self.stopping = threading.Event()

    def run(self) -> None:
        tracker, client = self._tracker, self._client
        op = _ops.keep_alive(tracker.allocation_id)
        wait: float | None = 0.0
        while wait is not None and not self.stopping.wait(wait):
            timeout, budget = tracker.attempt_limits(client.timeout)
            err: Exception | None = None
            try:
                client._run(op, timeout=timeout, retry_deadline=budget, cancel=self.stopping)
            except Exception as exc:
                err = exc
            if self.stopping.is_set():  # released meanwhile: the answer no longer matters
                return
            wait = tracker.after_attempt(err)


class _Session:
    """The mutable part of a bound Allocation (the handle itself is a frozen record)."""

    def __init__(self, client: Client, tracker: LeaseTracker) -> None:
        self.client = client
        self.tracker = tracker
        self.keeper: _Keeper | None = None
        self.guard: _SigtermGuard | None = None
        self.entered = False
        self.lock = threading.Lock()

    def start_keeper(self) -> None:
        with self.lock:
            if self.keeper is not None and self.keeper.is_alive():
                raise InvalidRequest(f"allocation {self.tracker.allocation_id} is already being kept alive")
            self.keeper = _Keeper(self.client, self.tracker)
            self.keeper.start()

    def stop_keeper(self) -> None:
        with self.lock:
            keeper, self.keeper = self.keeper, None
        if keeper is None:
            return
        keeper.stopping.set()
        if keeper is not threading.current_thread():
            keeper.join(_JOIN_S)


class Allocation(AllocationInfo):
    """An allocation and a handle on it, bound to the Client that made or fetched it.

    The fields are the coordinator's record (see AllocationInfo). Used as a context manager it
    keeps the lease alive on a background thread and releases the allocation on exit: normal
    exit, exception, or SIGTERM (see Client's ``handle_sigterm``). If the lease cannot be renewed
    for longer than its TTL, or the coordinator says the allocation is gone, it is *lost*: any
    later use raises AllocationLost, saying when and why.
    """

    # Not a dataclass field (this class adds none): fields(), asdict(), ==, hash and replace() see
    # the record only. Constructed by hand (like AllocationInfo) it is a record bound to nothing.
    _session: _Session | None = None

    @classmethod
    def _bound(cls, msg: tpb.Allocation, client: Client) -> Allocation:
        alloc = _convert.allocation(msg, cls)
        alloc._session = _Session(client, LeaseTracker(alloc.id, alloc.ttl_seconds))
        return alloc

    def __reduce__(self) -> tuple[type[AllocationInfo], tuple[Any, ...]]:
        # A handle's thread, lock and client do not travel: pickled or copied, it is the record.
        return AllocationInfo, tuple(getattr(self, f.name) for f in fields(AllocationInfo))

    def _bound_session(self) -> _Session:
        if self._session is None:
            raise InvalidRequest(
                f"allocation {self.id} is a plain record, not bound to a client: use Client.allocate or "
                "Client.get_allocation to get a handle"
            )
        return self._session

    def _live(self) -> _Session:
        session = self._bound_session()
        session.tracker.check_live()
        return session

    # --- state ------------------------------------------------------------------------------------

    @property
    def lost(self) -> bool:
        """True once the lease was lost (see the class doc); it never becomes false again."""
        return self._session is not None and self._session.tracker.lost

    @property
    def lost_reason(self) -> str | None:
        return None if self._session is None else self._session.tracker.lost_reason

    @property
    def released(self) -> bool:
        return self._session is not None and self._session.tracker.released

    # --- lease ------------------------------------------------------------------------------------

    def keep_alive(self) -> int:
        """Renew the lease once; returns the TTL granted. AllocationLost if the allocation is gone."""
        session = self._live()
        try:
            ttl = session.client._run(_ops.keep_alive(self.id))
        except GpuLeaseError as err:
            lost = session.tracker.keepalive_failed(err)
            if lost is not None:
                raise lost from None
            raise
        session.tracker.renewed()
        return ttl

    def release(self) -> bool:
        """Release the allocation (stopping its keepalive). True if this call ended it; False if it
        had already ended (released before, here or elsewhere, or expired). Idempotent."""
        return self._release(None)

    def _release(self, retry_deadline: float | None) -> bool:
        session = self._bound_session()
        session.stop_keeper()
        if session.tracker.released:
            return False
        released = session.client._run(_ops.release(self.id), retry_deadline=retry_deadline)
        session.tracker.mark_released()
        return released

    @contextmanager
    def keepalive(self, ttl: int | None = None) -> Iterator[Allocation]:
        """Keep the lease alive while the block runs, without releasing at the end (for an
        allocation someone else releases). ``ttl`` overrides the TTL that renewals are paced by."""
        session = self._live()
        if ttl:
            session.tracker.reset(ttl)
        session.start_keeper()
        try:
            yield self
        finally:
            session.stop_keeper()

    def __enter__(self) -> Allocation:
        session = self._live()
        if session.entered:
            raise InvalidRequest(f"allocation {self.id} is already in use as a context manager")
        session.start_keeper()
        session.entered = True
        if session.client.handle_sigterm:
            session.guard = _SigtermGuard.install()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        session = self._bound_session()
        guard, session.guard = session.guard, None
        if guard is not None:
            guard.exiting = True
        try:
            session.stop_keeper()
            # Past the lease's end the GPUs come back anyway: no point retrying longer than that.
            budget = min(session.client.retry_deadline, max(session.tracker.time_left(), 1.0))
            try:
                self._release(budget)
            except GpuLeaseError as err:
                log.warning("could not release allocation %s (%s); its lease expires within %gs",
                            self.id, err.message, session.tracker.ttl)  # fmt: skip
            if session.tracker.lost:
                log.warning("%s", session.tracker.lost_reason)
        finally:
            session.entered = False
            if guard is not None:
                guard.restore(exc)

    # --- containers -------------------------------------------------------------------------------

    def run_container(
        self,
        image: str,
        command: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        volumes: Sequence[_ops.Volume] = (),
        working_dir: str = "",
        shm_size: int | str | None = None,
        name: str = "",
        timeout: float = _ops.RUN_TIMEOUT_S,
    ) -> ContainerHandle:
        """Start a container on this allocation's GPUs; returns once it runs. See Client.run_container."""
        session = self._live()
        status = session.client.run_container(
            self.id, image, command, env=env, volumes=volumes, working_dir=working_dir, shm_size=shm_size,
            name=name, timeout=timeout,
        )  # fmt: skip
        return ContainerHandle(self, status)

    def containers(self) -> list[ContainerHandle]:
        """Handles on this allocation's containers."""
        session = self._bound_session()
        session.tracker.check_not_lost()
        return [ContainerHandle(self, c) for c in session.client.list_containers(self.id)]

    def _check_containers_usable(self) -> Client:
        session = self._bound_session()
        session.tracker.check_not_lost()
        return session.client


class ContainerHandle:
    """A container running on an allocation's GPUs. Every method raises AllocationLost once the
    allocation is lost (the node's agent stops its containers then)."""

    def __init__(self, allocation: Allocation, status: Container) -> None:
        self.allocation = allocation
        self._status = status

    def __repr__(self) -> str:
        return f"ContainerHandle(id={self.id!r}, allocation={self.allocation.id!r}, state={self._status.state!r})"

    @property
    def id(self) -> str:
        return self._status.id

    @property
    def status(self) -> Container:
        """The last status seen (refreshed by wait, stop and refresh)."""
        return self._status

    def refresh(self) -> Container:
        client = self.allocation._check_containers_usable()
        for c in client.list_containers(self.allocation.id):
            if c.id == self.id:
                self._status = c
        return self._status

    def wait(self, timeout: float | None = None) -> Container:
        """Block until the container exits, or ``timeout`` seconds pass (None: no limit); returns
        its status (check ``.exited``)."""
        if timeout is not None and not timeout > 0:
            raise InvalidRequest(f"timeout must be positive, got {timeout:g}")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            client = self.allocation._check_containers_usable()
            step = _WAIT_STEP_S if deadline is None else min(_WAIT_STEP_S, deadline - time.monotonic())
            self._status = client.wait_container(self.allocation.id, self.id, timeout=max(1.0, step))
            if self._status.exited or (deadline is not None and time.monotonic() >= deadline):
                return self._status

    def logs(self, follow: bool = True) -> Iterator[LogChunk]:
        """The container's output in order; with ``follow``, until it exits."""
        client = self.allocation._check_containers_usable()
        for chunk in client.logs(self.allocation.id, self.id, follow=follow):
            yield chunk
            self.allocation._check_containers_usable()

    def stop(self, grace: float = 10.0) -> Container:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns the final status."""
        client = self.allocation._check_containers_usable()
        self._status = client.stop_container(self.allocation.id, self.id, grace=grace)
        return self._status
