"""The agent's own gRPC server: standard health checking and AgentService.

The servicer is thin: proto in, ContainerService call, proto out. Errors go through the shared
catalog (gpulease/grpc_errors.py), so a coordinator forwarding a call passes them on unchanged.
With TLS files the server speaks mutual TLS only, and every AgentService RPC takes calls from a
coordinator's certificate only (gpulease.agent.security).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gpulease.agent.containers import RUNTIME_HINT, ContainerService
from gpulease.agent.inventory import InventorySource
from gpulease.agent.security import coordinators_only
from gpulease.common.grpc_errors import grpc_errors
from gpulease.common.tls import TlsFiles
from gpulease.errors import Unavailable
from gpulease.v1 import agent_pb2, agent_pb2_grpc
from gpulease.v1 import types_pb2 as tpb

AGENT_SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
AGENT_SERVICE_NAME = AGENT_SERVICE.full_name
# "" is the whole server; probes that name the service get the same answer.
_HEALTH_SERVICES = ("", AGENT_SERVICE_NAME)

Ctx: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


@coordinators_only
class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    # Every RPC of this service checks its caller first (coordinators only, under mutual TLS).
    SERVICE_DESCRIPTOR = AGENT_SERVICE

    def __init__(self, node: str, source: InventorySource, containers: ContainerService | None = None) -> None:
        self._node = node
        self._source = source
        self._containers = containers

    def _service(self) -> ContainerService:
        if self._containers is None:
            raise Unavailable(f"the agent of node {self._node} does not run containers ({RUNTIME_HINT})")
        return self._containers

    @grpc_errors
    async def GetInventory(
        self, request: agent_pb2.GetInventoryRequest, context: Ctx
    ) -> agent_pb2.GetInventoryResponse:
        inventory = await asyncio.to_thread(self._source.collect)
        return agent_pb2.GetInventoryResponse(node=self._node, inventory=inventory)

    @grpc_errors
    async def StartContainer(self, request: agent_pb2.StartContainerRequest, context: Ctx) -> tpb.ContainerStatus:
        return await self._service().start(request.allocation_id, request.revision, request.spec)

    @grpc_errors
    async def StopContainer(self, request: tpb.StopContainerRequest, context: Ctx) -> tpb.ContainerStatus:
        return await self._service().stop(request.ref, request.grace_seconds)

    @grpc_errors
    async def GetContainer(self, request: tpb.ContainerRef, context: Ctx) -> tpb.ContainerStatus:
        return await self._service().get(request)

    @grpc_errors
    async def WaitContainer(self, request: tpb.WaitContainerRequest, context: Ctx) -> tpb.ContainerStatus:
        return await self._service().wait(request.ref, request.timeout_seconds)

    @grpc_errors
    async def StreamLogs(self, request: tpb.StreamLogsRequest, context: Ctx) -> None:  # type: ignore[override]
        # A coroutine writing to the stream (not an async generator) so that the error catalog applies.
        # When the client goes away the handler is cancelled and the log reader is told to stop.
        async with contextlib.aclosing(self._service().logs(request.ref, request.follow)) as chunks:
            async for chunk in chunks:
                await context.write(chunk)

    @grpc_errors
    async def ListContainers(self, request: tpb.ListContainersRequest, context: Ctx) -> tpb.ListContainersResponse:
        return tpb.ListContainersResponse(containers=await self._service().list(request.allocation_id))


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


async def start_server(
    listen: str,
    node: str,
    source: InventorySource,
    containers: ContainerService | None = None,
    *,
    tls: TlsFiles | None = None,
) -> AgentServer:
    """Bind and start; health stays NOT_SERVING until set_serving() (i.e. until registered).

    ``tls``: serve mutual TLS, requiring a client certificate signed by its CA; the files are
    re-read when they change (or after ``tls.request_reload()``) for new connections, while open
    ones keep theirs. None: clear text (the configuration allows it on loopback, or --insecure).
    """
    # No SO_REUSEPORT (grpc's default on Linux): a second agent on the same port must fail, not share it.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    agent_pb2_grpc.add_AgentServiceServicer_to_server(AgentServicer(node, source, containers), server)
    health_servicer = health.aio.HealthServicer()
    for service in _HEALTH_SERVICES:
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        if tls is not None:
            port = server.add_secure_port(listen, tls.server_credentials(require_client_cert=True))
        else:
            port = server.add_insecure_port(listen)
    except RuntimeError as e:
        raise OSError(f"cannot listen on {listen}: {e}") from e
    if port == 0:  # older grpcio reports a failed bind this way instead of raising
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    return AgentServer(server=server, health=health_servicer, port=port)
