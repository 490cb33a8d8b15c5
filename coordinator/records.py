"""JSON encoding of the values stored in etcd. Compact and versioned by field presence."""

from __future__ import annotations

import json
from typing import Any

from gpulease.coordinator.domain import (
    AllocatedGpu,
    Allocation,
    GpuInfo,
    Member,
    NodeInfo,
    PendingRequest,
    Reservation,
    ResourceRequest,
)
from gpulease.coordinator.quota import Quota, Usage


def encode_node(info: NodeInfo) -> bytes:
    # cordoned is stored under its own key, never in the record the agent rewrites.
    doc = {
        "name": info.name,
        "address": info.address,
        "gpus": [
            {
                "index": g.index,
                "uuid": g.uuid,
                "model": g.model,
                "memory": g.memory_total_bytes,
                "healthy": g.healthy,
                "simulated": g.simulated,
                "detail": g.health_detail,
                **_gpu_extras(g),
            }
            for g in info.gpus
        ],
        "cpus": info.cpus_total,
        "memory": info.memory_total_bytes,
        "labels": dict(sorted(info.labels.items())),
        "hostname": info.hostname,
        "reconciling": info.reconciling,
        "driver": info.driver_version,
        "cuda": info.cuda_version,
        "source": info.source,
    }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def _gpu_extras(g: GpuInfo) -> dict[str, Any]:
    # Only what is set: keeps records of simulated or minimal nodes small.
    extras: dict[str, Any] = {
        "foreign": g.foreign,
        "foreign_detail": g.foreign_detail,
        "pci": g.pci_bus_id,
        "mig": g.mig_mode,
        "numa": g.numa_node,
        "affinity": g.cpu_affinity,
        "links": [list(link) for link in g.links],
    }
    return {k: v for k, v in extras.items() if v not in (None, "", False, [])}


def decode_node(raw: bytes) -> NodeInfo:
    d: dict[str, Any] = json.loads(raw)
    return NodeInfo(
        name=d["name"],
        address=d.get("address", ""),
        gpus=tuple(
            GpuInfo(
                index=g["index"],
                uuid=g["uuid"],
                model=g.get("model", ""),
                memory_total_bytes=g.get("memory", 0),
                healthy=g.get("healthy", True),
                simulated=g.get("simulated", False),
                health_detail=g.get("detail", ""),
                foreign=g.get("foreign", False),
                foreign_detail=g.get("foreign_detail", ""),
                pci_bus_id=g.get("pci", ""),
                mig_mode=g.get("mig", ""),
                numa_node=g.get("numa"),
                cpu_affinity=g.get("affinity", ""),
                links=tuple((int(p), int(n), str(a)) for p, n, a in g.get("links", [])),
            )
            for g in d.get("gpus", [])
        ),
        cpus_total=d.get("cpus", 0),
        memory_total_bytes=d.get("memory", 0),
        labels=d.get("labels", {}),
        hostname=d.get("hostname", ""),
        reconciling=d.get("reconciling", False),
        driver_version=d.get("driver", ""),
        cuda_version=d.get("cuda", ""),
        source=d.get("source", ""),
    )


def encode_alloc(a: Allocation) -> bytes:
    # revision is not stored: it is the key's create_revision, known only after commit.
    doc = {
        "id": a.id,
        "node": a.node,
        "gpus": _gpus(a.gpus),
        "cpus": a.cpus,
        "memory": a.memory_bytes,
        "ttl": a.ttl_seconds,
        "lease": a.lease_id,
        "owner": a.owner,
        "request_id": a.request_id,
        "created_ms": a.created_unix_ms,
        "principal": a.principal,
        "tenant": a.tenant,
        "shape": a.shape,
    }
    if a.max_runtime_s:
        doc["max_runtime"] = a.max_runtime_s
    if a.priority_class:
        doc["priority"], doc["priority_class"] = a.priority, a.priority_class
    if a.preemptible:
        doc["preemptible"] = True
    if a.is_gang:  # node and gpus above are the first member's: readers that know no gangs see that one
        doc["members"] = [{"node": m.node, "gpus": _gpus(m.gpus), "cpus": m.cpus, "memory": m.memory_bytes}
                          for m in a.members]  # fmt: skip
    return json.dumps(doc, separators=(",", ":")).encode()


def _gpus(gpus: tuple[AllocatedGpu, ...]) -> list[dict[str, Any]]:
    return [{"index": g.index, "uuid": g.uuid, "model": g.model} for g in gpus]


def _decode_gpus(raw: list[dict[str, Any]]) -> tuple[AllocatedGpu, ...]:
    return tuple(AllocatedGpu(g["index"], g["uuid"], g.get("model", "")) for g in raw)


