"""The synchronous client: typed methods over CoordinatorService, returning plain models."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TypeVar

from gpulease.client import _convert
from gpulease.client._failover import FailoverChannels, parse_targets
from gpulease.client.models import Allocation, ClusterSummary, Container, LogChunk, Node
from gpulease.errors import InvalidRequest
from gpulease.units import parse_duration, parse_size
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import types_pb2 as tpb

DEFAULT_TARGET = "127.0.0.1:50051"
T = TypeVar("T")


def _size(value: int | str | None, what: str) -> int | None:
    if value is None or isinstance(value, int):
        return value
    try:
        return parse_size(value)
    except InvalidRequest as e:
        raise InvalidRequest(f"{what}: {e.message}") from None


def _volume(v: str | tuple[str, str] | tuple[str, str, bool]) -> tpb.VolumeMount:
    if isinstance(v, tuple):
        return tpb.VolumeMount(source=v[0], target=v[1], read_only=bool(v[2]) if len(v) > 2 else False)
    parts = v.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1] or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
        raise InvalidRequest(f"volume {v!r}: expected SRC:DST or SRC:DST:ro")
    return tpb.VolumeMount(source=parts[0], target=parts[1], read_only=len(parts) == 3 and parts[2] == "ro")


def _build(factory: Callable[[], T]) -> T:
    # protobuf rejects ints that do not fit the field (e.g. gpus=2**40) with ValueError/TypeError.
    try:
        return factory()
    except (ValueError, TypeError) as e:
        raise InvalidRequest(f"invalid request: {e}") from None


class Client:
    """Talks to the gpulease coordinator(s) at ``targets`` ("host:port", a list, or comma-separated).

    Each call gets ``timeout`` seconds per coordinator tried. Errors are raised as
    ``gpulease.errors.GpuLeaseError`` subclasses, never as gRPC exceptions.
    """

    def __init__(self, targets: str | Sequence[str] = DEFAULT_TARGET, *, timeout: float = 10.0) -> None:
        self._rpc = FailoverChannels(parse_targets(targets), timeout)

    @property
    def targets(self) -> tuple[str, ...]:
        return self._rpc.targets

    def allocate(
        self,
        gpus: int,
        cpus: int | None = None,
        memory: int | str | None = None,
        gpu_model: str = "",
        min_gpu_memory: int | str | None = None,
        node_selector: Mapping[str, str] | None = None,
        ttl: int | str | None = None,
        owner: str = "",
        request_id: str | None = None,
    ) -> Allocation:
        """Reserve ``gpus`` GPUs (plus CPUs/memory) on one node for ``ttl`` (default: the coordinator's).

        Sizes take bytes or strings like "16GiB"; ttl takes seconds or "60s". Range checks are the
        coordinator's. The request id (a fresh one unless given) makes the call safe to retry: a
        repeat returns the allocation already made instead of a second one.
        """
        memory_bytes = _size(memory, "memory")
        min_gpu_memory_bytes = _size(min_gpu_memory, "min_gpu_memory") or 0
        ttl_seconds = parse_duration(ttl) if isinstance(ttl, str) else (ttl or 0)
        request = _build(
            lambda: pb.AllocateRequest(
                gpus=gpus,
                cpus=cpus,
                memory_bytes=memory_bytes,
                gpu_model=gpu_model,
                min_gpu_memory_bytes=min_gpu_memory_bytes,
                node_selector=dict(node_selector or {}),
                ttl_seconds=ttl_seconds,
                owner=owner,
                request_id=request_id or uuid.uuid4().hex,
            )
        )
        response = self._rpc.call("Allocate", request, pb.AllocateResponse)
        return _convert.allocation(response.allocation)

    def release(self, allocation_id: str) -> bool:
        """End an allocation. False when it was not live (already released or expired)."""
        response = self._rpc.call("Release", pb.ReleaseRequest(allocation_id=allocation_id), pb.ReleaseResponse)
        return response.released

    def keep_alive(self, allocation_id: str) -> int:
        """Refresh an allocation's lease; returns the remaining TTL in seconds."""
        request = pb.KeepAliveRequest(allocation_id=allocation_id)
        return self._rpc.call("KeepAlive", request, pb.KeepAliveResponse).ttl_seconds

    def get_allocation(self, allocation_id: str) -> Allocation:
        request = pb.GetAllocationRequest(allocation_id=allocation_id)
        response = self._rpc.call("GetAllocation", request, pb.GetAllocationResponse)
        return _convert.allocation(response.allocation)

    def list_allocations(self, node: str = "", owner: str = "") -> list[Allocation]:
        """Live allocations, optionally only those on ``node`` and/or of ``owner``."""
        request = pb.ListAllocationsRequest(node=node, owner=owner)
        response = self._rpc.call("ListAllocations", request, pb.ListAllocationsResponse)
        return [_convert.allocation(a) for a in response.allocations]

    def list_nodes(self) -> list[Node]:
        response = self._rpc.call("ListNodes", pb.ListNodesRequest(), pb.ListNodesResponse)
        return [_convert.node(n) for n in response.nodes]

    def cluster_summary(self) -> ClusterSummary:
        request = pb.GetClusterSummaryRequest()
        return _convert.cluster_summary(self._rpc.call("GetClusterSummary", request, pb.GetClusterSummaryResponse))

    def cordon(self, node: str, cordoned: bool = True) -> Node:
        """Exclude ``node`` from placement (``cordoned=False`` lets it take allocations again)."""
        request = pb.CordonNodeRequest(node=node, cordoned=cordoned)
        return _convert.node(self._rpc.call("CordonNode", request, pb.CordonNodeResponse).node)

    # --- containers on an allocation's GPUs (the coordinator forwards to the node's agent) ---

    def run_container(
        self,
        allocation_id: str,
        image: str,
        command: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        volumes: Sequence[str | tuple[str, str] | tuple[str, str, bool]] = (),
        working_dir: str = "",
        shm_size: int | str | None = None,
        name: str = "",
        timeout: float = 900.0,
    ) -> Container:
        """Start a container on the allocation's GPUs, CPUs and memory; returns once it is running.

        volumes: "SRC:DST[:ro]" strings or (src, dst[, read_only]) tuples. ``timeout`` covers an
        image pull on the node.
        """
        spec = _build(
            lambda: tpb.ContainerSpec(
                image=image,
                command=list(command),
                env=dict(env or {}),
                working_dir=working_dir,
                volumes=[_volume(v) for v in volumes],
                shm_size_bytes=_size(shm_size, "shm_size") or 0,
                name=name,
            )
        )
        request = pb.RunContainerRequest(allocation_id=allocation_id, spec=spec)
        return _convert.container(self._rpc.call("RunContainer", request, tpb.ContainerStatus, timeout=timeout))

    def wait_container(self, allocation_id: str, container_id: str, timeout: float = 30.0) -> Container:
        """Block until the container exits or ``timeout`` seconds (at most 300) pass; returns its status."""
        ref = tpb.ContainerRef(allocation_id=allocation_id, container_id=container_id)
        request = tpb.WaitContainerRequest(ref=ref, timeout_seconds=max(1, int(timeout)))
        status = self._rpc.call("WaitContainer", request, tpb.ContainerStatus, timeout=timeout + self._rpc.timeout)
        return _convert.container(status)

    def stop_container(self, allocation_id: str, container_id: str, grace: float = 10.0) -> Container:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        ref = tpb.ContainerRef(allocation_id=allocation_id, container_id=container_id)
        request = tpb.StopContainerRequest(ref=ref, grace_seconds=int(grace))
        status = self._rpc.call("StopContainer", request, tpb.ContainerStatus, timeout=grace + self._rpc.timeout)
        return _convert.container(status)

    def list_containers(self, allocation_id: str) -> list[Container]:
        request = tpb.ListContainersRequest(allocation_id=allocation_id)
        return [
            _convert.container(c)
            for c in self._rpc.call("ListContainers", request, tpb.ListContainersResponse).containers
        ]

    def logs(self, allocation_id: str, container_id: str = "", *, follow: bool = False) -> Iterator[LogChunk]:
        """The container's output in order; with ``follow``, until it exits.

        container_id "" means the allocation's only (or latest) container.
        """
        ref = tpb.ContainerRef(allocation_id=allocation_id, container_id=container_id)
        request = tpb.StreamLogsRequest(ref=ref, follow=follow)
        for chunk in self._rpc.stream(
            "StreamLogs", request, tpb.LogChunk, timeout=None if follow else self._rpc.timeout
        ):
            yield LogChunk(chunk.stream, chunk.data)

    def close(self) -> None:
        self._rpc.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
