"""The agent's channel to its coordinators, renewed when its TLS files change.

With TLS the agent dials the coordinator with its own certificate (mutual TLS) and checks the
coordinator's certificate against the CA and the coordinator's host name, as any TLS client does.
Every call asks ``node_service()`` for its stub. That re-reads the TLS files when they changed
(a stat() of three files, or after SIGHUP: ``TlsFiles.request_reload``), and when they did,
new calls go over a new channel made with the new certificate; the old channel is closed after a
grace, so calls already on it finish.

High availability (issue 17): the channel takes every coordinator replica's address. Replicas
share all state through etcd, so any of them answers any call (a heartbeat renews the node's
lease whichever replica receives it). Calls go to one address at a time; a call there that ends
UNAVAILABLE or DEADLINE_EXCEEDED (no connection, a replica gone or hung, or one that lost etcd)
moves the channel to the next address, so the next call goes there. The channel retries nothing
itself: the callers' loops do (the registrar retries a failed heartbeat on the next address at
once). Each address keeps its own connection, opened when first used and renewed on rotation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import grpc

from gpulease.common.tls import TlsFiles
from gpulease.v1 import coordinator_pb2_grpc

log = logging.getLogger(__name__)

# Reconnect to the coordinator quickly after an outage: enforcement and fencing depend on it.
COORDINATOR_CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
# Calls to the coordinator last at most a heartbeat's or a fencing check's deadline (10 s): an
# old channel outlives them comfortably.
RETIRE_AFTER_S = 60.0
# What says that the replica called did not answer (rather than answered with an error): the next
# call goes to the next replica.
FAILOVER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class NodeServiceSource(Protocol):
    """Where a caller gets the coordinator's NodeService stub for its next call."""

    def node_service(self) -> coordinator_pb2_grpc.NodeServiceStub: ...


class FixedChannel:
    """One channel for good (no TLS rotation): what a plain ``grpc.aio.Channel`` is wrapped in."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = coordinator_pb2_grpc.NodeServiceStub(channel)

    def node_service(self) -> coordinator_pb2_grpc.NodeServiceStub:
        return self._stub


def node_service_source(channel: grpc.aio.Channel | NodeServiceSource) -> NodeServiceSource:
    """A channel renewed on rotation as it is; a plain channel as a fixed one."""
    if isinstance(channel, grpc.aio.Channel):
        return FixedChannel(channel)
    return channel


class _Watch(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Sees how each call on one address's connection ended: FAILOVER_CODES call ``on_failure``.
    The caller gets the call's own outcome unchanged."""

    def __init__(self, on_failure: Callable[[grpc.aio.AioRpcError], None]) -> None:
        self._on_failure = on_failure

    async def intercept_unary_unary(
        self,
        continuation: Callable[[Any, Any], Awaitable[grpc.aio.UnaryUnaryCall[Any, Any]]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> grpc.aio.UnaryUnaryCall[Any, Any]:
        call = await continuation(client_call_details, request)
        try:
            await call  # the caller awaits it again and gets the same answer or error
        except grpc.aio.AioRpcError as e:
            if e.code() in FAILOVER_CODES:
                self._on_failure(e)
        return call


class CoordinatorChannel:
    """The agent's channel to ``target`` (one HOST:PORT, several comma-separated, or a sequence of
    them): clear text without ``tls``, else mutual TLS renewed when the files change. ``on_reload``
    is called (in the event loop) after each renewal. ``purpose`` names the calls it carries in
    the line logged when it moves to another address."""

    def __init__(
        self,
        target: str | Sequence[str],
        tls: TlsFiles | None,
        *,
        options: list[tuple[str, int]] | None = None,
        retire_after: float = RETIRE_AFTER_S,
        on_reload: Callable[[], None] | None = None,
        purpose: str = "calls",
    ) -> None:
        targets = target.split(",") if isinstance(target, str) else list(target)
        self._targets = tuple(dict.fromkeys(t.strip() for t in targets if t.strip()))
        if not self._targets:
            raise ValueError(f"no coordinator address in {target!r}")
        self._tls = tls
        self._options = list(COORDINATOR_CHANNEL_OPTIONS if options is None else options)
        self._retire_after = retire_after
        self._on_reload = on_reload
        self._purpose = purpose
        self._generation = tls.generation if tls is not None else 0
        self._current = 0
        # Per address (by index), once first used: its connection and stub, made with _generation.
        self._channels: dict[int, grpc.aio.Channel] = {}
        self._stubs: dict[int, coordinator_pb2_grpc.NodeServiceStub] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._closed = False
        self.switches = 0
        self._connect(self._current)

    @property
    def target(self) -> str:
        """The address the next call goes to."""
        return self._targets[self._current]

    @property
    def targets(self) -> tuple[str, ...]:
        return self._targets

    @property
    def generation(self) -> int:
        """The TLS files' generation the current channel was made with (0 without TLS)."""
        return self._generation

    def _open(self, index: int) -> grpc.aio.Channel:
        target = self._targets[index]
        # Only with several addresses: a lone coordinator has nowhere to fail over to.
        watch = [_Watch(lambda e: self._unreachable(index, e))] if len(self._targets) > 1 else None
        if self._tls is None:
            return grpc.aio.insecure_channel(target, options=self._options, interceptors=watch)
        credentials = self._tls.channel_credentials()
        return grpc.aio.secure_channel(target, credentials, options=self._options, interceptors=watch)

    def _connect(self, index: int) -> grpc.aio.Channel | None:
        """Open ``index``'s connection (with the current TLS files); the one it replaces, if any."""
        old = self._channels.get(index)
        self._channels[index] = channel = self._open(index)
        self._stubs[index] = coordinator_pb2_grpc.NodeServiceStub(channel)
        return old

    def node_service(self) -> coordinator_pb2_grpc.NodeServiceStub:
        """The stub for the next call, to the current address; a new channel first when the TLS files
        changed (or when the address has none yet)."""
        if self._tls is not None and not self._closed:
            self._tls.refresh()
            if self._tls.generation != self._generation:
                self._renew()
        if self._current not in self._stubs and not self._closed:
            self._connect(self._current)
        return self._stubs[self._current]

    def _unreachable(self, index: int, error: grpc.aio.AioRpcError) -> None:
        # Several calls may fail on the same address at once: only the first moves the channel on.
        if index != self._current or self._closed:
            return
        self._current = (index + 1) % len(self._targets)
        self.switches += 1
        log.warning(
            "coordinator %s unreachable (%s: %s); %s now go to %s",
            self._targets[index],
            error.code().name,
            error.details() or "",
            self._purpose,
            self.target,
        )

    def _renew(self) -> None:
        assert self._tls is not None
        self._generation = self._tls.generation
        # Every address's connection: the others would otherwise be used with the old certificate.
        for index in list(self._channels):
            old = self._connect(index)
            if old is not None:
                task = asyncio.get_running_loop().create_task(self._retire(old), name="retire-coordinator-channel")
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
        log.info(
            "TLS files changed: new calls to the coordinator at %s use a new connection (generation %d); "
            "the old one closes in %.0fs",
            ", ".join(self._targets[i] for i in sorted(self._channels)),
            self._generation,
            self._retire_after,
        )
        if self._on_reload is not None:
            self._on_reload()

    async def _retire(self, channel: grpc.aio.Channel) -> None:
        try:
            await asyncio.sleep(self._retire_after)
        finally:
            await channel.close()

    async def close(self) -> None:
        self._closed = True
        for task in list(self._retiring):
            task.cancel()
        for task in list(self._retiring):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for channel in self._channels.values():
            await channel.close()

    async def __aenter__(self) -> CoordinatorChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
