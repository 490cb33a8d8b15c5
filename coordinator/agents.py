"""gRPC channels from the coordinator to agents, one per (node, address), reused across calls.

With TLS (``AgentChannels(tls)``) the coordinator dials an agent with its own certificate (the
agent takes container calls from coordinator certificates only) and checks that the agent's
certificate names the node it means to reach: the TLS host name checked is the node's name
(``grpc.ssl_target_name_override``), which an agent certificate carries as a DNS name. So an
address given in RegisterNode cannot send one node's containers to another host: the handshake
fails, and nothing is forwarded.

When the TLS files change (or after SIGHUP), new calls go over new channels made with the new
certificate; old ones are closed after a grace long enough for a start (image pull) in flight.

Errors an agent returns keep their meaning: the status code and reason metadata are turned
back into the same typed error, which the catalog sends on to the user unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from gpulease.common import rpc_status
from gpulease.common.tls import TlsFiles
from gpulease.errors import GpuLeaseError, Unavailable
from gpulease.v1 import agent_pb2_grpc

log = logging.getLogger(__name__)

# Longer than any forwarded call but StreamLogs in follow mode (StartContainer waits up to 900 s
# for an image pull): channels of old TLS files are closed this long after a rotation.
RETIRE_AFTER_S = 960.0
# Words gRPC uses when a TLS handshake with the agent failed (as opposed to no answer at all).
_TLS_FAILURE_WORDS = ("hostname verification", "handshake", "certificate", "ssl")

_Key = tuple[str, str, int]


class AgentChannels:
    def __init__(self, tls: TlsFiles | None = None, *, retire_after: float = RETIRE_AFTER_S) -> None:
        """``tls``: the coordinator's own TLS files (CA, certificate, key); None dials agents in clear text."""
        self._tls = tls
        self._retire_after = retire_after
        self._generation = tls.generation if tls is not None else 0
        self._stubs: dict[_Key, agent_pb2_grpc.AgentServiceStub] = {}
        self._channels: dict[_Key, grpc.aio.Channel] = {}
        self._retiring: set[asyncio.Task[None]] = set()

    def stub(self, node: str, address: str) -> agent_pb2_grpc.AgentServiceStub:
        """The stub for node ``node``'s agent at ``address``; with TLS, the handshake fails unless the
        agent's certificate names ``node``."""
        if self._tls is not None:
            self._tls.refresh()  # a stat() of three files; a read only when they changed
            if self._tls.generation != self._generation:
                self._retire_all()
        key = (node, address, self._generation)
        stub = self._stubs.get(key)
        if stub is None:
            channel = self._open(node, address)
            self._channels[key] = channel
            stub = self._stubs[key] = agent_pb2_grpc.AgentServiceStub(channel)
        return stub

    def _open(self, node: str, address: str) -> grpc.aio.Channel:
        if self._tls is None:
            return grpc.aio.insecure_channel(address)
        # The name checked against the agent's certificate is the node's, whatever address it gave.
        options = [("grpc.ssl_target_name_override", node)]
        return grpc.aio.secure_channel(address, self._tls.channel_credentials(), options=options)

    def _retire_all(self) -> None:
        assert self._tls is not None
        old = list(self._channels.values())
        self._channels.clear()
        self._stubs.clear()
        self._generation = self._tls.generation
        log.info(
            "TLS files changed: new calls to agents use new connections (generation %d); %d old channel(s) "
            "close in %.0fs",
            self._generation,
            len(old),
            self._retire_after,
        )
        if old:
            task = asyncio.get_running_loop().create_task(self._close_later(old), name="retire-agent-channels")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _close_later(self, channels: list[grpc.aio.Channel]) -> None:
        try:
            await asyncio.sleep(self._retire_after)
        finally:
            for channel in channels:
                await channel.close()

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        for task in list(self._retiring):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._stubs.clear()


def agent_error(exc: grpc.aio.AioRpcError, node: str, address: str) -> GpuLeaseError:
    """An agent's failure, decoded by the one rule (gpulease.common.rpc_status); a failed TLS
    handshake says that the agent's certificate may not name the node."""
    peer = f"the agent of node {node} at {address}"
    if rpc_status.reason_of(exc) is None and rpc_status.status_code(exc) == grpc.StatusCode.UNAVAILABLE:
        text = rpc_status.details(exc)
        if any(word in text.lower() for word in _TLS_FAILURE_WORDS):
            return Unavailable(
                f"{peer} failed the TLS handshake, so nothing was sent to it: the agent's certificate may not "
                f"name node {node} (it must carry the DNS name {node!r} and spiffe://gpulease/agent/{node}), "
                f"or may not be signed by the coordinator's CA ({text})"
            )
    return rpc_status.decode(exc, peer)
