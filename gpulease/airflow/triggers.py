"""Triggers: the waits of the operators, in the triggerer (no worker slot held).

- GpuContainerTrigger waits for a container, keeping the allocation's lease alive meanwhile, then
  hands the exit code back to GpuContainerOperator.
- GpuAllocationTrigger waits in the coordinator's queue (WaitAllocate) for an allocation of
  GpuAllocateOperator or GpuContainerOperator(gpus=), and hands the allocation back.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from gpulease.airflow._util import describe_pending, error_event
from gpulease.airflow.hooks import GpuLeaseHook
from gpulease.client import PendingInfo
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


# A Conflict while waiting (the waiting lease lapsed on the coordinator's side, or another call
# took the request over) is answered by sending the request again after this pause.
CONFLICT_PAUSE_S = 1.0


class GpuAllocationTrigger(BaseTrigger):
    """Waits in the coordinator's queue for an allocation (the stream WaitAllocate), logging each
    pending status (position, reason, estimated start) into the task log.

    ``request``: the keyword arguments of ``allocate`` (gpus, cpus, memory, ..., ttl, owner,
    max_runtime, priority), with the task's stable ``request_id``; ``wait_until``: the wait's
    deadline, Unix seconds, fixed when the task first deferred. The waiting request is kept in the
    queue by this trigger's stream: if the triggerer stops, the request leaves the queue within
    the coordinator's ``queue_ttl`` unless a triggerer runs the trigger again first, which sends
    the same request id and so takes the same pending request over (its place kept), or gets the
    allocation it was admitted to meanwhile. Nothing is queued twice.

    Fires one event: {"status": "success", "allocation": the allocation as a dict}, or
    {"status": "error", "error": class name, "message": ...} (a wait that ran out names the
    coordinator's last pending reason). The allocation is handed over on its own lease (its TTL);
    the task keeps it from there."""

    def __init__(self, *, gpulease_conn_id: str, request: dict[str, Any], wait_until: float) -> None:
        super().__init__()  # type: ignore[no-untyped-call,unused-ignore]
        self.gpulease_conn_id = gpulease_conn_id
        self.request = dict(request)
        self.wait_until = float(wait_until)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "gpulease.airflow.triggers.GpuAllocationTrigger",
            {"gpulease_conn_id": self.gpulease_conn_id, "request": self.request, "wait_until": self.wait_until},
        )

    @property
    def request_id(self) -> str:
        return str(self.request.get("request_id") or "")

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            payload = await self._wait()
        except Exception as exc:  # an event, not a crash: the task fails with the reason
            self.log.exception("waiting in the queue for request %s failed", self.request_id)
            payload = error_event(exc)
        yield TriggerEvent({"request_id": self.request_id, **payload})  # type: ignore[no-untyped-call,unused-ignore]

    async def _wait(self) -> dict[str, Any]:
        last_reason = ""

        def on_pending(status: PendingInfo) -> None:
            nonlocal last_reason
            last_reason = status.reason
            self.log.info("%s", describe_pending(status))

        async with await GpuLeaseHook(self.gpulease_conn_id).get_async_conn() as client:
            while True:
                # The deadline the task set: a trigger run again (a triggerer restarted) waits only
                # what is left. The coordinator keeps the deadline of the request it first queued.
                left = max(1, math.ceil(self.wait_until - time.time()))
                try:
                    alloc = await client.allocate(**self.request, wait=left, on_pending=on_pending)
                except Conflict as exc:
                    if time.time() + CONFLICT_PAUSE_S >= self.wait_until:
                        return error_event(exc, last_reason)
                    self.log.warning("the wait for request %s was interrupted (%s); sending it again",
                                     self.request_id, exc.message)  # fmt: skip
                    await asyncio.sleep(CONFLICT_PAUSE_S)
                    continue
                except GpuLeaseError as exc:
                    return error_event(exc, last_reason)
                self.log.info("request %s admitted: allocation %s on %s, GPUs %s",
                              self.request_id, alloc.id, alloc.node, list(alloc.gpu_indexes))  # fmt: skip
                return {"status": "success", "allocation": alloc.to_dict()}

    async def on_kill(self) -> None:
        """The user killed the deferred task: the pending request leaves the queue with this
        trigger's stream; an allocation it was admitted to just then is released."""
        client = await GpuLeaseHook(self.gpulease_conn_id).get_async_conn()
        async with client:
            owner = str(self.request.get("owner") or "")
            for alloc in await client.list_allocations(owner=owner):
                if alloc.request_id == self.request_id:
                    await client.release(alloc.id)
                    self.log.info("released %s, admitted for request %s", alloc.id, self.request_id)
