"""Models -> what gpuctl prints: JSON documents and table cells. Pure functions, no I/O."""

from __future__ import annotations

import datetime
from collections import Counter
from collections.abc import Sequence
from typing import Any

from gpulease.cli.output import ratio
from gpulease.client import (
    Allocation,
    AllocationInfo,
    AuditEntry,
    Event,
    Gpu,
    Node,
    NodeSummary,
    PriorityClassInfo,
    Quota,
    QuotaInfo,
    TokenInfo,
    WhoAmI,
)
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
        **({"members": [{"node": m.node, "gpus": [{"index": g.index, "uuid": g.uuid} for g in m.gpus],
                         "cpus": m.cpus, "memory_bytes": m.memory_bytes, "node_address": m.node_address}
                        for m in a.members]} if len(a.members) > 1 else {}),
    }  # fmt: skip


def member_lines(a: AnyAllocation) -> list[str]:
    """A gang's members, one line each in rank order (nothing for one node)."""
    if len(a.members) < 2:
        return []
    return [f"  member {rank} on {m.node} ({m.node_address}): GPUs {','.join(str(g.index) for g in m.gpus)} "
            f"({m.cpus} CPUs, {format_size(m.memory_bytes)})" for rank, m in enumerate(a.members)]  # fmt: skip


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


def allocation_policy_line(a: AnyAllocation) -> str:
    """'tenant ml, priority class high, preemptible': the quota and preemption rules it is under,
    as the coordinator's record says (a part it does not report is left out)."""
    parts = [f"tenant {a.tenant or '-'}"]
    if a.priority_class:
        parts.append(f"priority class {a.priority_class}")
    if a.preemptible:
        parts.append("preemptible")
    return ", ".join(parts)


def duration(seconds: int) -> str:
    """Whole seconds in the largest unit that divides them, as gpuctl takes them: 86400 -> '1d', 90 -> '90s'."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def quota_name(tenant: str) -> str:
    """'the quota of tenant team-a', or 'the default quota ('*')'."""
    return "the default quota ('*')" if tenant == "*" else f"the quota of tenant {tenant}"


def _nominal(n: int | None, borrow: int) -> str:
    if n is None:
        return "-"
    return f"{n}+{borrow}" if borrow else str(n)


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def quota_summary(q: Quota) -> str:
    """'8 GPUs (+2 borrowable), NVIDIA A100 4, 64 CPUs, 64.0GiB memory, lifetime 1d, weight 2'."""
    parts = []
    if q.gpus is not None:
        parts.append(_count(q.gpus, "GPU") + (f" (+{q.borrow} borrowable)" if q.borrow else ""))
    parts += [f"{model} {n}" for model, n in sorted(q.models.items())]
    if q.borrow and q.gpus is None:
        parts.append(f"+{q.borrow} borrowable per model")
    if q.cpus is not None:
        parts.append(_count(q.cpus, "CPU"))
    if q.memory_bytes is not None:
        parts.append(f"{format_size(q.memory_bytes)} memory")
    if q.max_lifetime_seconds:
        parts.append(f"lifetime {duration(q.max_lifetime_seconds)}")
    if q.weight:
        parts.append(f"weight {q.weight:g}")
    return ", ".join(parts) or "no limits"


def quota_row(t: QuotaInfo) -> list[str]:
    """TENANT GPUS MODELS BORROWED CPUS MEMORY PENDING GPU-HOURS LIFETIME WEIGHT: used/quota where one applies
    (GPU quotas as nominal+borrowable); '-' for unlimited."""
    q = t.quota
    name = t.tenant
    if t.tenant == "*":
        name = "* (default)"
    elif t.from_default:
        name = f"{t.tenant} (default quota)"
    borrow = q.borrow if q is not None else 0
    models = sorted(set(t.used_models) | set(q.models if q is not None else ()))
    model_cells = [
        f"{m} {t.used_models.get(m, 0)}/{_nominal(q.models.get(m) if q is not None else None, borrow)}" for m in models
    ]
    cpus = f"{t.used_cpus}/{q.cpus}" if q is not None and q.cpus is not None else f"{t.used_cpus}/-"
    memory = format_size(t.used_memory_bytes) + "/"
    memory += format_size(q.memory_bytes) if q is not None and q.memory_bytes is not None else "-"
    return [
        name,
        f"{t.used_gpus}/{_nominal(q.gpus if q is not None else None, borrow)}",
        ", ".join(model_cells) or "-",
        str(t.borrowed_gpus),
        cpus,
        memory,
        str(t.pending),
        f"{t.fair_share_gpu_hours:.2f}",
        duration(q.max_lifetime_seconds) if q is not None and q.max_lifetime_seconds else "-",
        f"{q.weight:g}" if q is not None and q.weight else "-",
    ]


def priority_summary(c: PriorityClassInfo) -> str:
    """'high (100, the default; grace 30s, min runtime 10m)'."""
    parts = [str(c.value)] + (["the default"] if c.is_default else [])
    details = [f"grace {duration(c.preemption_grace_seconds)}"]
    if c.min_runtime_seconds:
        details.append(f"min runtime {duration(c.min_runtime_seconds)}")
    return f"{c.name} ({', '.join(parts)}; {', '.join(details)})"


def priority_row(c: PriorityClassInfo) -> list[str]:
    return [
        c.name,
        str(c.value),
        "yes" if c.is_default else "",
        duration(c.preemption_grace_seconds) if c.preemption_grace_seconds else "-",
        duration(c.min_runtime_seconds) if c.min_runtime_seconds else "-",
    ]


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


def event_line(e: Event) -> str:
    """'2025-01-31T12:00:00Z  released  node-1  <alloc>  team-a  release; 1 GPU(s) ...' (rev last)."""
    cols = [when(e.time_unix_ms), f"{e.type:<17}", e.node or "-", e.allocation_id or "-", e.tenant or "-"]
    gpus = f" gpus={','.join(e.gpus)}" if e.gpus else ""
    return "  ".join(cols) + f"  {e.detail}{gpus} (rev {e.revision})"


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
