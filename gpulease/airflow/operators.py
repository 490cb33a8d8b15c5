"""Operators: GpuAllocateOperator (setup), GpuContainerOperator (train), GpuReleaseOperator (teardown).

The classic DAG shape is `allocate >> train >> release` with `release.as_teardown(setups=allocate)`:
the teardown runs whatever happens to train, and a failed train still fails the run.

With `wait=` the allocating operators wait in the coordinator's queue when nothing fits now: in
the worker, or, with `deferrable=True`, in the triggerer (GpuAllocationTrigger).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseOperator

from gpulease.airflow._util import (
    ConnectionSettings,
    LineSplitter,
    allocation_id_of,
    describe_pending,
    error_of,
    owner_for,
    request_id_for,
    wait_seconds,
)
from gpulease.airflow.hooks import GpuLeaseHook
from gpulease.client import Allocation, Client, Container, ContainerHandle, LogChunk, PendingInfo
from gpulease.errors import GpuLeaseError, InsufficientResources, RequestReleased

__all__ = [
    "DEFAULT_SETUP_TTL",
    "DEFAULT_TASK_TTL",
    "ContainerFailed",
    "GpuAllocateOperator",
    "GpuContainerOperator",
    "GpuReleaseOperator",
    "allocation_id_of",
    "request_id_for",
]

# GpuAllocateOperator's TTL must outlive the gap until the container task starts keeping the
# lease alive; if the DAG dies, the GPUs come back after at most this long.
DEFAULT_SETUP_TTL = "15m"
# A lease that a running task keeps alive itself can be short: a dead worker frees GPUs fast.
DEFAULT_TASK_TTL = "2m"


class ContainerFailed(RuntimeError):
    """The container exited with a non-zero code (or could not report one)."""

    def __init__(self, message: str, exit_code: int | None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _release_quietly(client: Client, allocation_id: str, log: Any) -> None:
    """Release on a path that is already failing: a failure here must not hide the first error."""
    try:
        released = client.release(allocation_id)
    except GpuLeaseError as exc:
        log.warning("could not release %s (%s); its lease expires by itself", allocation_id, exc)
        return
    log.info("released %s" if released else "%s had already ended (released or expired)", allocation_id)


# A deferred wait's deadline in Airflow (the defer timeout) lies this long after the wait's own:
# only a trigger that hangs meets it; the trigger reports a wait that ran out itself.
DEFER_GRACE_S = 300


class _Waits:
    """What the allocating operators share about waiting in the coordinator's queue."""

    gpulease_conn_id: str
    wait: int | str | None
    log: Any

    def _log_pending(self, status: PendingInfo) -> None:
        self.log.info("%s", describe_pending(status))

    def _allocate(self, client: Client, request: dict[str, Any], *, deferrable: bool) -> Allocation | None:
        """Allocate with ``request`` (allocate's arguments). Without a wait: now or fail. With one:
        wait in the queue here, or, when deferrable, allocate if it fits now and otherwise return
        None (the caller defers: ``_defer_wait``)."""
        try:
            return self._allocate_once(client, request, deferrable=deferrable)
        except RequestReleased:
            # The stable id brings back an allocation an earlier try left live; this one was released
            # (an earlier try finished with it) a short while ago and is refused until its tombstone
            # expires: ask under an id of this try's own. (A deferred wait carries the new id on.)
            request["request_id"] = f"{request['request_id']}.{uuid.uuid4().hex[:8]}"
            self.log.info("the task's request id was released by an earlier try; asking as %s", request["request_id"])
            return self._allocate_once(client, request, deferrable=deferrable)

    def _allocate_once(self, client: Client, request: dict[str, Any], *, deferrable: bool) -> Allocation | None:
        if not wait_seconds(self.wait):
            return client.allocate(**request)
        if not deferrable:
            self.log.info("waiting up to %s in the queue for request %s", self.wait, request["request_id"])
            return client.allocate(**request, wait=self.wait, on_pending=self._log_pending)
        try:
            return client.allocate(**request)
        except InsufficientResources as exc:
            self.log.info("nothing fits now (%s)", exc.message)
            return None

    def _wait_trigger(self, request: dict[str, Any]) -> dict[str, Any]:
        """defer()'s trigger and timeout for a wait in the triggerer (the caller adds method_name)."""
        from gpulease.airflow.triggers import GpuAllocationTrigger

        seconds = wait_seconds(self.wait)
        self.log.info("deferring: request %s waits up to %s in the queue, in the triggerer",
                      request["request_id"], self.wait)  # fmt: skip
        trigger = GpuAllocationTrigger(
            gpulease_conn_id=self.gpulease_conn_id, request=request, wait_until=time.time() + seconds
        )
        return {"trigger": trigger, "timeout": timedelta(seconds=seconds + DEFER_GRACE_S)}


