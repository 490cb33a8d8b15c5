"""Container exits reported by agents in their heartbeats, recorded as audit entries (issue 16, section 5).

An agent reports each exit of a container of an allocation on its node until a heartbeat carrying
it is answered (at least once). Each exit becomes one audit entry,
``audit/<finished ms>-<allocation id>.exit.<container id>``: the key is derived from the exit
alone, and it is written only if absent (one transaction per exit), so a resent exit writes
nothing. events.py turns the entry into CONTAINER_EXITED.

An agent speaks only for its own node (NodeRestriction): an exit is recorded only when the
allocation's containers record (containers/<id>, written by RunContainer) names the reporting node,
or, failing that record, the live allocation holds GPUs there. Others are ignored with a warning.
The node record is never rewritten.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from gpulease.common.settings import ALLOCATION_ID_RE
from gpulease.coordinator.audit import entry_put
from gpulease.coordinator.endings import ContainerHome, home_of
from gpulease.coordinator.keys import Keys
from gpulease.coordinator.store import Cmp, Store
from gpulease.coordinator.view import ClusterView
from gpulease.v1.coordinator_pb2 import ContainerExit

log = logging.getLogger(__name__)

ACTION = "container-exit"
# More than an agent sends per heartbeat (agent/exits.py sends 100); the rest are ignored.
MAX_EXITS_PER_HEARTBEAT = 100
_CONTAINER_ID_RE = re.compile(r"^[0-9a-f]{8,64}$")
_MAX_ERROR = 500
_MAX_SKEW_MS = 3_600_000


@dataclass(frozen=True)
class Recorded:
    written: int = 0  # new entries
    repeated: int = 0  # already recorded (a resend)
    ignored: int = 0  # malformed, or not this node's


def unique(allocation_id: str, container_id: str) -> str:
    return f"{allocation_id}.exit.{container_id}"


def describe(exit_code: int | None, error: str) -> str:
    parts = [f"exit code {exit_code}" if exit_code is not None else "exit code unknown"]
    if error:
        parts.append(error)
    return "; ".join(parts)


def _home(view: ClusterView, allocation_id: str) -> ContainerHome | None:
    home = home_of(view.table("containers").get(allocation_id))
    if home is not None:
        return home
    a = view.allocation(allocation_id)
    if a is None:
        return None
    return ContainerHome(a.node, a.principal, a.tenant, False, tuple(a.nodes) if a.is_gang else ())


async def record(store: Store, view: ClusterView, keys: Keys, node: str, exits: Sequence[ContainerExit]) -> Recorded:
    """Write one audit entry per exit of ``node``'s containers not yet recorded. Raises on an etcd
    failure (the heartbeat fails and the agent sends the exits again)."""
    written = repeated = ignored = 0
    if len(exits) > MAX_EXITS_PER_HEARTBEAT:
        log.warning("node %s reported %d container exits in one heartbeat; only the first %d are recorded",
                    node, len(exits), MAX_EXITS_PER_HEARTBEAT)  # fmt: skip
        ignored += len(exits) - MAX_EXITS_PER_HEARTBEAT
    now_ms = int(time.time() * 1000)
    for ex in exits[:MAX_EXITS_PER_HEARTBEAT]:
        aid, cid = ex.allocation_id, ex.container_id
        # A finish time in the future beyond clock skew is a bug: it would sort past every entry.
        valid_ms = 0 < ex.finished_unix_ms <= now_ms + _MAX_SKEW_MS
        if not ALLOCATION_ID_RE.match(aid) or not _CONTAINER_ID_RE.match(cid) or not valid_ms:
            log.warning("node %s reported a malformed container exit (allocation %r, container %r, "
                        "finished %d); ignored", node, aid[:80], cid[:80], ex.finished_unix_ms)  # fmt: skip
            ignored += 1
            continue
        home = _home(view, aid)
        if home is None or node not in home.all_nodes:
            log.warning("node %s reported an exit of container %s of allocation %s, whose containers are %s; ignored",
                        node, cid[:12], aid, "unknown" if home is None else f"on {home.node}")  # fmt: skip
            ignored += 1
            continue
        code = ex.exit_code if ex.HasField("exit_code") else None
        detail = describe(code, ex.error[:_MAX_ERROR])
        extra = {"node": node, "container": cid, "principal": home.principal}
        put = entry_put(keys, f"agent:{node}", ACTION, aid, tenant=home.tenant, detail=detail, unique=unique(aid, cid),
                        ms=ex.finished_unix_ms, extra=extra)  # fmt: skip
        out = await store.txn([Cmp(put.key, "create", "==", 0)], [put])
        if out.succeeded:
            written += 1
        else:
            repeated += 1
    return Recorded(written, repeated, ignored)
