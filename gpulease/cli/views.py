"""Models -> what gpuctl prints: JSON documents and table cells. Pure functions, no I/O."""

from __future__ import annotations

import datetime
from collections import Counter
from collections.abc import Sequence
from typing import Any

from gpulease.cli.output import ratio
from gpulease.client import Allocation, AllocationInfo, AuditEntry, Gpu, Node, NodeSummary, TokenInfo, WhoAmI
from gpulease.common.units import format_size

# A handle (Client.allocate's) or a plain record: both read the same fields.
AnyAllocation = Allocation | AllocationInfo


def summary_counters(s: NodeSummary) -> dict[str, int]:
    return {
        "gpus_total": s.gpus_total,
        "gpus_free": s.gpus_free,
        "cpus_total": s.cpus_total,
        "cpus_free": s.cpus_free,
        "memory_total_bytes": s.memory_total_bytes,
        "memory_free_bytes": s.memory_free_bytes,
    }


def summary_row(label: str, state: str, s: NodeSummary) -> list[str]:
    memory = f"{format_size(s.memory_free_bytes)}/{format_size(s.memory_total_bytes)}"
    return [label, state, ratio(s.gpus_free, s.gpus_total), ratio(s.cpus_free, s.cpus_total), memory]


def node_json(n: Node) -> dict[str, Any]:
    return {
        "name": n.name,
        "state": n.state,
        "address": n.address,
        "gpus": [
            {
                "index": g.index,
                "uuid": g.uuid,
                "model": g.model,
                "memory_total_bytes": g.memory_total_bytes,
                "healthy": g.healthy,
                "simulated": g.simulated,
                # Extra key: something gpulease did not start uses the GPU (it is not handed out).
                "foreign_processes": foreign_processes(g),
            }
            for g in n.gpus
        ],
        "cpus_total": n.cpus_total,
        "memory_total_bytes": n.memory_total_bytes,
        "labels": dict(n.labels),
    }


def foreign_processes(g: Gpu) -> bool:
    # getattr: the flag reaches the client model only with a client that carries it.
    return bool(getattr(g, "foreign_processes", False))


def gpu_summary(gpus: Sequence[Gpu]) -> str:
    """'8x NVIDIA H100 80GB HBM3', with simulated, unhealthy and foreign-used GPUs called out."""
    if not gpus:
        return "-"
    groups = Counter((g.model or "unknown model", g.simulated) for g in gpus)
    parts = [f"{count}x {model}{' (simulated)' if sim else ''}" for (model, sim), count in groups.items()]
    unhealthy = sum(not g.healthy for g in gpus)
    if unhealthy:
        parts.append(f"{unhealthy} unhealthy")
    foreign = [str(g.index) for g in gpus if foreign_processes(g)]
    if foreign:
        parts.append(f"foreign processes on GPU{'s' if len(foreign) > 1 else ''} {','.join(foreign)}")
    return ", ".join(parts)


def foreign_lines(n: Node) -> list[str]:
    """One line per GPU that something gpulease did not start uses: 'gpu-a GPU 3: pid 1234 ...'."""
    lines = []
    for g in n.gpus:
        if foreign_processes(g):
            detail = str(getattr(g, "foreign_detail", "")) or "in use by processes gpulease did not start"
            lines.append(f"{n.name} GPU {g.index}: {detail}")
    return lines


def node_row(n: Node) -> list[str]:
    labels = ",".join(f"{k}={v}" for k, v in sorted(n.labels.items())) or "-"
    return [
        n.name,
        n.state,
        n.address or "-",
        gpu_summary(n.gpus),
        str(n.cpus_total),
        format_size(n.memory_total_bytes),
        labels,
    ]


def allocation_json(a: AnyAllocation) -> dict[str, Any]:
    return {
        "id": a.id,
        "node": a.node,
        "gpus": [{"index": g.index, "uuid": g.uuid} for g in a.gpus],
        "cpus": a.cpus,
        "memory_bytes": a.memory_bytes,
        "ttl_seconds": a.ttl_seconds,
        "revision": a.revision,
    }


def gpu_indexes(a: AnyAllocation) -> str:
    return ",".join(str(i) for i in a.gpu_indexes)


def allocation_row(a: AnyAllocation) -> list[str]:
    return [
        a.id,
        a.node,
        gpu_indexes(a) or "-",
        str(a.cpus),
        format_size(a.memory_bytes),
        f"{a.ttl_seconds}s",
        a.owner or "-",
        str(a.revision),
    ]


def allocation_line(a: AnyAllocation) -> str:
    gpus = f"GPUs {gpu_indexes(a)}" if a.gpus else "no GPUs"
    return (
        f"allocated {a.id} on {a.node}: {gpus} ({a.cpus} CPUs, {format_size(a.memory_bytes)}) "
        f"ttl {a.ttl_seconds}s revision {a.revision}"
    )


def when(unix_ms: int) -> str:
    """'2025-01-31T12:00:00Z' (UTC, to the second)."""
    moment = datetime.datetime.fromtimestamp(unix_ms / 1000, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def whoami_json(me: WhoAmI) -> dict[str, str]:
    return {"principal": me.principal, "role": me.role, "tenant": me.tenant, "method": me.method}


def token_json(t: TokenInfo) -> dict[str, Any]:
    # Never a secret: the coordinator keeps only its digest, and TokenInfo has no field for it.
    return {
        "name": t.name,
        "role": t.role,
        "tenant": t.tenant,
        "created_unix_ms": t.created_unix_ms,
        "expires_unix_ms": t.expires_unix_ms,
        "created_by": t.created_by,
    }


def token_row(t: TokenInfo) -> list[str]:
    expires = when(t.expires_unix_ms) if t.expires_unix_ms else "never"
    return [t.name, t.role, t.tenant or "-", when(t.created_unix_ms), expires, t.created_by or "-"]


def audit_json(e: AuditEntry) -> dict[str, Any]:
    return {
        "time_unix_ms": e.time_unix_ms,
        "actor": e.actor,
        "tenant": e.tenant,
        "action": e.action,
        "target": e.target,
        "outcome": e.outcome,
        "revision": e.revision,
        "detail": e.detail,
    }


def audit_row(e: AuditEntry) -> list[str]:
    return [
        when(e.time_unix_ms),
        e.actor or "-",
        e.tenant or "-",
        e.action,
        e.target or "-",
        e.outcome or "-",
        str(e.revision) if e.revision else "-",
        e.detail or "-",
    ]
