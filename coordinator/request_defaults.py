"""CPU and memory for a request that names only GPUs (issue 15, section 7).

The configured per-GPU default (``default_cpus_per_gpu``, ``default_memory_per_gpu``) is capped by
a node's share per GPU: a node with C CPUs and G GPUs offers C*n/G CPUs to a request for n of its
GPUs (at least 1), and likewise for memory. So ``--gpus 3`` on a 4-GPU node of a 2-CPU host asks for
1 CPU, not the 3 that a fixed 1-per-GPU default would (and that no node could ever give).

Which node it lands on is only known at placement; the default is taken from the most generous
node that could hold the request (enough usable GPUs of the model, matching the selector), so it
fits at least the nodes of that shape. A cluster of one node shape, the usual case, gets exactly its
share. The request's idempotency shape records "auto", not the figure, so that a retry after the
cluster changed is still the same request.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from gpulease.coordinator.domain import NodeView, ResourceRequest


def node_share(views: Iterable[NodeView], req: ResourceRequest) -> tuple[int, int] | None:
    """The largest (CPUs, memory) share per request of any node that could hold ``req``; None when
    no node could (placement then says why)."""
    best: tuple[int, int] | None = None
    for v in views:
        info = v.info
        gpus = [g for g in info.gpus if g.healthy and (not req.gpu_model or g.model == req.gpu_model)]
        if len(gpus) < req.gpus or not info.gpus:
            continue
        if any(info.labels.get(k) != val for k, val in req.node_selector.items()):
            continue
        share = (max(1, info.cpus_total * req.gpus // len(info.gpus)),
                 max(1, info.memory_total_bytes * req.gpus // len(info.gpus)))  # fmt: skip
        best = share if best is None else (max(best[0], share[0]), max(best[1], share[1]))
    return best


def with_defaults(req: ResourceRequest, views: Iterable[NodeView]) -> ResourceRequest:
    """``req`` with its defaulted CPU and memory capped by the node share (explicit ones untouched)."""
    if not (req.cpus_auto or req.memory_auto):
        return req
    share = node_share(views, req)
    if share is None:
        return req
    cpus = min(req.cpus, share[0]) if req.cpus_auto else req.cpus
    memory = min(req.memory_bytes, share[1]) if req.memory_auto else req.memory_bytes
    return replace(req, cpus=cpus, memory_bytes=memory)
