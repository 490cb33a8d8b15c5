"""Input checks for every RPC. Each failure is an InvalidRequest whose message says what to fix."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace

from gpulease.common.settings import ALLOCATION_ID_RE, MAX_TTL_S, MIN_TTL_S, split_host_port
from gpulease.coordinator.domain import GpuInfo, NodeInfo, ResourceRequest
from gpulease.errors import InvalidRequest

MAX_GPUS = 1024
MAX_CPUS = 16384
MAX_MEMORY = 2**50  # 1 PiB
MIN_TTL = MIN_TTL_S  # shared with the agent (gpulease.common.settings)
MAX_TTL = MAX_TTL_S
MAX_SELECTOR = 32

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# Airflow run ids look like "scheduled__2024-01-01T00:00:00+00:00": allow ':' '+' '@' '='.
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:+@=-]{1,256}$")
# A GPU's UUID is part of an etcd key (gpus/<node>/<uuid>): no '/', nothing that reads as an index.
_GPU_UUID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+@-]{0,127}$")
_LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$")


def _text(field: str, value: str, limit: int) -> str:
    if len(value) > limit:
        raise InvalidRequest(f"{field} is {len(value)} characters long; the limit is {limit}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise InvalidRequest(f"{field} contains control characters; use printable text")
    return value


def _count(field: str, value: int, limit: int, unit: str = "") -> int:
    if value <= 0:
        raise InvalidRequest(f"{field} must be at least 1{unit}, got {value}")
    if value > limit:
        raise InvalidRequest(f"{field} of {value}{unit} is more than the limit of {limit}{unit}")
    return value


def node_name(value: str, field: str = "node") -> str:
    if not _NAME_RE.match(value):
        raise InvalidRequest(
            f"{field} {value[:80]!r} is not a valid node name: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def allocation_id(value: str) -> str:
    if not ALLOCATION_ID_RE.match(value):
        raise InvalidRequest(
            f"allocation id {value[:80]!r} is malformed: ids are 8-64 lowercase hex characters "
            "as printed by `gpuctl allocate`"
        )
    return value


_RELEASE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def release_id(value: str) -> str:
    """A release call's id ("" = none)."""
    if value and not _RELEASE_ID_RE.match(value):
        raise InvalidRequest(f"release_id {value[:80]!r} is invalid: use 1-64 letters, digits, '_' or '-'")
    return value


def request_id(value: str) -> str:
    if not _REQUEST_ID_RE.match(value):
        raise InvalidRequest(
            f"request_id {value[:80]!r} is invalid: use 1-256 characters from letters, digits and ._:+@=-"
        )
    return value


def ttl(value: int, default: int) -> int:
    if value == 0:
        return default
    if not MIN_TTL <= value <= MAX_TTL:
        raise InvalidRequest(f"ttl of {value}s is out of range: use {MIN_TTL}s to {MAX_TTL}s (24h)")
    return value


MAX_RUNTIME = 30 * 86400


def max_runtime(value: int) -> int:
    """0 (none declared) or 1 s to 30 days."""
    if value < 0 or value > MAX_RUNTIME:
        raise InvalidRequest(f"max_runtime of {value}s is out of range: use 0 (none) or 1s to {MAX_RUNTIME}s (30 days)")
    return value


def selector(labels: Mapping[str, str], field: str = "node_selector") -> dict[str, str]:
    if len(labels) > MAX_SELECTOR:
        raise InvalidRequest(f"{field} has {len(labels)} entries; the limit is {MAX_SELECTOR}")
    for k, v in labels.items():
        if not _LABEL_KEY_RE.match(k):
            raise InvalidRequest(f"{field} key {k[:80]!r} is invalid: use letters, digits and ._/- (max 128)")
        _text(f"{field} value for {k!r}", v, 256)
    return dict(labels)


