"""Container runtime interface. Only agent/runtime/docker_runtime.py imports docker.

The agent's container service talks to this Protocol; the methods are synchronous (the Docker
SDK is) and the service runs them in threads. Every container gpulease starts carries labels
(LABEL_*) from which a restarted agent rebuilds its state: Docker is the source of truth for
what runs, etcd (through the coordinator) for what may run.
"""

from __future__ import annotations

import builtins
import contextvars
import re
import secrets
import threading
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

# How a container runs (issue 14, part B): set by the agent for every container, never by the caller.
# "baseline": Docker's default capabilities minus NET_RAW; "restricted": no capabilities at all and
# a non-root user (nobody). Named after Kubernetes' Pod Security Standards.
PROFILES = ("baseline", "restricted")
ContainerProfile = Literal["baseline", "restricted"]
RESTRICTED_USER = "65534:65534"
DEFAULT_PIDS_LIMIT = 4096
# The json-file log driver keeps LOG_MAX_FILES files of at most log_max_size bytes per container.
DEFAULT_LOG_MAX_SIZE = 50 * 2**20
LOG_MAX_FILES = 2
LOG_DRIVER = "json-file"
# Docker networks no container of gpulease may join: the host's stack, or another container's.
FORBIDDEN_NETWORKS = ("host",)
FORBIDDEN_NETWORK_PREFIX = "container:"
# The agent's own network (the default): a bridge it creates with inter-container traffic off, so
# that containers of different allocations cannot reach each other (dockerd enforces it with
# iptables). Any other configured network must have it off too, or be "none".
AGENT_NETWORK = "gpulease"
ICC_OPTION = "com.docker.network.bridge.enable_icc"
# The Linux bridge of AGENT_NETWORK, by name, so that the host's firewall rules can name it.
AGENT_BRIDGE = "gpulease0"
BRIDGE_NAME_OPTION = "com.docker.network.bridge.name"

# Set (by the agent's container service) around a call to ensure_image: the pull gives up as soon as
# the event is set, because the caller that asked for it has gone. A context variable rather than a
# parameter, so that runtimes without pulls ignore it; asyncio.to_thread carries it into the thread.
PULL_CANCEL: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("PULL_CANCEL", default=None)

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
class Hardening:
    """What every container runs with, whatever its spec: the agent's settings (agent/config.py).

    Besides these, the runtime always sets: not privileged, no-new-privileges, a private IPC
    namespace, the host's PID and UTS namespaces never shared, no devices but the allocation's GPUs.
    """

    profile: ContainerProfile = "baseline"
    pids_limit: int = DEFAULT_PIDS_LIMIT
    log_max_size: int = DEFAULT_LOG_MAX_SIZE

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"container profile must be one of {', '.join(PROFILES)}, got {self.profile!r}")
        if self.pids_limit <= 0 or self.log_max_size <= 0:
            raise ValueError("pids_limit and log_max_size must be positive")


def network_problem(network: str) -> str | None:
    """Why a container may not use this Docker network mode (None: it may)."""
    if network in FORBIDDEN_NETWORKS or network.startswith(FORBIDDEN_NETWORK_PREFIX):
        return f"network {network!r} shares the host's or another container's network namespace"
    return None


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
    hardening: Hardening = field(default_factory=Hardening)


@dataclass(frozen=True)
class VolumeInfo:
    """A named volume as Docker describes it."""

    name: str
    driver: str
    options: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    created_unix_ms: int = 0


@dataclass(frozen=True)
class ImageInfo:
    """An image as Docker describes it, for the image clean-up (agent/enforcer.py)."""

    id: str
    tags: tuple[str, ...]
    size: int  # bytes, as Docker counts them per image (layers shared with other images included)
    # When it was last pulled or tagged here (Docker's LastTagTime), else when it was built.
    tagged_unix_ms: int
    # Some container, running or not, of gpulease or not, refers to it.
    in_use: bool


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
    # From LABEL_NODE: the node whose agent started it. An agent touches only its own node's.
    node: str = ""


class ContainerRuntime(Protocol):
    # Two steps, not one: a pull can take minutes, and the agent must check the fencing token
    # after it, right before the container is created (agent/containers.py).
    def has_image(self, image: str) -> bool:
        """Whether the image is on this node already (no pull needed)."""
        ...

    def ensure_image(self, image: str) -> None:
        """Pull the image if it is missing; ImageUnavailable when it cannot be pulled. A pull has a
        hard wall-clock deadline, and ends early once PULL_CANCEL's event is set."""
        ...

    def create_and_start(self, launch: ContainerLaunch) -> ContainerInfo:
        """Create and start the container; never pulls (ImageUnavailable if the image is missing)."""
        ...

    def prepare_network(self, name: str) -> None:
        """Make sure containers on network ``name`` cannot reach each other: "none" is fine; the
        agent's own (AGENT_NETWORK) is created if missing, with inter-container traffic off; any
        other must exist with it off. PermissionDenied (rule 'network-isolation') otherwise."""
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

    # Images: the agent removes unused ones by age and by disk use (agent/enforcer.py).

    def list_images(self) -> builtins.list[ImageInfo]:
        """Every image on the daemon (tagged or not), with whether a container refers to it."""
        ...

    def remove_image(self, image: ImageInfo) -> bool:
        """Remove an image no container refers to (all its tags); False if one does (or it is gone)."""
        ...
