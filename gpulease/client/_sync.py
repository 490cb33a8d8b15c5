"""The synchronous client: typed methods over CoordinatorService, returning plain models and
allocation handles."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import TypeVar

from google.protobuf.message import Message

from gpulease.client import _ops
from gpulease.client._allocation import Allocation
from gpulease.client._failover import FailoverChannels
from gpulease.client.config import DEFAULT_TARGET, ClientConfig
from gpulease.client.models import ClusterSummary, Container, LogChunk, Node
from gpulease.client.retry import DEFAULT_TIMEOUT_S
from gpulease.v1 import types_pb2 as tpb

M = TypeVar("M", bound=Message)
T = TypeVar("T")


class Client:
    """Talks to the gpulease coordinator(s) at ``targets`` ("host:port", a list, or comma-separated).

    Every call has a deadline: ``timeout`` seconds per attempt. A coordinator that is UNAVAILABLE
    (not running, restarting, or unable to reach etcd) is retried: the next target at once, then
    all of them again with exponential backoff and jitter, for up to ``retry_deadline`` seconds
    per call (default: ``timeout``, so that ``timeout`` bounds how long an unreachable cluster
    takes to report; 0: each target once; e.g. 30 to ride out a coordinator restart). Retries
    resend the same request, so Allocate keeps its request id and cannot allocate twice.
    RunContainer is the exception: it is retried only when the failed attempt never reached a
    coordinator, since a resend could start a second container.

    ``handle_sigterm``: while an Allocation is used as a context manager in the main thread,
    SIGTERM raises ``Terminated`` there, so the allocation is released on the way out.

    Errors are ``gpulease.errors.GpuLeaseError`` subclasses, never gRPC exceptions.
    """

    def __init__(
        self,
        targets: str | Sequence[str] = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        retry_deadline: float | None = None,
        handle_sigterm: bool = True,
        config: ClientConfig | None = None,
    ) -> None:
        """`config` (a ClientConfig) replaces targets, timeout and retry_deadline when given."""
        self.config = config or ClientConfig.of(targets, timeout=timeout, retry_deadline=retry_deadline)
        self._rpc = FailoverChannels(self.config.targets, self.config.timeout, self.config.retry.deadline)
        self.handle_sigterm = handle_sigterm

    @property
    def targets(self) -> tuple[str, ...]:
        return self._rpc.targets

    @property
    def timeout(self) -> float:
        return self._rpc.timeout

    @property
    def retry_deadline(self) -> float:
        return self._rpc.retry_deadline

    def _run(
        self,
        op: _ops.Op[M, T],
        *,
        timeout: float | None = None,
        retry_deadline: float | None = None,
        cancel: threading.Event | None = None,
    ) -> T:
        response = self._rpc.call(
            op.rpc,
            op.request,
            op.response_type,
            timeout=timeout if timeout is not None else op.timeout,
            retry_deadline=retry_deadline,
            resend_safe=op.resend_safe,
            cancel=cancel,
        )
        return op.convert(response)

    def _bind(self, msg: tpb.Allocation) -> Allocation:
        return Allocation._bound(msg, self)

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

        Returns an ``Allocation`` handle; ``with client.allocate(...) as alloc:`` keeps its lease
        alive and releases it on the way out.
        """
        op = _ops.allocate(
            gpus=gpus, cpus=cpus, memory=memory, gpu_model=gpu_model, min_gpu_memory=min_gpu_memory,
            node_selector=node_selector, ttl=ttl, owner=owner, request_id=request_id,
        )  # fmt: skip
        return self._bind(self._run(op))

    def release(self, allocation_id: str) -> bool:
        """End an allocation. False when it was not live (already released or expired)."""
        return self._run(_ops.release(allocation_id))

    def keep_alive(self, allocation_id: str) -> int:
        """Refresh an allocation's lease; returns the remaining TTL in seconds."""
        return self._run(_ops.keep_alive(allocation_id))

    def get_allocation(self, allocation_id: str) -> Allocation:
        """A handle on a live allocation (e.g. made by another process); AllocationNotFound if none."""
        return self._bind(self._run(_ops.get_allocation(allocation_id)))

    def list_allocations(self, node: str = "", owner: str = "") -> list[Allocation]:
        """Live allocations, optionally only those on ``node`` and/or of ``owner``."""
        return [self._bind(a) for a in self._run(_ops.list_allocations(node, owner))]

    def list_nodes(self) -> list[Node]:
        return self._run(_ops.list_nodes())

    def cluster_summary(self) -> ClusterSummary:
        return self._run(_ops.cluster_summary())

    def cordon(self, node: str, cordoned: bool = True) -> Node:
        """Exclude ``node`` from placement (``cordoned=False`` lets it take allocations again)."""
        return self._run(_ops.cordon(node, cordoned))

    # --- containers on an allocation's GPUs (the coordinator forwards to the node's agent) ---

    def run_container(
        self,
        allocation_id: str,
        image: str,
        command: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        volumes: Sequence[_ops.Volume] = (),
        working_dir: str = "",
        shm_size: int | str | None = None,
        name: str = "",
        timeout: float = _ops.RUN_TIMEOUT_S,
    ) -> Container:
        """Start a container on the allocation's GPUs, CPUs and memory; returns once it is running.

        volumes: "SRC:DST[:ro]" strings or (src, dst[, read_only]) tuples. ``timeout`` covers an
        image pull on the node. Not resent after an UNAVAILABLE that may have reached a coordinator.
        """
        op = _ops.run_container(
            allocation_id, image, command, env=env, volumes=volumes, working_dir=working_dir,
            shm_size=shm_size, name=name, timeout=timeout,
        )  # fmt: skip
        return self._run(op)

    def wait_container(self, allocation_id: str, container_id: str, timeout: float = 30.0) -> Container:
        """Block until the container exits or ``timeout`` seconds (1 to 300) pass; returns its status."""
        return self._run(_ops.wait_container(allocation_id, container_id, timeout, self.timeout))

    def stop_container(self, allocation_id: str, container_id: str, grace: float = 10.0) -> Container:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        return self._run(_ops.stop_container(allocation_id, container_id, grace, self.timeout))

    def list_containers(self, allocation_id: str) -> list[Container]:
        return self._run(_ops.list_containers(allocation_id))

    def logs(self, allocation_id: str, container_id: str = "", *, follow: bool = False) -> Iterator[LogChunk]:
        """The container's output in order; with ``follow``, until it exits (no deadline then).

        container_id "" means the allocation's only (or latest) container.
        """
        request = _ops.logs_request(allocation_id, container_id, follow)
        timeout = None if follow else self.timeout
        for chunk in self._rpc.stream("StreamLogs", request, tpb.LogChunk, timeout=timeout):
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
