"""Placement: choose one node and its GPUs for a ResourceRequest, as a pure function of a Snapshot.

No I/O and no clock: the allocation path runs this on a snapshot, then commits the result in an etcd
txn that compares the snapshot's revisions, so a stale decision fails the commit instead of
double-booking a GPU.

Policy is best-fit: the node that the request leaves with the fewest free eligible GPUs wins, so
whole nodes stay free for big jobs. Ties go to fewer free CPUs left, then less free memory left,
then node name, so the answer never depends on the snapshot's dict order.

The scan is one pass over the nodes (this runs for every allocation, at 10,000 nodes). The same
pass keeps a few counters so that a failure can say exactly why: ``Unsatisfiable`` when no
registered node could ever fit the request (fix the request), ``InsufficientResources`` when some
could but none has room now (retry later).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gpulease.coordinator.domain import GpuInfo, NodeInfo, NodeView, Placement, ResourceRequest, Snapshot
from gpulease.errors import InsufficientResources, Unsatisfiable

__all__ = ["eligible_gpus", "place"]

_GIB = 1 << 30
# Keeps an error message short when a cluster has many GPU models.
_MAX_MODELS_LISTED = 6


def place(snapshot: Snapshot, request: ResourceRequest) -> Placement:
    """Pick a node and GPUs for ``request``.

    Raises ``Unsatisfiable`` if no registered node (in any state) could ever fit the request, and
    ``InsufficientResources`` if some could but none that is up and uncordoned has room now.
    """
    if not snapshot.nodes:
        raise Unsatisfiable("no nodes are registered; start a gpulease agent on a GPU host, then retry")

    need_gpus = request.gpus
    need_cpus = request.cpus
    need_mem = request.memory_bytes
    # "" means any model. Exact match first: it is the usual case and skips a casefold per GPU.
    exact_model = request.gpu_model
    want_model = exact_model.casefold()
    min_gpu_mem = request.min_gpu_memory_bytes
    selector = request.node_selector

    selector_items = tuple(selector.items())
    t = _Tally(selector_hits=dict.fromkeys(selector, 0))
    best: NodeView | None = None
    best_key: tuple[int, int, int, str] | None = None

    # Static checks form a funnel: labels, GPUs, CPU total, memory total. The _Tally fields that
    # explain a stage are fed only by nodes that fail it (they are read only when every node failed
    # it), so nodes that fit cost nothing extra.
    for view in snapshot.nodes.values():
        info = view.info
        name = info.name

        if selector_items and not _labels_match(info.labels, selector_items, t.selector_hits):
            continue
        t.passed_labels += 1

        # Same test as _eligible(), inlined: this loop runs for every GPU in the cluster. Held GPUs
        # count toward what the node could ever fit, not toward what is free now (NodeView's
        # free_indexes: the one free-GPU rule, computed once per view).
        n_match = n_free = 0
        free = view.free_indexes
        for gpu in info.gpus:
            if (
                gpu.healthy
                and gpu.memory_total_bytes >= min_gpu_mem
                and (not want_model or gpu.model == exact_model or gpu.model.casefold() == want_model)
            ):
                n_match += 1
                if gpu.index in free:
                    n_free += 1
        if n_match < need_gpus:
            _note_gpu_shortfall(t, info, want_model, n_match)
            continue
        t.passed_gpus += 1

        if info.cpus_total < need_cpus:
            t.most_cpus.offer(info.cpus_total, name)
            continue
        t.passed_cpus += 1
        if info.memory_total_bytes < need_mem:
            t.most_mem.offer(info.memory_total_bytes, name)
            continue

        # The node could fit the request when empty; now: is it schedulable, and is there room?
        # NodeView.state, .cpus_free and .memory_free, inlined: the property calls cost a third
        # of the whole scan at 10,000 nodes.
        t.matching += 1
        if not view.up:
            t.down += 1
            continue
        if info.cordoned:
            t.cordoned += 1
            continue
        if info.reconciling:
            t.reconciling += 1
            continue
        cpus_free = info.cpus_total - view.cpus_used
        if cpus_free < 0:
            cpus_free = 0
        mem_free = info.memory_total_bytes - view.memory_used
        if mem_free < 0:
            mem_free = 0
        room = True
        if n_free < need_gpus:
            t.short_gpus += 1
            t.most_free_gpus.offer(n_free, name)
            room = False
        if cpus_free < need_cpus:
            t.short_cpus += 1
            t.most_free_cpus.offer(cpus_free, name)
            room = False
        if mem_free < need_mem:
            t.short_mem += 1
            t.most_free_mem.offer(mem_free, name)
            room = False
        if not room:
            continue

        key = (n_free - need_gpus, cpus_free - need_cpus, mem_free - need_mem, name)
        if best_key is None or key < best_key:
            best_key = key
            best = view

    if best is None:
        if t.matching == 0:
            raise Unsatisfiable(_unsatisfiable_message(request, t))
        raise InsufficientResources(_insufficient_message(request, t))

    # Lowest indexes first: deterministic, and re-placing the same request on an idle node gives
    # the same GPUs.
    chosen = sorted(
        g.index for g in best.info.gpus if g.index in best.free_indexes and _eligible(g, want_model, min_gpu_mem)
    )
    return Placement(
        node=best.name,
        gpu_indexes=tuple(chosen[:need_gpus]),
        node_record_revision=best.record_revision,
        snapshot_revision=snapshot.revision,
    )


def eligible_gpus(view: NodeView, request: ResourceRequest) -> tuple[int, int]:
    """(the node's GPUs that could serve ``request``, how many of them are free now): place()'s own
    rule, for callers that judge one node at a time (gang placement's choice and reasons)."""
    want_model = request.gpu_model.casefold()
    free = view.free_indexes
    n_match = n_free = 0
    for g in view.info.gpus:
        if _eligible(g, want_model, request.min_gpu_memory_bytes):
            n_match += 1
            n_free += g.index in free
    return n_match, n_free


def _eligible(gpu: GpuInfo, want_model: str, min_gpu_mem: int) -> bool:
    """Whether a GPU can serve the request; ``want_model`` is already casefolded."""
    return (
        gpu.healthy and (not want_model or gpu.model.casefold() == want_model) and gpu.memory_total_bytes >= min_gpu_mem
    )


def _labels_match(labels: Mapping[str, str], selector_items: tuple[tuple[str, str], ...], hits: dict[str, int]) -> bool:
    for label, value in selector_items:
        if labels.get(label) != value:
            # Count the labels this node does match, so that an all-miss can name a label no node has.
            for hit_label, hit_value in selector_items:
                if labels.get(hit_label) == hit_value:
                    hits[hit_label] += 1
            return False
    return True


def _note_gpu_shortfall(t: _Tally, info: NodeInfo, want_model: str, n_match: int) -> None:
    """Record why a node can never fit the GPUs; a second look at its GPUs, off the fit path."""
    t.most_match_gpus.offer(n_match, info.name)
    n_model = 0
    top_gpu_mem = -1
    for gpu in info.gpus:
        if not gpu.healthy:
            continue
        if not want_model or gpu.model.casefold() == want_model:
            n_model += 1
            top_gpu_mem = max(top_gpu_mem, gpu.memory_total_bytes)
        else:
            t.models_seen.add(gpu.model)
    t.most_model_gpus.offer(n_model, info.name)
    t.largest_gpu_mem.offer(top_gpu_mem, info.name)


@dataclass(slots=True)
class _Best:
    """The largest value seen among some nodes, and the node with it (lowest name on ties)."""

    value: int = -1
    node: str = ""

    def offer(self, value: int, node: str) -> None:
        # The name tie-break keeps error messages independent of the snapshot's dict order.
        if value > self.value or (value == self.value and node < self.node):
            self.value = value
            self.node = node


@dataclass(slots=True)
class _Tally:
    """What the scan saw, kept only to explain a failure.

    The first stage of the static funnel that no node passed is the one to report; its ``_Best``
    saw every node that reached it, so its value is a request that would get past it.
    """

    selector_hits: dict[str, int]
    passed_labels: int = 0
    passed_gpus: int = 0
    passed_cpus: int = 0
    models_seen: set[str] = field(default_factory=set)
    most_model_gpus: _Best = field(default_factory=_Best)
    largest_gpu_mem: _Best = field(default_factory=_Best)
    most_match_gpus: _Best = field(default_factory=_Best)
    most_cpus: _Best = field(default_factory=_Best)
    most_mem: _Best = field(default_factory=_Best)
    # Nodes that could ever fit the request, by why they can't take it now.
    matching: int = 0
    down: int = 0
    cordoned: int = 0
    reconciling: int = 0
    short_gpus: int = 0
    short_cpus: int = 0
    short_mem: int = 0
    most_free_gpus: _Best = field(default_factory=_Best)
    most_free_cpus: _Best = field(default_factory=_Best)
    most_free_mem: _Best = field(default_factory=_Best)


def _unsatisfiable_message(request: ResourceRequest, t: _Tally) -> str:
    selector = request.node_selector
    scope = f" matching node_selector {_fmt_selector(selector)}" if selector else ""

    if t.passed_labels == 0:
        missing = [f"{k}={v}" for k, v in sorted(selector.items()) if t.selector_hits[k] == 0]
        if missing:
            return (
                f"no registered node matches node_selector {_fmt_selector(selector)}: "
                f"no node has {_plural(len(missing), 'label', show_count=False)} {', '.join(missing)}; "
                "fix node_selector or label a node"
            )
        return (
            f"no registered node matches node_selector {_fmt_selector(selector)}: each label is on some "
            "node, but no node has all of them; drop a label from node_selector"
        )

    if t.passed_gpus == 0:
        best = t.most_match_gpus
        if best.value > 0:
            return (
                f"no node{scope} can ever fit {_fmt_gpus(request)}: the largest matching node "
                f"({best.node}) has {best.value}; ask for at most {best.value}"
            )
        if request.gpu_model and t.most_model_gpus.value <= 0:
            models = sorted(t.models_seen)
            shown = ", ".join(models[:_MAX_MODELS_LISTED]) + (", ..." if len(models) > _MAX_MODELS_LISTED else "")
            available = f"models available: {shown}" if models else "no node has any healthy GPU"
            return (
                f"no registered node{scope} has a healthy GPU of model '{request.gpu_model}' "
                f"({available}); fix gpu_model"
            )
        if request.min_gpu_memory_bytes > 0 and t.largest_gpu_mem.value >= 0:
            top = t.largest_gpu_mem
            of_model = f" of model '{request.gpu_model}'" if request.gpu_model else ""
            return (
                f"no healthy GPU{of_model} on any node{scope} has at least "
                f"{_fmt_bytes(request.min_gpu_memory_bytes)} of memory: the largest has "
                f"{_fmt_bytes(top.value)} ({top.node}); lower min_gpu_memory_bytes to at most {top.value}"
            )
        return f"no registered node{scope} has any healthy GPU; ask for 0 GPUs or fix the GPUs' health"

    alongside = f" alongside {_fmt_gpus(request)}" if request.gpus > 0 else ""
    if t.passed_cpus == 0:
        best = t.most_cpus
        return (
            f"no node{scope} can ever fit {_plural(request.cpus, 'CPU')}{alongside}: the largest such node "
            f"({best.node}) has {best.value}; ask for at most {best.value}"
        )
    best = t.most_mem
    return (
        f"no node{scope} can ever fit {_fmt_bytes(request.memory_bytes)} of memory{alongside}: the largest "
        f"such node ({best.node}) has {_fmt_bytes(best.value)}; ask for at most {best.value} memory_bytes"
    )


def _insufficient_message(request: ResourceRequest, t: _Tally) -> str:
    busy = t.matching - t.down - t.cordoned - t.reconciling
    states = [f"{busy} up but busy"] if busy else []
    if t.down:
        states.append(f"{t.down} down")
    if t.cordoned:
        states.append(f"{t.cordoned} cordoned")
    if t.reconciling:
        states.append(f"{t.reconciling} restarting (agent adopting its containers)")
    wants = [_fmt_gpus(request)] if request.gpus > 0 else []
    if request.cpus > 0:
        wants.append(_plural(request.cpus, "CPU"))
    if request.memory_bytes > 0:
        wants.append(f"{_fmt_bytes(request.memory_bytes)} of memory")
    what = ", ".join(wants[:-1]) + " and " + wants[-1] if len(wants) > 1 else "".join(wants) or "the request"
    head = f"no node has room for {what} right now ({_plural(t.matching, 'matching node')}: {', '.join(states)})"
    if not busy:
        return f"{head}; every node that could fit it is down, cordoned or restarting: bring one back up or uncordon it"

    # Shortages across the busy nodes; a node can be short of more than one thing.
    short: list[str] = []
    if t.short_gpus:
        b = t.most_free_gpus
        short.append(f"free GPUs on {t.short_gpus} (most: {b.value} on {b.node})")
    if t.short_cpus:
        b = t.most_free_cpus
        short.append(f"free CPUs on {t.short_cpus} (most: {b.value} on {b.node})")
    if t.short_mem:
        b = t.most_free_mem
        short.append(f"free memory on {t.short_mem} (most: {_fmt_bytes(b.value)} on {b.node})")
    return f"{head}; short of {', '.join(short)}; retry later or release allocations"


def _fmt_gpus(request: ResourceRequest) -> str:
    text = _plural(request.gpus, "GPU")
    if request.gpu_model:
        text += f" of model '{request.gpu_model}'"
    if request.min_gpu_memory_bytes > 0:
        text += f" with at least {_fmt_bytes(request.min_gpu_memory_bytes)} each"
    return text


def _fmt_selector(selector: Mapping[str, str]) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in sorted(selector.items())) + "}"


def _fmt_bytes(n: int) -> str:
    # Exact bytes unless it is a whole number of GiB, so the user can copy the number back.
    if n % _GIB == 0:
        return f"{n // _GIB} GiB"
    return f"{n} bytes ({n / _GIB:.1f} GiB)"


def _plural(n: int, noun: str, *, show_count: bool = True) -> str:
    word = noun if n == 1 else noun + "s"
    return f"{n} {word}" if show_count else word
