"""GPUs that ran containers are free again only once their node's agent has stopped those containers.

An allocation's GPUs used to be free the moment its lease lapsed or it was released. An agent cut off
from every coordinator cannot learn that; it stops the containers it can no longer vouch for only a
TTL after it last heard from one, so the GPU could be granted again while the old container still ran
on it (fault suite, "network partition of an agent"; issue 17).

So RunContainer first writes `drain/<node>/<allocation>` = the GPUs the allocation holds on that node
(no lease), compared on the allocation still being live. Placement counts those GPUs as held for as
long as the key exists (`ClusterView`, the one rule `gpu_free` sees them in `gpus_held`), and the
allocation transaction range-compares `drain/<node>/` as it does `res/<node>/`, so a commit placed on
a snapshot from before a drain key existed fails. The key goes when a heartbeat from the node reports
an `enforced_revision` at or past the revision at which the allocation ended: the agent listed the
node's live allocations at that revision and stopped every container of an ended one
(`agent/enforcer.py`). Allocations that never ran a container are not delayed at all.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from gpulease.coordinator.domain import Allocation
from gpulease.coordinator.keys import Keys
from gpulease.coordinator.store import Cmp, Delete, Op, Put


@dataclass(frozen=True)
class Drain:
    allocation_id: str
    gpus: frozenset[str]  # UUIDs
    mod_revision: int
    # The revision at which the allocation ended (None: still live).
    ended_at: int | None


def encode(uuids: Iterable[str]) -> bytes:
    return json.dumps({"gpus": sorted(uuids)}, separators=(",", ":")).encode()


def decode(raw: bytes) -> frozenset[str]:
    try:
        return frozenset(str(u) for u in json.loads(raw)["gpus"])
    except (ValueError, KeyError, TypeError):
        return frozenset()


def marks(keys: Keys, alloc: Allocation) -> list[Op]:
    """The drain keys of every member node of ``alloc`` (written with its first container)."""
    return [Put(keys.drain(m.node, alloc.id), encode(g.uuid for g in m.gpus)) for m in alloc.members]


def clearable(drains: Iterable[Drain], enforced_revision: int) -> list[Drain]:
    """The drains a node whose agent enforced up to ``enforced_revision`` no longer needs."""
    if enforced_revision <= 0:
        return []
    return [d for d in drains if d.ended_at is not None and d.ended_at <= enforced_revision]


def clear_txn(keys: Keys, node: str, drains: Iterable[Drain]) -> tuple[list[Cmp], list[Op]]:
    """Compares and deletes that remove exactly these drain keys (a rewritten one stays)."""
    cmps: list[Cmp] = []
    ops: list[Op] = []
    for d in drains:
        key = keys.drain(node, d.allocation_id)
        cmps.append(Cmp(key, "mod", "==", d.mod_revision))
        ops.append(Delete(key))
    return cmps, ops
