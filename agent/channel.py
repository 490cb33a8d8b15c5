"""The agent's channel to its coordinator, renewed when its TLS files change.

With TLS the agent dials the coordinator with its own certificate (mutual TLS) and checks the
coordinator's certificate against the CA and the coordinator's host name, as any TLS client does.
Every call asks ``node_service()`` for its stub. That re-reads the TLS files when they changed
(a stat() of three files, or after SIGHUP: ``TlsFiles.request_reload``), and when they did,
new calls go over a new channel made with the new certificate; the old channel is closed after a
grace, so calls already on it finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

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


class CoordinatorChannel:
    """The agent's channel to ``target``: clear text without ``tls``, else mutual TLS renewed when the
    files change. ``on_reload`` is called (in the event loop) after each renewal."""

    def __init__(
        self,
        target: str,
        tls: TlsFiles | None,
        *,
        options: list[tuple[str, int]] | None = None,
        retire_after: float = RETIRE_AFTER_S,
        on_reload: Callable[[], None] | None = None,
    ) -> None:
        self._target = target
        self._tls = tls
        self._options = list(COORDINATOR_CHANNEL_OPTIONS if options is None else options)
        self._retire_after = retire_after
        self._on_reload = on_reload
        self._generation = tls.generation if tls is not None else 0
        self._channel = self._open()
        self._stub = coordinator_pb2_grpc.NodeServiceStub(self._channel)
        self._retiring: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def target(self) -> str:
        return self._target

    @property
    def generation(self) -> int:
        """The TLS files' generation the current channel was made with (0 without TLS)."""
        return self._generation

    def _open(self) -> grpc.aio.Channel:
        if self._tls is None:
            return grpc.aio.insecure_channel(self._target, options=self._options)
        return grpc.aio.secure_channel(self._target, self._tls.channel_credentials(), options=self._options)

    def node_service(self) -> coordinator_pb2_grpc.NodeServiceStub:
        """The stub for the next call; a new channel first when the TLS files changed."""
        if self._tls is not None and not self._closed:
            self._tls.refresh()
            if self._tls.generation != self._generation:
                self._renew()
        return self._stub

    def _renew(self) -> None:
        assert self._tls is not None
        old = self._channel
        self._generation = self._tls.generation
        self._channel = self._open()
        self._stub = coordinator_pb2_grpc.NodeServiceStub(self._channel)
        log.info(
            "TLS files changed: new calls to the coordinator at %s use a new connection (generation %d); "
            "the old one closes in %.0fs",
            self._target,
            self._generation,
            self._retire_after,
        )
        task = asyncio.get_running_loop().create_task(self._retire(old), name="retire-coordinator-channel")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
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
        await self._channel.close()

    async def __aenter__(self) -> CoordinatorChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
