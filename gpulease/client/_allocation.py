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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import FrameType, TracebackType
from typing import Any, TypeVar

from gpulease.client import _ops
from gpulease.client._failover import FailoverChannels
from gpulease.client._handle import (
    AllocationHandle,
    ContainerHandleBase,
    SessionBase,
    Waiting,
    log_fallback,
)
from gpulease.client._lease import LeaseTracker
from gpulease.client.models import AllocationInfo, Container, LogChunk, gang_envs
from gpulease.errors import GpuLeaseError

log = logging.getLogger("gpulease.client")

T = TypeVar("T")

# How long stopping the keepalive waits for its thread to notice (it may be inside a call; it is a
# daemon and its answer is ignored after that).
_JOIN_S = 1.0

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

    Raised wherever the main thread is, also inside a gRPC call while the keepalive thread is in
    another. Decided safe (issue 12, point 5), and ``gpuctl run`` relies on it too: gRPC's
    blocking calls wait in short slices and check for signals in between (cygrpc's _latent_event
    calls PyErr_CheckSignals), a handler's exception cancels the call (next_event's on_failure),
    and grpc/_channel.py is written for a signal landing there. tests/etcd/test_client_sigterm.py
    sends SIGTERM at random moments to a process whose main thread is in gRPC calls back to back
    while two other threads make calls: it exits by Terminated with its allocation released every
    time (an abort in malloc once blamed on this did not come back in hundreds of tries, also
    under CPU load).

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
    """The keepalive loop (see _lease.Renewal) on a thread: it only waits and sends."""

    def __init__(self, rpc: FailoverChannels, tracker: LeaseTracker) -> None:
        super().__init__(name=f"gpulease-keepalive-{tracker.allocation_id}", daemon=True)
        self._rpc = rpc
        self._tracker = tracker
        self.stopping = threading.Event()

    def run(self) -> None:
        wait: float | None = 0.0
        while wait is not None and not self.stopping.wait(wait):
            renewal = self._tracker.renewal(self._rpc.timeout)
            error: Exception | None = None
            try:
                self._rpc.run(renewal.op, timeout=renewal.timeout, retry_deadline=renewal.budget, cancel=self.stopping)
            except Exception as exc:
                error = exc
            if self.stopping.is_set():  # released meanwhile: the answer no longer matters
                return
            wait = self._tracker.after_attempt(error)


class Session(SessionBase[FailoverChannels]):
    """What an Allocation holds besides its record: the client's channels, the lease's tracker,
    the keepalive thread and, inside a ``with`` block, the SIGTERM guard."""

    def __init__(self, rpc: FailoverChannels, info: AllocationInfo, *, handle_sigterm: bool) -> None:
        super().__init__(rpc, info)
        self.handle_sigterm = handle_sigterm
        self._keeper: _Keeper | None = None
        self._guard: _SigtermGuard | None = None
        self._lock = threading.Lock()

    def run(self, op: _ops.Op[Any, T]) -> T:
        return self.rpc.run(op)

    def run_stream(self, op: _ops.StreamOp[Any, T]) -> Iterator[T]:
        return self.rpc.run_stream(op)

    def start_keeper(self) -> None:
        with self._lock:
            self.refuse_second_keeper(self._keeper is not None and self._keeper.is_alive())
            self._keeper = _Keeper(self.rpc, self.tracker)
            self._keeper.start()

    def stop_keeper(self) -> None:
        with self._lock:
            keeper, self._keeper = self._keeper, None
        if keeper is None:
            return
        keeper.stopping.set()
        if keeper is not threading.current_thread():
            keeper.join(_JOIN_S)

    def renew(self) -> int:
        with self.tracker.renewing():
            ttl = self.rpc.run(self.tracker.keep_alive_op())
        return ttl

    def release(self, retry_deadline: float | None) -> bool:
        self.stop_keeper()
        if self.tracker.released:
            return False
        released = self.rpc.run(_ops.release(self.tracker.allocation_id), retry_deadline=retry_deadline)
        return self.tracker.mark_released(released)

    def enter(self) -> None:
        super().enter()
        if self.handle_sigterm:
            self._guard = _SigtermGuard.install()

    def exit(self, exc: BaseException | None) -> None:
        guard, self._guard = self._guard, None
        if guard is not None:
            guard.exiting = True
        try:
            self.stop_keeper()
            with self.tracker.final_release(self.rpc.retry_deadline) as budget:
                self.release(budget)
        finally:
            self.entered = False
            if guard is not None:
                guard.restore(exc)


