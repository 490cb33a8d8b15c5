"""Container runtime interface. Only agent/runtime/docker_runtime.py imports docker.

The agent's container service talks to this Protocol; the methods are synchronous (the Docker
SDK is) and the service runs them in threads. Every container gpulease starts carries labels
(LABEL_*) from which a restarted agent rebuilds its state: Docker is the source of truth for
what runs, etcd (through the coordinator) for what may run.
"""

from __future__ import annotations

import builtins
import re
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

LABEL_MANAGED = "io.gpulease.managed"  # "true"
LABEL_ALLOCATION = "io.gpulease.allocation"
LABEL_REVISION = "io.gpulease.revision"  # the fencing token it was started under
LABEL_NODE = "io.gpulease.node"
LABEL_GPUS = "io.gpulease.gpus"  # comma-separated indexes
# Comma-separated UUIDs, in LABEL_GPUS' order: indexes can change across reboots, UUIDs do not.
LABEL_GPU_UUIDS = "io.gpulease.gpu-uuids"
# Who the allocation belongs to ("user:alice") and its tenant, as the coordinator recorded them:
# an operator on the GPU server can tell whose container it is without asking the coordinator.
LABEL_OWNER = "io.gpulease.owner"
LABEL_TENANT = "io.gpulease.tenant"
LABEL_STOP_REASON = "io.gpulease.stop-reason"  # not a Docker label: kept in ContainerInfo.error

# What the user may not set in env (every NVIDIA_* variable, and CUDA_VISIBLE_DEVICES) is decided by
# gpulease.common.container_policy.reserved_env (rule 'env-reserved').

ContainerStateName = Literal["created", "running", "exited"]

_NAME_NOT_OK = re.compile(r"[^a-zA-Z0-9_.-]+")


def default_name(allocation_id: str) -> str:
    """gpulease-<allocation>-<random>, for a container whose caller named none.

    Docker names allow [a-zA-Z0-9][a-zA-Z0-9_.-]*, so anything else in the id becomes '-'. The
    random suffix lets an allocation run several unnamed containers without a name clash.
    """
    safe = _NAME_NOT_OK.sub("-", allocation_id).strip("-.")[:64] or "allocation"
    return f"gpulease-{safe}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Volume:
    source: str
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class ContainerLaunch:
    """Everything needed to start one container; GPUs/CPUs/memory come from the allocation."""

    allocation_id: str
    revision: int
    node: str
    gpu_uuids: tuple[str, ...]
    gpu_indexes: tuple[int, ...]
    cpus: int
    memory_bytes: int
    image: str
    command: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    working_dir: str = ""
    volumes: tuple[Volume, ...] = ()
    shm_size_bytes: int = 0
    name: str = ""
    # CPUs close to the GPUs (Linux cpulist), "" when unknown: becomes the cpuset.
    cpuset: str = ""
    network: str = "bridge"
    owner: str = ""
    tenant: str = ""


@dataclass(frozen=True)
class VolumeInfo:
    """A named volume as Docker describes it."""

    name: str
    driver: str
    options: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    created_unix_ms: int = 0


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    name: str
    allocation_id: str
    revision: int
    state: ContainerStateName
    exit_code: int | None
    image: str
    gpu_indexes: tuple[int, ...]
    started_unix_ms: int = 0
    finished_unix_ms: int = 0
    restart_count: int = 0
    # Host PID of the container's init process (0 when not running): for GPU process attribution.
    pid: int = 0
    # From LABEL_GPU_UUIDS; empty for containers started before that label existed.
    gpu_uuids: tuple[str, ...] = ()


class ContainerRuntime(Protocol):
    # Two steps, not one: a pull can take minutes, and the agent must check the fencing token
    # after it, right before the container is created (agent/containers.py).
    def ensure_image(self, image: str) -> None:
        """Pull the image if it is missing; ImageUnavailable when it cannot be pulled."""
        ...

    def create_and_start(self, launch: ContainerLaunch) -> ContainerInfo:
        """Create and start the container; never pulls (ImageUnavailable if the image is missing)."""
        ...

    def stop(self, container_id: str, grace_seconds: float) -> ContainerInfo:
        """SIGTERM, then SIGKILL after grace_seconds. Stopping a stopped container is a no-op."""
        ...

    def get(self, container_id: str) -> ContainerInfo:
        """ContainerNotFound if it does not exist or is not managed by gpulease."""
        ...

    def remove(self, container_id: str) -> None:
        """Delete a managed container and its writable layer; missing is a no-op."""
        ...

    def list(self, allocation_id: str = "") -> list[ContainerInfo]:
        """gpulease-managed containers (by label), optionally of one allocation, running or not."""
        ...

    def wait(self, container_id: str, timeout_seconds: float) -> ContainerInfo:
        """Until the container exits or the timeout passes; returns its status either way."""
        ...

    def logs(self, container_id: str, follow: bool) -> Iterator[tuple[str, bytes]]:
        """("stdout" | "stderr", bytes) chunks in order; with follow, until the container exits."""
        ...

    def pids(self, container_id: str) -> frozenset[int]:
        """Host PIDs of every process in the container (empty when not running)."""
        ...

    # Named volumes: the agent judges a volume from what Docker says of it before mounting it, and
    # makes tenant volumes itself (labelled LABEL_MANAGED and LABEL_TENANT) so that it can remove them.

    def inspect_volume(self, name: str) -> VolumeInfo | None:
        """The volume, or None when there is none of that name."""
        ...

    def create_volume(self, name: str, labels: Mapping[str, str]) -> VolumeInfo:
        """A volume on the local driver with no options and these labels; as it is if it exists."""
        ...

    def list_volumes(self, unused_only: bool) -> builtins.list[VolumeInfo]:
        """Volumes labelled LABEL_MANAGED=true; with unused_only, those no container refers to."""
        ...

    def remove_volume(self, name: str) -> bool:
        """Remove a volume no container refers to; False if one does (or it is gone)."""
        ...