def decode_alloc(raw: bytes, revision: int) -> Allocation:
    d: dict[str, Any] = json.loads(raw)
    return Allocation(
        id=d["id"],
        node=d["node"],
        gpus=_decode_gpus(d["gpus"]),
        cpus=d.get("cpus", 0),
        memory_bytes=d.get("memory", 0),
        ttl_seconds=d.get("ttl", 0),
        lease_id=d.get("lease", 0),
        revision=revision,
        owner=d.get("owner", ""),
        request_id=d.get("request_id", ""),
        created_unix_ms=d.get("created_ms", 0),
        principal=d.get("principal", ""),
        tenant=d.get("tenant", ""),
        shape=d.get("shape", ""),
        max_runtime_s=d.get("max_runtime", 0),
        priority=d.get("priority", 0),
        priority_class=d.get("priority_class", ""),
        preemptible=bool(d.get("preemptible", False)),
        gang=tuple(
            Member(m["node"], _decode_gpus(m["gpus"]), m.get("cpus", 0), m.get("memory", 0))
            for m in d.get("members", ())
        ),
    )


def encode_res(cpus: int, memory: int) -> bytes:
    return json.dumps({"cpus": cpus, "memory": memory}, separators=(",", ":")).encode()


def decode_res(raw: bytes) -> tuple[int, int]:
    d = json.loads(raw)
    return int(d.get("cpus", 0)), int(d.get("memory", 0))


def encode_pending(p: PendingRequest) -> bytes:
    r = p.req
    doc = {
        "id": p.id, "request_id": p.request_id, "gpus": r.gpus, "cpus": r.cpus, "memory": r.memory_bytes,
        "model": r.gpu_model, "min_gpu_memory": r.min_gpu_memory_bytes, "selector": dict(r.node_selector),
        "ttl": p.ttl_s, "principal": p.principal, "tenant": p.tenant, "owner": p.owner, "shape": p.shape,
        "priority": p.priority, "priority_class": p.priority_class, "created_ms": p.created_ms,
        "wait_until_ms": p.wait_until_ms, "max_runtime": p.max_runtime_s, "lease": p.lease_id,
        "preemptible": p.preemptible,
    }  # fmt: skip
    if r.is_gang:
        doc["nodes"], doc["same"] = r.nodes, r.same_label
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_pending(raw: bytes) -> PendingRequest:
    d: dict[str, Any] = json.loads(raw)
    req = ResourceRequest(
        gpus=d["gpus"],
        cpus=d["cpus"],
        memory_bytes=d["memory"],
        gpu_model=d.get("model", ""),
        min_gpu_memory_bytes=d.get("min_gpu_memory", 0),
        node_selector=d.get("selector", {}),
        nodes=d.get("nodes", 1),
        same_label=d.get("same", ""),
    )
    return PendingRequest(
        id=d["id"], request_id=d["request_id"], req=req, ttl_s=d.get("ttl", 60), principal=d.get("principal", ""),
        tenant=d.get("tenant", ""), owner=d.get("owner", ""), shape=d.get("shape", ""),
        priority=d.get("priority", 0), priority_class=d.get("priority_class", ""), created_ms=d.get("created_ms", 0),
        wait_until_ms=d.get("wait_until_ms", 0), max_runtime_s=d.get("max_runtime", 0), lease_id=d.get("lease", 0),
        preemptible=bool(d.get("preemptible", False)),
    )  # fmt: skip


def encode_usage(u: Usage) -> bytes:
    return json.dumps({"gpus": u.gpus, "models": dict(u.models), "cpus": u.cpus, "memory": u.memory_bytes},
                      separators=(",", ":")).encode()  # fmt: skip


def decode_usage(raw: bytes) -> Usage:
    d: dict[str, Any] = json.loads(raw)
    return Usage(int(d.get("gpus", 0)), {str(k): int(v) for k, v in d.get("models", {}).items()},
                 int(d.get("cpus", 0)), int(d.get("memory", 0)))  # fmt: skip


def encode_quota(q: Quota) -> bytes:
    doc: dict[str, Any] = {"gpus": q.gpus, "models": dict(sorted(q.models.items())), "cpus": q.cpus,
                           "memory": q.memory_bytes, "borrow": q.borrow, "max_lifetime": q.max_lifetime_s,
                           "weight": q.weight}  # fmt: skip
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_quota(raw: bytes) -> Quota:
    d: dict[str, Any] = json.loads(raw)
    return Quota(
        gpus=d.get("gpus"), models={str(k): int(v) for k, v in (d.get("models") or {}).items()}, cpus=d.get("cpus"),
        memory_bytes=d.get("memory"), borrow=int(d.get("borrow") or 0), max_lifetime_s=int(d.get("max_lifetime") or 0),
        weight=float(d.get("weight") or 0.0),
    )  # fmt: skip


def encode_reservation(r: Reservation) -> bytes:
    doc = {"tenant": r.tenant, "start_ms": r.start_ms, "end_ms": r.end_ms, "gpus": dict(sorted(r.gpus.items())),
           "model": r.model, "created_ms": r.created_ms, "by": r.by}  # fmt: skip
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_reservation(name: str, raw: bytes) -> Reservation:
    d: dict[str, Any] = json.loads(raw)
    return Reservation(
        name=name, tenant=str(d["tenant"]), start_ms=int(d["start_ms"]), end_ms=int(d["end_ms"]),
        gpus={str(k): int(v) for k, v in (d.get("gpus") or {}).items()}, model=str(d.get("model") or ""),
        created_ms=int(d.get("created_ms") or 0), by=str(d.get("by") or ""),
    )  # fmt: skip
