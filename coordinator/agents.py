"""gRPC channels from the coordinator to agents, one per address, reused across calls.

Errors an agent returns keep their meaning: the status code and reason metadata are turned
back into the same typed error, which the catalog sends on to the user unchanged.
"""

from __future__ import annotations

import grpc

from gpulease.common import rpc_status
from gpulease.errors import GpuLeaseError
from gpulease.v1 import agent_pb2_grpc


class AgentChannels:
    def __init__(self) -> None:
        self._stubs: dict[str, agent_pb2_grpc.AgentServiceStub] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}

    def stub(self, address: str) -> agent_pb2_grpc.AgentServiceStub:
        if address not in self._stubs:
            channel = grpc.aio.insecure_channel(address)
            self._channels[address] = channel
            self._stubs[address] = agent_pb2_grpc.AgentServiceStub(channel)
        return self._stubs[address]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._stubs.clear()


def agent_error(exc: grpc.aio.AioRpcError, node: str, address: str) -> GpuLeaseError:
    """An agent's failure, decoded by the one rule (gpulease.common.rpc_status)."""
    return rpc_status.decode(exc, f"the agent of node {node} at {address}")
