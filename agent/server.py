"""The agent's own gRPC server: standard health checking and AgentService."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agent.inventory import InventorySource
from gpulease.v1 import agent_pb2, agent_pb2_grpc

AGENT_SERVICE_NAME = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
# "" is the whole server; probes that name the service get the same answer.
_HEALTH_SERVICES = ("", AGENT_SERVICE_NAME)


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, node: str, source: InventorySource) -> None:
        self._node = node
        self._source = source

    async def GetInventory(
        self, request: agent_pb2.GetInventoryRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.GetInventoryResponse:
        inventory = await asyncio.to_thread(self._source.collect)
        return agent_pb2.GetInventoryResponse(node=self._node, inventory=inventory)


@dataclass
class AgentServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int

    async def set_serving(self) -> None:
        for service in _HEALTH_SERVICES:
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_server(listen: str, node: str, source: InventorySource) -> AgentServer:
    """Bind and start; health stays NOT_SERVING until set_serving() (i.e. until registered)."""
    # No SO_REUSEPORT (grpc's default on Linux): a second agent on the same port must fail, not share it.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(node, source), server)
    health_servicer = health.aio.HealthServicer()
    for service in _HEALTH_SERVICES:
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as e:
        raise OSError(f"cannot listen on {listen}: {e}") from e
    if port == 0:  # older grpcio reports a failed bind this way instead of raising
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    return AgentServer(server=server, health=health_servicer, port=port)
