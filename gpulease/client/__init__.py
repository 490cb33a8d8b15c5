"""Python client of the gpulease coordinator.

    from gpulease.client import Client

    with Client(["coord-a:50051", "coord-b:50051"]) as client:
        with client.allocate(gpus=2, memory="16GiB", ttl="60s", owner="train-job") as alloc:
            job = alloc.run_container("pytorch:latest", ["python", "train.py"])
            status = job.wait()
        # released here, also on an exception or SIGTERM; the lease was kept alive meanwhile

``gpulease.client.aio.AsyncClient`` is the asyncio twin (for Airflow triggers). Errors are
``gpulease.errors.GpuLeaseError`` subclasses; gRPC stays an implementation detail.
``MAX_RECEIVE_BYTES`` is the receive limit the client sets on its channels (cluster-wide answers
outgrow gRPC's default 4 MiB), for tools that open their own channel to a coordinator.
"""

from gpulease.client._allocation import Allocation, ContainerHandle, Terminated
from gpulease.client._sync import Client
from gpulease.client.config import DEFAULT_TARGET, ClientConfig, RetryConfig
from gpulease.client.models import (
    AllocatedGpu,
    AllocationInfo,
    ClusterSummary,
    Container,
    Gpu,
    LogChunk,
    Node,
    NodeSummary,
)
from gpulease.client.retry import MAX_RECEIVE_BYTES

__all__ = [
    "DEFAULT_TARGET",
    "MAX_RECEIVE_BYTES",
    "AllocatedGpu",
    "Allocation",
    "AllocationInfo",
    "Client",
    "ClientConfig",
    "ClusterSummary",
    "Container",
    "ContainerHandle",
    "Gpu",
    "LogChunk",
    "Node",
    "NodeSummary",
    "RetryConfig",
    "Terminated",
]