class GpuAllocateOperator(_Waits, BaseOperator):
    """Allocate GPUs; the XCom is the allocation as a dict. Meant as a setup task.

    The request id comes from dag_id / run_id / task_id / map_index, so a retry of this task gets
    back the allocation an earlier try made (its lease renewed) rather than a second one. If the
    task fails after allocating, before its XCom is stored, it releases what it took.

    ``wait`` (e.g. "30m"): when nothing fits now, wait in the coordinator's queue up to that long
    (each pending status, with its position and reason, goes to the task log); a wait that runs
    out fails the task with InsufficientResources naming the last reason. ``max_runtime``: the
    allocation is not renewed past it (and may start sooner: see docs/scheduling.md).
    ``priority``: a priority class of the coordinator. With ``deferrable=True`` the wait happens
    in the triggerer (GpuAllocationTrigger), with the same request id: a triggerer that restarts
    takes the same pending request over. The admitted allocation is handed on as without waiting:
    on its own lease of ``ttl``, renewed once when the task resumes.
    """

    template_fields: Sequence[str] = ("owner_name", "gpu_model", "node_selector", "wait", "max_runtime", "priority")
    ui_color = "#e6f0ff"

    def __init__(
        self,
        *,
        gpus: int,
        cpus: int | None = None,
        memory: int | str | None = None,
        gpu_model: str = "",
        min_gpu_memory: int | str | None = None,
        node_selector: dict[str, str] | None = None,
        ttl: int | str = DEFAULT_SETUP_TTL,
        owner_name: str = "",
        wait: int | str | None = None,
        max_runtime: int | str | None = None,
        priority: str = "",
        deferrable: bool = False,
        gpulease_conn_id: str = GpuLeaseHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.gpus, self.cpus, self.memory, self.gpu_model = gpus, cpus, memory, gpu_model
        self.min_gpu_memory, self.node_selector, self.ttl = min_gpu_memory, node_selector, ttl
        self.owner_name = owner_name
        self.wait, self.max_runtime, self.priority, self.deferrable = wait, max_runtime, priority, deferrable
        self.gpulease_conn_id = gpulease_conn_id

    def _request(self, context: Any) -> dict[str, Any]:
        """allocate's arguments (plain data: a trigger carries them)."""
        return {
            "gpus": self.gpus, "cpus": self.cpus, "memory": self.memory, "gpu_model": self.gpu_model,
            "min_gpu_memory": self.min_gpu_memory, "node_selector": self.node_selector, "ttl": self.ttl,
            "owner": self.owner_name or owner_for(context), "request_id": request_id_for(context),
            "max_runtime": self.max_runtime or None, "priority": self.priority or "",
        }  # fmt: skip

    def execute(self, context: Any) -> dict[str, Any]:
        ti = context["ti"]
        with GpuLeaseHook(self.gpulease_conn_id).get_conn() as client:
            request = self._request(context)
            alloc = self._allocate(client, request, deferrable=self.deferrable)
            if alloc is None:
                self.defer(**self._wait_trigger(request), method_name="execute_complete")
            # Possibly the allocation of an earlier try: give it a whole TTL again.
            return self._hand_on(client, alloc.to_dict(), renew=(ti.try_number or 1) > 1)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        """Resumed from GpuAllocationTrigger: the allocation it was admitted to, or the wait's failure."""
        if event.get("status") != "success":
            raise error_of(event)
        info: dict[str, Any] = event["allocation"]
        self.log.info("resumed: request %s was admitted from the queue", info.get("request_id"))
        with GpuLeaseHook(self.gpulease_conn_id).get_conn() as client:
            # Admitted a while ago (the task waited for a worker since): a whole TTL from now.
            return self._hand_on(client, info, renew=True)

    def _hand_on(self, client: Client, info: dict[str, Any], *, renew: bool) -> dict[str, Any]:
        """The XCom: the allocation as a dict, on its own lease of ttl (renewed first if ``renew``)."""
        try:
            if renew:
                client.keep_alive(info["id"])
            self.log.info(
                "allocated %s on %s: GPUs %s (%d CPUs, %d bytes), revision %d, ttl %ss",
                info["id"], info["node"], [g["index"] for g in info["gpus"]], info["cpus"], info["memory_bytes"],
                info["revision"], info["ttl_seconds"],
            )  # fmt: skip
            return info
        except BaseException:
            # Nothing downstream will ever learn this id: give the GPUs back now.
            _release_quietly(client, info["id"], self.log)
            raise


class GpuReleaseOperator(BaseOperator):
    """Release an allocation (from XCom or a template). Already gone is success. Meant as a teardown.

    Returns (XCom) whether this call ended a live allocation.
    """

    template_fields: Sequence[str] = ("allocation",)
    ui_color = "#ffe6e6"

    def __init__(
        self, *, allocation: Any, gpulease_conn_id: str = GpuLeaseHook.default_conn_name, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.allocation = allocation
        self.gpulease_conn_id = gpulease_conn_id

    def execute(self, context: Any) -> bool:
        if self.allocation is None or (isinstance(self.allocation, str) and self.allocation.strip() in ("", "None")):
            # The allocate task never produced one (it failed): nothing to give back.
            self.log.info("no allocation to release")
            return False
        alloc_id = allocation_id_of(self.allocation)
        with GpuLeaseHook(self.gpulease_conn_id).get_conn() as client:
            released = client.release(alloc_id)
        self.log.info("released %s" if released else "%s had already ended (released or expired)", alloc_id)
        return released


class GpuContainerOperator(_Waits, BaseOperator):
    """Run a container on an allocation's GPUs, streaming its logs into the task log.

    Give it `allocation=` (the allocate task's output, a template, or an id) to use an existing
    allocation, or `gpus=` to allocate and release by itself. A non-zero exit code fails the task.
    The lease is kept alive while the container runs. With deferrable=True the wait happens in the
    triggerer (GpuContainerTrigger), not in a worker slot; the logs come into the task log at the end.
    The XCom is the exit code (0).

    With `gpus=`, `wait=`, `max_runtime=` and `priority=` are GpuAllocateOperator's: with
    deferrable=True the wait in the queue happens in the triggerer too (GpuAllocationTrigger);
    the task resumes once admitted, keeps the lease alive from then on and runs the container.
    Between the admission and that resumption the allocation lives on its TTL alone: give it a
    `ttl` that covers the time a resumed task may wait for a worker slot.
    """

    template_fields: Sequence[str] = ("image", "command", "env", "allocation")
    ui_color = "#d6f5d6"

    def __init__(
        self,
        *,
        image: str,
        command: Sequence[str] | str = (),
        env: dict[str, str] | None = None,
        allocation: Any = None,
        gpus: int | None = None,
        cpus: int | None = None,
        memory: int | str | None = None,
        gpu_model: str = "",
        ttl: int | str = DEFAULT_TASK_TTL,
        wait: int | str | None = None,
        max_runtime: int | str | None = None,
        priority: str = "",
        volumes: Sequence[str] = (),
        shm_size: int | str | None = None,
        stop_grace: int = 30,
        deferrable: bool = False,
        poll_interval: float = 5.0,
        gpulease_conn_id: str = GpuLeaseHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if (allocation is None) == (gpus is None):
            raise ValueError("GpuContainerOperator needs exactly one of allocation= or gpus=")
        self.image, self.command, self.env, self.allocation = image, command, env or {}, allocation
        self.gpus, self.cpus, self.memory, self.gpu_model, self.ttl = gpus, cpus, memory, gpu_model, ttl
        if allocation is not None and (wait is not None or max_runtime is not None or priority):
            raise ValueError("wait=, max_runtime= and priority= are for an allocation made with gpus=")
        self.wait, self.max_runtime, self.priority = wait, max_runtime, priority
        self.volumes, self.shm_size, self.stop_grace = list(volumes), shm_size, stop_grace
        self.deferrable, self.poll_interval = deferrable, poll_interval
        self.gpulease_conn_id = gpulease_conn_id
        # For on_kill, which runs while execute is blocked: what to stop, and how to reach it.
        self._settings: ConnectionSettings | None = None
        self._running: tuple[str, str] | None = None  # (allocation id, container id)
        self._owned: str | None = None  # allocation id when this task allocated it

    def _command(self) -> list[str]:
        return ["sh", "-c", self.command] if isinstance(self.command, str) else list(self.command)

    def execute(self, context: Any) -> int:
        hook = GpuLeaseHook(self.gpulease_conn_id)
        self._settings = hook.settings()
        with hook.client_for(self._settings) as client:
            alloc = self._allocation(client, context)
            return self._run(client, alloc, context)

    def execute_admitted(self, context: Any, event: dict[str, Any]) -> int:
        """Resumed from GpuAllocationTrigger: run the container on the allocation it was admitted to."""
        if event.get("status") != "success":
            raise error_of(event)
        alloc_id = str(event["allocation"]["id"])
        hook = GpuLeaseHook(self.gpulease_conn_id)
        self._settings = hook.settings()
        with hook.client_for(self._settings) as client:
            self._owned = alloc_id
            try:
                alloc = client.get_allocation(alloc_id)
            except BaseException:
                _release_quietly(client, alloc_id, self.log)
                self._owned = None
                raise
            self.log.info("resumed: admitted from the queue, allocated %s on %s: GPUs %s",
                          alloc.id, alloc.node, list(alloc.gpu_indexes))  # fmt: skip
            return self._run(client, alloc, context)

    def _run(self, client: Client, alloc: Allocation, context: Any) -> int:
        """Run the container on alloc, keeping its lease alive; release it if this task made it."""
        deferring = False
        try:
            if self._owned and (context["ti"].try_number or 1) > 1:
                self._stop_leftovers(client, alloc.id)
            # A preemption notice arrives on a renewal: say so in the task log at once; the task then
            # fails with it (below) whatever the container's exit code, so a retry queues again.
            alloc.on_preempted(lambda err: self.log.warning("%s", err.message))
            with alloc.keepalive(alloc.ttl_seconds):
                job = alloc.run_container(
                    self.image, self._command(), env=self.env, volumes=self.volumes, shm_size=self.shm_size
                )
                self._running = (alloc.id, job.id)
                self.log.info(
                    "container %s running on %s, GPUs %s",
                    job.id[:12],
                    job.status.node,
                    list(job.status.gpu_indexes),
                )
                try:
                    if self.deferrable:
                        deferring = True
                        self._defer(alloc, job.id)
                    status = self._follow(job)
                except BaseException:
                    # Timed out, interrupted, or the wait failed: the container must not run on
                    # unattended (a retry would start another). Not when handing it to the trigger.
                    if not deferring:
                        self._stop_quietly(client, alloc.id, job.id)
                    raise
            if alloc.preempted is not None:
                raise alloc.preempted
            return self._finish(status)
        finally:
            self._running = None
            if self._owned and not deferring:
                _release_quietly(client, self._owned, self.log)
                self._owned = None

    def _allocation(self, client: Client, context: Any) -> Allocation:
        if self.allocation is not None:
            return client.get_allocation(allocation_id_of(self.allocation))
        request = {
            "gpus": self.gpus or 0, "cpus": self.cpus, "memory": self.memory, "gpu_model": self.gpu_model,
            "ttl": self.ttl, "owner": owner_for(context), "request_id": request_id_for(context, "container"),
            "max_runtime": self.max_runtime or None, "priority": self.priority or "",
        }  # fmt: skip
        alloc = self._allocate(client, request, deferrable=self.deferrable)
        if alloc is None:
            self.defer(**self._wait_trigger(request), method_name="execute_admitted")
        self._owned = alloc.id
        self.log.info("allocated %s on %s: GPUs %s", alloc.id, alloc.node, list(alloc.gpu_indexes))
        return alloc

    def _stop_leftovers(self, client: Client, allocation_id: str) -> None:
        """A retry may get back the allocation of an earlier try that never released it (its worker
        died), where a container of that try may still run. Only for an allocation of this task's own."""
        for c in client.list_containers(allocation_id):
            if not c.exited:
                self.log.info("stopping container %s of an earlier try", c.id[:12])
                client.stop_container(allocation_id, c.id, grace=self.stop_grace)

    def _follow(self, job: ContainerHandle) -> Container:
        """The container's output into the task log, line by line, until it exits; its status. A
        refused or broken log stream turns into a wait (ContainerHandle.follow): the container does
        not depend on its log stream, and is never given up for it."""
        lines = LineSplitter()

        def write(chunk: LogChunk) -> None:
            for line in lines.feed(chunk.stream, chunk.data):
                self.log.info("[%s] %s", chunk.stream, line)

        def fell_back(exc: GpuLeaseError) -> None:
            self.log.warning("the log stream of container %s broke off (%s); waiting for it to exit", job.id[:12], exc)

        try:
            return job.follow(write, on_fallback=fell_back)
        finally:
            for stream, rest in lines.flush():
                self.log.info("[%s] %s", stream, rest)

    def _defer(self, alloc: Allocation, container_id: str) -> None:
        from gpulease.airflow.triggers import GpuContainerTrigger

        self.log.info("deferring: container %s is waited for in the triggerer", container_id[:12])
        self.defer(
            trigger=GpuContainerTrigger(
                gpulease_conn_id=self.gpulease_conn_id, allocation_id=alloc.id, container_id=container_id,
                ttl=alloc.ttl_seconds, poll_interval=self.poll_interval, owned=bool(self._owned),
                stop_grace=self.stop_grace,
            ),
            method_name="execute_complete",
            kwargs={"owned": self._owned},
        )  # fmt: skip

    def execute_complete(self, context: Any, event: dict[str, Any], owned: str | None = None) -> int:
        if owned is None and event.get("owned"):
            owned = event["allocation_id"]
        with GpuLeaseHook(self.gpulease_conn_id).get_conn() as client:
            try:
                if event.get("status") != "success":
                    raise ContainerFailed(f"waiting for the container failed: {event.get('message')}", None)
                self.log.info("resumed: container %s has exited", str(event["container_id"])[:12])
                self._copy_logs(client, event["allocation_id"], event["container_id"])
                return self._check_exit(event.get("exit_code"), event["container_id"], event.get("error", ""))
            finally:
                if owned:
                    _release_quietly(client, owned, self.log)

    def _copy_logs(self, client: Client, allocation_id: str, container_id: str) -> None:
        lines = LineSplitter()
        try:
            for chunk in client.logs(allocation_id, container_id, follow=False):
                for line in lines.feed(chunk.stream, chunk.data):
                    self.log.info("[%s] %s", chunk.stream, line)
        except GpuLeaseError as exc:
            self.log.warning("could not fetch the logs of container %s: %s", container_id[:12], exc)
        for stream, rest in lines.flush():
            self.log.info("[%s] %s", stream, rest)

    def _finish(self, status: Container) -> int:
        return self._check_exit(status.exit_code, status.id, status.error)

    def _check_exit(self, exit_code: int | None, container_id: str, error: str = "") -> int:
        if exit_code != 0:
            detail = f": {error}" if error else ""
            raise ContainerFailed(
                f"container {container_id[:12]} ({self.image}) exited with code {exit_code}{detail}", exit_code
            )
        self.log.info("container %s exited with code 0", container_id[:12])
        return 0

    def _stop_quietly(self, client: Client, allocation_id: str, container_id: str) -> None:
        try:
            status = client.stop_container(allocation_id, container_id, grace=self.stop_grace)
        except GpuLeaseError as exc:
            self.log.warning("could not stop container %s: %s", container_id[:12], exc)
            return
        self.log.info("stopped container %s (exit code %s)", container_id[:12], status.exit_code)

    def on_kill(self) -> None:
        """SIGTERM or execution_timeout: stop the container, release the allocation if this task made it."""
        running, owned, settings = self._running, self._owned, self._settings
        if settings is None or (running is None and owned is None):
            return
        with GpuLeaseHook(self.gpulease_conn_id).client_for(settings) as client:
            if running:
                self._stop_quietly(client, *running)
            if owned:
                _release_quietly(client, owned, self.log)