def resource_request(
    *,
    gpus: int,
    cpus: int | None,
    memory_bytes: int | None,
    gpu_model: str,
    min_gpu_memory_bytes: int,
    node_selector: Mapping[str, str],
    default_cpus_per_gpu: int,
    default_memory_per_gpu: int,
) -> ResourceRequest:
    _count("gpus", gpus, MAX_GPUS)
    cpus_auto, memory_auto = cpus is None, memory_bytes is None
    cpus = default_cpus_per_gpu * gpus if cpus is None else _count("cpus", cpus, MAX_CPUS)
    if memory_bytes is None:
        memory_bytes = default_memory_per_gpu * gpus
    else:
        _count("memory", memory_bytes, MAX_MEMORY, " bytes")
    if min_gpu_memory_bytes < 0 or min_gpu_memory_bytes > MAX_MEMORY:
        raise InvalidRequest(f"min_gpu_memory of {min_gpu_memory_bytes} bytes is out of range")
    return ResourceRequest(
        gpus=gpus,
        cpus=cpus,
        memory_bytes=memory_bytes,
        gpu_model=_text("gpu_model", gpu_model, 128),
        min_gpu_memory_bytes=min_gpu_memory_bytes,
        node_selector=selector(node_selector),
        cpus_auto=cpus_auto,
        memory_auto=memory_auto,
    )


MAX_GANG_NODES = 256


def gang(nodes: int, same_label: str) -> tuple[int, str]:
    """(nodes, same_label) of a request: 0 or 1 node is one node; a gang is 2 to MAX_GANG_NODES."""
    if nodes < 0 or nodes > MAX_GANG_NODES:
        raise InvalidRequest(f"nodes of {nodes} is out of range: use 0 or 1 (one node) to {MAX_GANG_NODES}")
    nodes = max(nodes, 1)
    if same_label:
        if nodes == 1:
            raise InvalidRequest(
                "same_label is for gangs (nodes of 2 or more): one node shares every label with itself"
            )
        if not _LABEL_KEY_RE.match(same_label):
            raise InvalidRequest(f"same_label {same_label[:80]!r} is not a label key: use letters, digits and ._/- "
                                 "(max 128)")  # fmt: skip
    return nodes, same_label


def owner(value: str) -> str:
    return _text("owner", value, 128)


def address(value: str) -> str:
    _text("address", value, 255)
    try:
        host, port = split_host_port(value)
    except ValueError:
        host, port = "", 0
    if not host or port == 0:
        raise InvalidRequest(f"address {value[:80]!r} must be HOST:PORT")
    return value


def inventory(info: NodeInfo) -> NodeInfo:
    """The inventory as it may be stored: checked, and with every GPU that reports no UUID marked
    unhealthy. GPUs are claimed by UUID, so one without a UUID (NVML could not read it) can never
    be handed out; a node with such a GPU still registers. Callers store the returned value."""
    node_name(info.name)
    address(info.address)
    if len(info.gpus) > MAX_GPUS:
        raise InvalidRequest(f"node reports {len(info.gpus)} GPUs; the limit is {MAX_GPUS}")
    seen: set[int] = set()
    uuids: set[str] = set()
    gpus: list[GpuInfo] = []
    for g in info.gpus:
        if g.index in seen:
            raise InvalidRequest(f"node reports GPU index {g.index} twice")
        seen.add(g.index)
        _text("gpu model", g.model, 128)
        _text("gpu health detail", g.health_detail, 1024)
        if not g.uuid:
            detail = "; ".join(d for d in (g.health_detail, "no UUID reported, so it cannot be claimed") if d)
            g = replace(g, healthy=False, health_detail=detail[:1024])
        elif not _GPU_UUID_RE.match(g.uuid) or g.uuid.isdigit():
            raise InvalidRequest(
                f"GPU {g.index} reports UUID {g.uuid[:80]!r}: expected up to 128 letters, digits, '.', '_', ':', "
                "'+', '@' or '-' (NVML's look like GPU-8f5d...)"
            )
        elif g.uuid in uuids:
            raise InvalidRequest(f"node reports GPU UUID {g.uuid!r} twice")
        uuids.add(g.uuid)
        gpus.append(g)
    if info.cpus_total > MAX_CPUS or info.memory_total_bytes > MAX_MEMORY:
        raise InvalidRequest("node reports more CPUs or memory than gpulease supports")
    selector(info.labels, "labels")
    _text("hostname", info.hostname, 255)
    return replace(info, gpus=tuple(gpus))