class Allocation(AllocationHandle[Session]):
    """An allocation and a handle on it, bound to the Client that made or fetched it.

    The fields are the coordinator's record (``info``, an AllocationInfo), also read through the
    handle (``alloc.id``). Used as a context manager it keeps the lease alive on a background
    thread and releases the allocation on exit: normal exit, exception, or SIGTERM (see Client's
    ``handle_sigterm``). If the lease cannot be renewed for longer than its TTL, or the
    coordinator says the allocation is gone, it is *lost*: any later use raises AllocationLost,
    saying when and why.
    """

    __slots__ = ()

    def keep_alive(self) -> int:
        """Renew the lease once; returns the TTL granted. AllocationLost if the allocation is gone."""
        return self.session.renew()

    def release(self) -> bool:
        """Release the allocation (stopping its keepalive). True if this call ended it; False if it
        had already ended (released before, here or elsewhere, or expired). Idempotent."""
        return self.session.release(None)

    @contextmanager
    def keepalive(self, ttl: int | None = None) -> Iterator[Allocation]:
        """Keep the lease alive while the block runs, without releasing at the end (for an
        allocation someone else releases). ``ttl`` overrides the TTL that renewals are paced by."""
        self.session.prepare_keepalive(ttl)
        self.session.start_keeper()
        try:
            yield self
        finally:
            self.session.stop_keeper()

    def __enter__(self) -> Allocation:
        self.session.enter()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.session.exit(exc)

    def _start(self, make: Callable[[], _ops.Op[Any, Container]]) -> ContainerHandle:
        session = self.session.live()
        return ContainerHandle(self, session.run(make()))

    def containers(self) -> list[ContainerHandle]:
        """Handles on this allocation's containers."""
        return [ContainerHandle(self, c) for c in self.session.usable().run(_ops.list_containers(self.id))]

    def run_gang(
        self, image: str, command: Sequence[str] = (), *, env: Mapping[str, str] | None = None, **kwargs: Any
    ) -> list[ContainerHandle]:
        """One container per member node of a gang (one for a one-node allocation), in rank order,
        each with ``env`` plus RANK, WORLD_SIZE, MASTER_ADDR (the first member's host) and
        GPULEASE_PEERS (every member's agent address); other arguments as run_container's."""
        return [self.run_container(image, command, env=e, node=node, **kwargs) for node, e in gang_envs(self.info, env)]


class ContainerHandle(ContainerHandleBase[Allocation]):
    __doc__ = ContainerHandleBase.__doc__

    def refresh(self) -> Container:
        return self._found(self.allocation.session.usable().run(_ops.list_containers(self.allocation.id)))

    def wait(self, timeout: float | None = None) -> Container:
        """Block until the container exits, or ``timeout`` seconds pass (None: no limit); returns
        its status (check ``.exited``)."""
        waiting = Waiting(timeout)
        while True:
            session = self.allocation.session.usable()
            status = self._seen(session.run(_ops.wait_container(self.allocation.id, self.id, waiting.step())))
            if waiting.over(status):
                return status

    def logs(self, follow: bool = True) -> Iterator[LogChunk]:
        """The container's output in order; with ``follow``, until it exits."""
        session = self.allocation.session.usable()
        for chunk in session.run_stream(_ops.logs(self.allocation.id, self.id, follow=follow)):
            yield chunk
            session.usable()

    def follow(
        self,
        write: Callable[[LogChunk], object],
        *,
        on_fallback: Callable[[GpuLeaseError], object] | None = None,
    ) -> Container:
        """Stream the container's output to ``write`` until it exits; its final status.

        When the log stream is refused (the node's or the allocation's limit of log streams:
        RateLimited) or breaks, this waits for the container to exit instead (WaitContainer),
        without the rest of its output, after telling ``on_fallback`` why: a running job is never
        given up because its logs could not be streamed. A lost allocation, a container that is
        gone, or a refused caller is raised."""
        try:
            for chunk in self.logs(follow=True):
                write(chunk)
        except GpuLeaseError as e:
            log_fallback(e, self.id, on_fallback)
        return self.wait()

    def stop(self, grace: float = 10.0) -> Container:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns the final status."""
        return self._seen(self.allocation.session.usable().run(_ops.stop_container(self.allocation.id, self.id, grace)))
