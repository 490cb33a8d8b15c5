"""Raw gRPC callers of a secure LocalCluster: by bearer token on the TLS port, or by certificate on
the mutual-TLS port. Tests of the coordinator's security speak gRPC directly, so that what is
checked is the server, not the client library's handling."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from gpulease.common import pki
from gpulease.dev.cluster import LocalCluster
from gpulease.v1 import coordinator_pb2 as pb
from tests.support import harness


def channel(
    cluster: LocalCluster, address: str, cert: pki.Issued | None = None, ca: Path | None = None
) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        (ca or cluster.ca_file).read_bytes(),
        cert.key.read_bytes() if cert else None,
        cert.cert.read_bytes() if cert else None,
    )
    return grpc.secure_channel(address, creds)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@dataclass
class Caller:
    """Calls every coordinator RPC by name with this caller's credential: caller.Allocate(req)."""

    name: str
    stub: Any  # harness.AnyService
    metadata: tuple[tuple[str, str], ...] = ()

    def __getattr__(self, rpc: str) -> Any:
        method = getattr(self.stub, rpc)

        def call(request: Any, **kw: Any) -> Any:
            kw.setdefault("timeout", 10)
            return method(request, metadata=self.metadata, **kw)

        return call


def token_caller(
    cluster: LocalCluster, name: str, token: str, address: str | None = None
) -> tuple[Caller, grpc.Channel]:
    ch = channel(cluster, address or cluster.coordinator_address)
    return Caller(name, harness.AnyService(ch), bearer(token)), ch


def make_token(admin: Caller, name: str, role: str, tenant: str = "") -> str:
    return str(admin.CreateToken(pb.CreateTokenRequest(name=name, role=role, tenant=tenant)).token)
