"""Restart reconciliation: a restarted agent adopts the containers it may keep, stops the rest.

Docker (the containers' labels) is the truth about what runs; the coordinator (etcd) about what
may run. At start, before any new container is placed, every running managed container is
checked against the node's live allocations: live at the same revision -> adopted (left running
as it is: no restart, no second copy); otherwise stopped.

Until this has been done once, the inventory says ``reconciling=true`` (the coordinator offers no
GPUs of such a node) and StartContainer answers UNAVAILABLE. While the coordinator cannot be
reached, the agent keeps retrying with a bounded backoff. It leaves the containers running
meanwhile: nothing new can be placed on this node's GPUs until it is done, so nothing can
collide with them, and a short coordinator outage must not kill every job of a node.

With no running managed container (or no container runtime: no Docker) there is nothing to adopt
and reconciliation ends at once, without asking the coordinator; the enforcer deals with any
container that shows up later (e.g. once Docker is back).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from gpulease.agent.containers import ReadyGate
from gpulease.agent.enforcer import Enforcer, Verdict, judge
from gpulease.agent.runtime import ContainerInfo
from gpulease.errors import GpuLeaseError

log = logging.getLogger(__name__)

MIN_BACKOFF_S = 0.2
MAX_BACKOFF_S = 5.0


@dataclass
class ReconcileReport:
    adopted: list[ContainerInfo] = field(default_factory=list)
    stopped: list[Verdict] = field(default_factory=list)
    runtime_available: bool = True
    attempts: int = 1


class Reconciler:
    def __init__(
        self,
        *,
        enforcer: Enforcer,
        gate: ReadyGate,
        on_done: Callable[[], Awaitable[None]] | None = None,
        max_backoff: float = MAX_BACKOFF_S,
    ) -> None:
        self._enforcer = enforcer
        self._gate = gate
        self._on_done = on_done
        self._max_backoff = max_backoff

    async def run(self) -> ReconcileReport:
        """Retry until one pass succeeds, then open the gate. Returns its report."""
        attempt = 0
        while True:
            attempt += 1
            try:
                report = await self.reconcile_once()
            except GpuLeaseError as e:
                delay = random.uniform(0.5, 1.0) * min(self._max_backoff, MIN_BACKOFF_S * 2 ** min(attempt, 16))
                if attempt == 1 or attempt % 10 == 0:
                    log.warning(
                        "cannot reconcile containers yet (attempt %d: %s); the node offers no GPUs and starts no "
                        "containers until it can; retrying",
                        attempt,
                        e.message,
                    )
                await asyncio.sleep(delay)
                continue
            report.attempts = attempt
            break
        self._gate.open()
        log.info(
            "reconciliation done: adopted %d running container(s), stopped %d%s",
            len(report.adopted),
            len(report.stopped),
            "" if report.runtime_available else " (no container runtime available: nothing to adopt)",
        )
        if self._on_done is not None:
            await self._on_done()
        return report

    async def reconcile_once(self) -> ReconcileReport:
        """One pass. GpuLeaseError (e.g. Unavailable) when the coordinator cannot be asked: nothing changes."""
        running = await self._enforcer.running_containers()
        if not running:
            # Nothing to adopt or stop: no need to ask the coordinator (the enforcer will, every interval).
            return ReconcileReport(runtime_available=running is not None)
        live = await self._enforcer.list_live()
        adopted, stop = judge(self._enforcer.node, running, live)
        for c in adopted:
            log.info(
                "adopting container %s (%s) of allocation %s (revision %d): its allocation is live",
                c.id[:12],
                c.name,
                c.allocation_id,
                c.revision,
            )
        await self._enforcer.stop_all(stop)
        return ReconcileReport(adopted=adopted, stopped=stop, runtime_available=running is not None)
