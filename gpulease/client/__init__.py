"""Python client of the gpulease coordinator.

    from gpulease.client import Client

    with Client(["coord-a:50051", "coord-b:50051"]) as client:
        with client.allocate(gpus=2, memory="16GiB", ttl="60s", owner="train-job") as alloc:
            job = alloc.run_container("pytorch:latest", ["python", "train.py"])
            status = job.wait()
        # released here, also on an exception or SIGTERM; the lease was kept alive meanwhile

``gpulease.client.aio.AsyncClient`` is the asyncio twin (for Airflow triggers). Errors are
``gpulease.errors.GpuLeaseError`` subclasses; gRPC stays an implementation detail.

A secured coordinator (TLS, and a token or a client certificate) takes a ClientConfig:

    config = ClientConfig.of("coord-a:50051", tls=TLSConfig("/etc/gpulease/ca.pem"), token=token)
    with Client(config=config) as client:
        print(client.whoami())      # WhoAmI(principal='user:alice', role='user', ...)

or ``ClientConfig.resolve(None, os.environ)`` for gpuctl's flags' environment variables
(GPULEASE_CA, GPULEASE_TOKEN_FILE, GPULEASE_TOKEN, GPULEASE_CERT, GPULEASE_KEY; see
``gpulease.client.config``). A missing or refused credential raises ``Unauthenticated``, a call the
caller's role or ownership does not allow ``PermissionDenied`` naming the rule; neither is retried.
The token is never written into a log line or an exception message.
``MAX_RECEIVE_BYTES`` is the receive limit the client sets on its channels (cluster-wide answers
outgrow gRPC's default 4 MiB), for tools that open their own channel to a coordinator.
"""

from gpulease.client._allocation import Allocation, ContainerHandle, Terminated
from gpulease.client._sync import Client
from gpulease.client.config import DEFAULT_TARGET, ClientConfig, RetryConfig, TLSConfig
from gpulease.client.models import (
    AllocatedGpu,
    AllocationInfo,
    AuditEntry,
    ClusterSummary,
    Container,
    Event,
    Gpu,
    LogChunk,
    Node,
    NodeSummary,
    PendingInfo,
    PriorityClassInfo,
    Quota,
    QuotaInfo,
    ReservationInfo,
    TokenInfo,
    WhoAmI,
)
from gpulease.client.retry import MAX_RECEIVE_BYTES

__all__ = [
    "DEFAULT_TARGET",
    "MAX_RECEIVE_BYTES",
    "AllocatedGpu",
    "Allocation",
    "AllocationInfo",
    "AuditEntry",
    "Client",
    "ClientConfig",
    "ClusterSummary",
    "Container",
    "ContainerHandle",
    "Event",
    "Gpu",
    "LogChunk",
    "Node",
    "NodeSummary",
    "PendingInfo",
    "PriorityClassInfo",
    "Quota",
    "QuotaInfo",
    "ReservationInfo",
    "RetryConfig",
    "TLSConfig",
    "Terminated",
    "TokenInfo",
    "WhoAmI",
]
