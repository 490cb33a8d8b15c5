"""GpuContainerTrigger: waits for a container in the triggerer (no worker slot held), keeping the
allocation's lease alive meanwhile, then hands the exit code back to GpuContainerOperator."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from gpulease.airflow.hooks import GpuLeaseHook
from gpulease.errors import GpuLeaseError


class GpuContainerTrigger(BaseTrigger):
    def __init__(
        self, *, gpulease_conn_id: str, allocation_id: str, container_id: str, ttl: int, poll_interval: float = 5.0
    ) -> None:
        super().__init__()
        self.gpulease_conn_id = gpulease_conn_id
        self.allocation_id = allocation_id
        self.container_id = container_id
        self.ttl = ttl
        self.poll_interval = poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "gpulease.airflow.triggers.GpuContainerTrigger",
            {
                "gpulease_conn_id": self.gpulease_conn_id,
                "allocation_id": self.allocation_id,
                "container_id": self.container_id,
                "ttl": self.ttl,
                "poll_interval": self.poll_interval,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = GpuLeaseHook(self.gpulease_conn_id)
        base = {"allocation_id": self.allocation_id, "container_id": self.container_id}
        try:
            targets, timeout = await asyncio.to_thread(hook.settings)
            from gpulease.client.aio import AsyncClient

            async with AsyncClient(targets, timeout=timeout) as client:
                renew_every = max(1.0, self.ttl / 3)
                next_renewal = time.monotonic()
                while True:
                    if time.monotonic() >= next_renewal:
                        await client.keep_alive(self.allocation_id)
                        next_renewal = time.monotonic() + renew_every
                    wait = max(1, int(min(self.poll_interval, renew_every)))
                    status = await client.wait_container(self.allocation_id, self.container_id, timeout=wait)
                    if status.exited:
                        yield TriggerEvent({**base, "status": "success", "exit_code": status.exit_code})
                        return
        except GpuLeaseError as exc:
            yield TriggerEvent({**base, "status": "error", "message": f"{type(exc).__name__}: {exc.message}"})
