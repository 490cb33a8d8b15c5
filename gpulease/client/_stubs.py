"""One channel's stubs for every coordinator service, picked by RPC name.

The coordinator's API is split by audience (users, agents, operators: see coordinator.proto), and
the client speaks to two of them (CoordinatorService, AdminService). Callers name the RPC only;
the service comes from the proto's own descriptors, so a moved RPC needs no change here. RPC names
are unique across the services (tests/unit/test_proto_generated.py checks it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gpulease.v1 import coordinator_pb2, coordinator_pb2_grpc

SERVICE_OF: dict[str, str] = {
    method.name: service.name
    for service in coordinator_pb2.DESCRIPTOR.services_by_name.values()
    for method in service.methods
}


class Stubs:
    def __init__(self, channel: Any) -> None:
        self._by_service = {
            name: getattr(coordinator_pb2_grpc, f"{name}Stub")(channel) for name in sorted(set(SERVICE_OF.values()))
        }

    def method(self, rpc: str) -> Callable[..., Any]:
        service = SERVICE_OF.get(rpc)
        if service is None:
            raise AttributeError(f"no coordinator service has an RPC named {rpc!r}")
        return getattr(self._by_service[service], rpc)  # type: ignore[no-any-return]
