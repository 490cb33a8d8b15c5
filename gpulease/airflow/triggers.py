"""GpuContainerTrigger: waits for a container in the triggerer (no worker slot held), keeping the
allocation's lease alive meanwhile, then hands the exit code back to GpuContainerOperator."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from gpulease.airflow.hooks import GpuLeaseHook
from gpulease.errors import Conflict, DeadlineExceeded, GpuLeaseError, Internal, Unavailable

# Worth retrying for as long as the lease can last; anything else (the allocation or container is
# gone, the request is refused) ends the wait at once.
_TRANSIENT = (Unavailable, DeadlineExceeded, Conflict, Internal)


class GpuContainerTrigger(BaseTrigger):
    """Fires one event: {"status": "success", "exit_code": ...} when the container exits, or
    {"status": "error", "message": ...} when it can no longer be waited for (the allocation is gone,
    or the coordinator could not be reached for longer than the lease's TTL)."""

    def __init__(
        self,
        *,
        gpulease_conn_id: str,
        allocation_id: str,
        container_id: str,
        ttl: int,
        poll_interval: float = 5.0,
        owned: bool = False,
        stop_grace: int = 30,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call,unused-ignore]
        self.gpulease_conn_id = gpulease_conn_id
        self.allocation_id = allocation_id
        self.container_id = container_id
        self.ttl = ttl
        self.poll_interval = poll_interval
        self.owned = owned
        self.stop_grace = stop_grace

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "gpulease.airflow.triggers.GpuContainerTrigger",
            {
                "gpulease_conn_id": self.gpulease_conn_id,
                "allocation_id": self.allocation_id,
                "container_id": self.container_id,
                "ttl": self.ttl,
                "poll_interval": self.poll_interval,
                "owned": self.owned,
                "stop_grace": self.stop_grace,
            },
        )

    def _event(self, **payload: Any) -> TriggerEvent:
        # "owned" rides along in the event as well as in the task's next_kwargs: dag.test() hands
        # execute_complete the event alone.
        base = {"allocation_id": self.allocation_id, "container_id": self.container_id, "owned": self.owned}
        return TriggerEvent({**base, **payload})  # type: ignore[no-untyped-call,unused-ignore]

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            payload = await self._wait()
        except Exception as exc:  # an event, not a crash: execute_complete still releases what the task took
            self.log.exception("waiting for container %s failed", self.container_id[:12])
            payload = {"status": "error", "message": f"{type(exc).__name__}: {exc}"}
        yield self._event(**payload)

    async def _wait(self) -> dict[str, Any]:
        """Keep the lease alive and wait for the container; returns the event's payload."""
        async with await GpuLeaseHook(self.gpulease_conn_id).get_async_conn() as client:
            renew_every = max(1.0, self.ttl / 3)
            last_renewal = time.monotonic()  # the task kept it alive until it deferred
            next_renewal = last_renewal
            while True:
                try:
                    if time.monotonic() >= next_renewal:
                        await client.keep_alive(self.allocation_id)
                        last_renewal = time.monotonic()
                        next_renewal = last_renewal + renew_every
                    wait = max(1.0, min(self.poll_interval, next_renewal - time.monotonic()))
                    status = await client.wait_container(self.allocation_id, self.container_id, timeout=wait)
                except _TRANSIENT as exc:
                    if time.monotonic() - last_renewal > self.ttl:
                        message = f"the lease could not be renewed for {self.ttl}s ({type(exc).__name__}: {exc})"
                        return {"status": "error", "message": message}
                    self.log.warning("waiting for container %s: %s; retrying", self.container_id[:12], exc)
                    await asyncio.sleep(min(self.poll_interval, 5.0))
                    continue
                except GpuLeaseError as exc:
                    return {"status": "error", "message": f"{type(exc).__name__}: {exc.message}"}
                if status.exited:
                    return {"status": "success", "exit_code": status.exit_code, "error": status.error}

    async def on_kill(self) -> None:
        """The user killed the deferred task: stop the container, release the allocation if the task made it."""
        client = await GpuLeaseHook(self.gpulease_conn_id).get_async_conn()
        async with client:
            try:
                await client.stop_container(self.allocation_id, self.container_id, grace=self.stop_grace)
            except GpuLeaseError as exc:
                self.log.warning("could not stop container %s: %s", self.container_id[:12], exc)
            if self.owned:
                await client.release(self.allocation_id)
