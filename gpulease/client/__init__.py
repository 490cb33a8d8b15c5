"""Python client of the gpulease coordinator.

    from gpulease.client import Client

    with Client("coordinator:50051") as client:
        alloc = client.allocate(gpus=2, memory="16GiB", ttl="60s", owner="train-job")
        ...
        client.release(alloc.id)

Errors are ``gpulease.errors.GpuLeaseError`` subclasses; gRPC stays an implementation detail.
"""

from gpulease.client._sync import DEFAULT_TARGET, Client
from gpulease.client.models import (
    AllocatedGpu,
    Allocation,
    ClusterSummary,
    Container,
    Gpu,
    LogChunk,
    Node,
    NodeSummary,
)

__all__ = [
    "DEFAULT_TARGET",
    "AllocatedGpu",
    "Allocation",
    "Client",
    "ClusterSummary",
    "Container",
    "Gpu",
    "LogChunk",
    "Node",
    "NodeSummary",
]
