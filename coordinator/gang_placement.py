"""Gang placement (issue 15, section 5): N distinct nodes, each with M GPUs and the request's CPUs
and memory (all per node), as a pure function of one snapshot, like placement.

Every member is placed by placement's own rule (``place()``: the free-GPU rule, model, GPU memory
and label filters, schedulable nodes, best fit), one node after another: the best-fit node, then
the best fit among the others, and so on. The gang therefore takes the N tightest nodes and whole
nodes stay free for others. With ``same_label`` (a rack), nodes are grouped by their value of that
label (nodes without it take no part) and the gang is placed within each group; the group its
members leave with the fewest free GPUs (then CPUs, memory, the label's value) wins.

Cost: N scans of the nodes (of every group together with ``same_label``). Gangs are rare and N
small; the commit's transaction bounds N anyway (etcd's --max-txn-ops).

Failures say why, like placement: ``Unsatisfiable`` when fewer than N nodes (of any one group)
could ever hold a member, ``InsufficientResources`` when enough could but not enough have room now,
naming the nodes with the most free GPUs.
"""

from __future__ import annotations

from collections.abc import Mapping

from gpulease.coordinator.domain import NodeView, Placement, ResourceRequest, Snapshot
from gpulease.coordinator.placement import eligible_gpus, place
from gpulease.errors import InsufficientResources, Unsatisfiable

__all__ = ["place_gang", "place_request"]

_GIB = 1 << 30
_MOST_LISTED = 8


def place_request(snapshot: Snapshot, request: ResourceRequest) -> Placement:
    """place() for one node, place_gang() for a gang."""
    return place_gang(snapshot, request) if request.is_gang else place(snapshot, request)


def place_gang(snapshot: Snapshot, request: ResourceRequest) -> Placement:
    """The gang's placement: its first member's Placement with the others in ``more``."""
    if not request.is_gang:
        return place(snapshot, request)
    member = request.per_node()
    best: tuple[tuple[int, int, int, str], list[Placement]] | None = None
    for value, group in _groups(snapshot, request).items():
        members = _members(snapshot.revision, group, member, request.nodes)
        if members is None:
            continue
        score = _score(group, members, member, value)
        if best is None or score < best[0]:
            best = (score, members)
    if best is None:
        raise _why(snapshot, request)
    first, *rest = best[1]
    return Placement(first.node, first.gpu_indexes, first.node_record_revision, first.snapshot_revision,
                     more=tuple(rest))  # fmt: skip


def _groups(snapshot: Snapshot, request: ResourceRequest) -> dict[str, dict[str, NodeView]]:
    """Nodes by their value of ``same_label`` (one group of every node without it)."""
    if not request.same_label:
        return {"": dict(snapshot.nodes)}
    out: dict[str, dict[str, NodeView]] = {}
    for name, view in snapshot.nodes.items():
        value = view.info.labels.get(request.same_label)
        if value is not None:
            out.setdefault(value, {})[name] = view
    return out


def _members(revision: int, nodes: Mapping[str, NodeView], member: ResourceRequest, n: int) -> list[Placement] | None:
    """The n best-fit distinct nodes of ``nodes`` for one member each, or None when fewer fit now."""
    if len(nodes) < n:
        return None
    left = dict(nodes)
    out: list[Placement] = []
    for _ in range(n):
        try:
            p = place(Snapshot(revision, left), member)
        except (InsufficientResources, Unsatisfiable):
            return None
        out.append(p)
        del left[p.node]
    return out


def _score(
    group: Mapping[str, NodeView], members: list[Placement], member: ResourceRequest, value: str
) -> tuple[int, int, int, str]:
    """What the members leave free on their nodes (fewest GPUs, then CPUs, memory): best fit."""
    gpus = cpus = memory = 0
    for p in members:
        v = group[p.node]
        gpus += eligible_gpus(v, member)[1] - member.gpus
        cpus += v.cpus_free - member.cpus
        memory += v.memory_free - member.memory_bytes
    return gpus, cpus, memory, value


def _could_ever(view: NodeView, member: ResourceRequest) -> bool:
    """Whether the node, empty, could hold one member (placement's static checks)."""
    info = view.info
    if any(info.labels.get(k) != v for k, v in member.node_selector.items()):
        return False
    return (
        eligible_gpus(view, member)[0] >= member.gpus
        and info.cpus_total >= member.cpus
        and info.memory_total_bytes >= member.memory_bytes
    )


def _why(snapshot: Snapshot, request: ResourceRequest) -> InsufficientResources | Unsatisfiable:
    member = request.per_node()
    n = request.nodes
    what = _what(member)
    try:
        place(snapshot, member)
    except Unsatisfiable as exc:  # no node could ever hold even one member: placement says why
        return Unsatisfiable(f"a gang of {n} nodes x {what}: {exc.message}")
    except InsufficientResources:
        pass
    groups = _groups(snapshot, request)
    label = request.same_label
    could = {value: [v for v in group.values() if _could_ever(v, member)] for value, group in groups.items()}
    value, able = max(could.items(), key=lambda kv: (len(kv[1]), kv[0]), default=("", []))
    if len(able) < n:
        if not label:
            return Unsatisfiable(
                f"no {n} nodes can ever hold {what} each: only {len(able)} registered node(s) could "
                f"({_names(able)}); ask for at most {len(able)} nodes"
            )
        if not groups:
            return Unsatisfiable(f"no registered node has label {label!r}, which the gang must share (same_label); "
                                 "label the nodes or drop same_label")  # fmt: skip
        return Unsatisfiable(
            f"no value of label {label!r} has {n} nodes that can ever hold {what} each: the most is "
            f"{len(able)} with {label}={value} ({_names(able)}); ask for at most {len(able)} nodes or drop same_label"
        )
    # Enough nodes could, not enough have room now: the ones closest to it, most free GPUs first.
    ready = [v for vs in could.values() for v in vs if v.schedulable]
    most = sorted(((eligible_gpus(v, member)[1], v.name) for v in ready), key=lambda t: (-t[0], t[1]))
    shown = ", ".join(f"{free} on {name}" for free, name in most[: max(n, 2)][:_MOST_LISTED]) or "none is up"
    scope = f" sharing one value of label {label!r}" if label else ""
    down = sum(1 for vs in could.values() for v in vs if not v.schedulable)
    note = f"; {down} node(s) that could are down, cordoned or restarting" if down else ""
    enough = sum(1 for free, _ in most if free >= member.gpus)
    if enough >= n:  # the GPUs are there, on enough nodes, but not the CPUs or memory
        note += "; enough nodes have the GPUs free but not the CPUs or memory as well"
    return InsufficientResources(
        f"no {n} nodes{scope} have {what} free each right now (the most free GPUs: {shown}){note}; "
        "retry later or release allocations"
    )


def _what(member: ResourceRequest) -> str:
    text = f"{member.gpus} GPU{'s' if member.gpus != 1 else ''}"
    if member.gpu_model:
        text += f" of model '{member.gpu_model}'"
    return text


def _names(views: list[NodeView]) -> str:
    names = sorted(v.name for v in views)
    return ", ".join(names[:_MOST_LISTED]) + (", ..." if len(names) > _MOST_LISTED else "") or "none"
