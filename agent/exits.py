"""Container exits the agent has seen, waiting to go to the coordinator in a heartbeat.

The enforcer lists the node's managed containers every interval (agent/enforcer.py); each
container it finds exited that it had not seen exited before (by container id and finish time, so
a restarted container's next exit counts again) is queued here. The registrar sends at most
PER_HEARTBEAT of them with each heartbeat and drops them only once that heartbeat was answered:
at least once, the coordinator writing each exit under a key of its own (a resend changes nothing).

Bounded: beyond MAX_PENDING queued exits (a long coordinator outage) the oldest are dropped, with
a warning. After an agent restart, exits that finished more than MAX_AGE_S ago are not reported
(the retained exited containers of past hours are not news). Thread-safe: the enforcer and the
registrar may run on different event loops.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable

from gpulease.agent.runtime import ContainerInfo
from gpulease.v1.coordinator_pb2 import ContainerExit

log = logging.getLogger(__name__)

PER_HEARTBEAT = 100
MAX_PENDING = 1_000
MAX_AGE_S = 600.0


class ExitReports:
    def __init__(self, *, max_pending: int = MAX_PENDING, max_age_s: float = MAX_AGE_S) -> None:
        self._lock = threading.Lock()
        self._max_pending = max_pending
        self._max_age_ms = int(max_age_s * 1000)
        # (container id, finish ms as reported) -> the report; oldest first.
        self._pending: OrderedDict[tuple[str, int], ContainerExit] = OrderedDict()
        # (container id, finish ms as the runtime said) of exits already queued (or too old to report).
        self._seen: set[tuple[str, int]] = set()
        self.dropped = 0

    def note(self, infos: Iterable[ContainerInfo]) -> None:
        """One listing of this node's managed containers: queue the exits not seen before."""
        now_ms = int(time.time() * 1000)
        listed: set[str] = set()
        with self._lock:
            for info in infos:
                if info.state != "exited" or not info.allocation_id:
                    continue
                key = (info.id, info.finished_unix_ms)
                listed.add(info.id)
                if key in self._seen:
                    continue
                self._seen.add(key)
                finished = info.finished_unix_ms or now_ms  # unknown: when first seen, kept for resends
                if now_ms - finished > self._max_age_ms:
                    continue
                ex = ContainerExit(allocation_id=info.allocation_id, container_id=info.id, finished_unix_ms=finished)
                if info.exit_code is not None:
                    ex.exit_code = info.exit_code
                self._pending[(info.id, finished)] = ex
            # Forget removed containers (their exits can no longer be seen again).
            keep = listed | {cid for cid, _ in self._pending}
            self._seen = {k for k in self._seen if k[0] in keep}
            excess = len(self._pending) - self._max_pending
            if excess > 0:
                for _ in range(excess):
                    self._pending.popitem(last=False)
                self.dropped += excess
                log.warning("%d container exit(s) not yet sent to the coordinator dropped (more than %d queued)",
                            excess, self._max_pending)  # fmt: skip

    def batch(self, limit: int = PER_HEARTBEAT) -> list[ContainerExit]:
        """The oldest queued exits, for the next heartbeat."""
        with self._lock:
            return [ex for _, ex in zip(range(limit), self._pending.values(), strict=False)]

    def sent(self, exits: Iterable[ContainerExit]) -> None:
        """A heartbeat carrying ``exits`` was answered: they are the coordinator's now."""
        with self._lock:
            for ex in exits:
                self._pending.pop((ex.container_id, ex.finished_unix_ms), None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)
