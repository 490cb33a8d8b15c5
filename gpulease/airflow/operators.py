"""Operators: GpuAllocateOperator (setup), GpuContainerOperator (train), GpuReleaseOperator (teardown).

The classic DAG shape is `allocate >> train >> release` with `release.as_teardown(setups=allocate)`:
the teardown runs whatever happens to train, and a failed train still fails the run.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from airflow.sdk import BaseOperator

from gpulease.airflow.hooks import GpuLeaseHook
from gpulease.client import Client
from gpulease.errors import AllocationNotFound, GpuLeaseError, InvalidRequest

# GpuAllocateOperator's TTL must outlive the gap until the container task starts keeping the
# lease alive; if the DAG dies, the GPUs come back after at most this long.
DEFAULT_SETUP_TTL = "15m"
# A lease that a running task keeps alive itself can be short: a dead worker frees GPUs fast.
DEFAULT_TASK_TTL = "2m"


def request_id_for(context: Any, suffix: str = "") -> str:
    """Stable per task try-independent id: a retried task gets the same allocation back."""
    ti = context["ti"]
    parts = [ti.dag_id, ti.run_id, ti.task_id, str(getattr(ti, "map_index", -1)), suffix]
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:40]
    readable = re.sub(r"[^A-Za-z0-9._-]", "-", f"{ti.dag_id}.{ti.task_id}")[:80]
    return f"af.{readable}.{digest}"


def allocation_id_of(value: Any) -> str:
    """The allocation id from an allocate task's XCom (a dict), a JSON string, or a plain id."""
    if isinstance(value, dict) and value.get("id"):
        return str(value["id"])
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            return allocation_id_of(json.loads(text))
        if text:
            return text
    raise InvalidRequest(
        f"allocation={value!r}: pass the allocate task's output (allocation=allocate.output) or an allocation id"
    )


@contextmanager
def kept_alive(client: Client, allocation_id: str, ttl: int) -> Iterator[None]:
    """Keep the allocation's lease alive while the block runs (released by its owner, not here)."""
    handle = client.get_allocation(allocation_id)
    with handle.keepalive(ttl):
        yield


class GpuAllocateOperator(BaseOperator):
    """Allocate GPUs; the XCom is the allocation as a dict. Meant as a setup task."""

    template_fields: Sequence[str] = ("owner_name", "gpu_model")

    def __init__(
        self,
        *,
        gpus: int,
        cpus: int | None = None,
        memory: int | str | None = None,
        gpu_model: str = "",
        node_selector: dict[str, str] | None = None,
        ttl: int | str = DEFAULT_SETUP_TTL,
        owner_name: str = "",
        gpulease_conn_id: str = GpuLeaseHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.gpus, self.cpus, self.memory, self.gpu_model = gpus, cpus, memory, gpu_model
        self.node_selector, self.ttl, self.owner_name = node_selector, ttl, owner_name
        self.gpulease_conn_id = gpulease_conn_id

    def execute(self, context: Any) -> dict[str, Any]:
        ti = context["ti"]
        with GpuLeaseHook(self.gpulease_conn_id).get_conn() as client:
            alloc = client.allocate(
                gpus=self.gpus,
                cpus=self.cpus,
                memory=self.memory,
                gpu_model=self.gpu_model,
                node_selector=self.node_selector,
                ttl=self.ttl,
                owner=self.owner_name or f"airflow:{ti.dag_id}.{ti.task_id}",
                request_id=request_id_for(context),
            )
            try:
                self.log.info(
                    "allocated %s on %s: GPUs %s (%d CPUs, %d bytes), revision %d, ttl %ss",
                    alloc.id, alloc.node, [g.index for g in alloc.gpus], alloc.cpus, alloc.memory_bytes,
                    alloc.revision, alloc.ttl_seconds,
                )  # fmt: skip
                return alloc.to_dict()
            except BaseException:
                # Nothing downstream will ever learn this id: give the GPUs back now.
                client.release(alloc.id)
                raise


class GpuReleaseOperator(BaseOperator):
    """Release an allocation (from XCom or a template). Already gone is success. Meant as a teardown."""

    template_fields: Sequence[str] = ("allocation",)

    def __init__(
        self, *, allocation: Any, gpulease_conn_id: str = GpuLeaseHook.default_conn_name, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.allocation = allocation
        self.gpulease_conn_id = gpulease_conn_id

    def execute(self, context: Any) -> bool:
        if self.allocation in (None, "", "None"):
            # The allocate task never produced one (it failed): nothing to give back.
            self.log.info("no allocation to release")
            return False
        alloc_id = allocation_id_of(self.allocation)
        with GpuLeaseHook(self.gpulease_conn_id).get_conn() as client:
            released = client.release(alloc_id)
        self.log.info("released %s" if released else "%s had already ended (released or expired)", alloc_id)
        return released


class GpuContainerOperator(BaseOperator):
    """Run a container on an allocation's GPUs, streaming its logs into the task log.

    Give it `allocation=` (the allocate task's output, or an id) to use an existing allocation,
    or `gpus=` to allocate and release by itself. A non-zero exit code fails the task.
    With deferrable=True the wait happens in the triggerer, not in a worker slot.
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
        self.volumes, self.shm_size, self.stop_grace = list(volumes), shm_size, stop_grace
        self.deferrable, self.poll_interval = deferrable, poll_interval
        self.gpulease_conn_id = gpulease_conn_id
        self._running: tuple[str, str] | None = None  # (allocation id, container id), for on_kill
        self._owned: str | None = None  # allocation id when this task allocated it

    def _command(self) -> list[str]:
        return ["sh", "-c", self.command] if isinstance(self.command, str) else list(self.command)

    def execute(self, context: Any) -> int | None:
        hook = GpuLeaseHook(self.gpulease_conn_id)
        with hook.get_conn() as client:
            if self.allocation is not None:
                alloc_id = allocation_id_of(self.allocation)
                ttl = client.get_allocation(alloc_id).ttl_seconds
            else:
                ti = context["ti"]
                alloc = client.allocate(
                    gpus=self.gpus or 0, cpus=self.cpus, memory=self.memory, gpu_model=self.gpu_model, ttl=self.ttl,
                    owner=f"airflow:{ti.dag_id}.{ti.task_id}", request_id=request_id_for(context, "container"),
                )  # fmt: skip
                alloc_id, ttl, self._owned = alloc.id, alloc.ttl_seconds, alloc.id
                self.log.info("allocated %s on %s: GPUs %s", alloc.id, alloc.node, [g.index for g in alloc.gpus])
            deferring = False
            try:
                with kept_alive(client, alloc_id, ttl):
                    container = client.run_container(
                        alloc_id, self.image, self._command(), env=self.env, volumes=self.volumes,
                        shm_size=self.shm_size,
                    )  # fmt: skip
                    self._running = (alloc_id, container.id)
                    self.log.info("container %s running on %s, GPUs %s", container.id[:12], container.node,
                                  list(container.gpu_indexes))  # fmt: skip
                    if self.deferrable:
                        deferring = True
                        self._defer(alloc_id, container.id, ttl)
                    for chunk in client.logs(alloc_id, container.id, follow=True):
                        self._log_chunk(chunk.stream, chunk.data)
                    status = client.wait_container(alloc_id, container.id, timeout=60)
                    while not status.exited:
                        status = client.wait_container(alloc_id, container.id, timeout=60)
                return self._finish(status.exit_code, container.id)
            finally:
                if self._owned and not deferring:
                    client.release(self._owned)
                    self.log.info("released %s", self._owned)

    def _defer(self, alloc_id: str, container_id: str, ttl: int) -> None:
        from gpulease.airflow.triggers import GpuContainerTrigger

        self.defer(
            trigger=GpuContainerTrigger(
                gpulease_conn_id=self.gpulease_conn_id, allocation_id=alloc_id, container_id=container_id,
                ttl=ttl, poll_interval=self.poll_interval,
            ),
            method_name="execute_complete",
            kwargs={"owned": self._owned},
        )  # fmt: skip

    def execute_complete(self, context: Any, event: dict[str, Any], owned: str | None = None) -> int | None:
        with GpuLeaseHook(self.gpulease_conn_id).get_conn() as client:
            try:
                if event.get("status") == "error":
                    raise GpuLeaseError(f"waiting for the container failed: {event.get('message')}")
                for chunk in client.logs(event["allocation_id"], event["container_id"], follow=False):
                    self._log_chunk(chunk.stream, chunk.data)
                return self._finish(event.get("exit_code"), event["container_id"])
            finally:
                if owned:
                    client.release(owned)
                    self.log.info("released %s", owned)

    def _finish(self, exit_code: int | None, container_id: str) -> int | None:
        self._running = None
        if exit_code != 0:
            raise RuntimeError(f"container {container_id[:12]} ({self.image}) exited with code {exit_code}")
        self.log.info("container %s exited with code 0", container_id[:12])
        return exit_code

    def _log_chunk(self, stream: str, data: bytes) -> None:
        for line in data.decode(errors="replace").splitlines():
            self.log.info("[%s] %s", stream, line)

    def on_kill(self) -> None:
        hook = GpuLeaseHook(self.gpulease_conn_id)
        with hook.get_conn() as client:
            if self._running:
                try:
                    client.stop_container(*self._running, grace=self.stop_grace)
                except (AllocationNotFound, GpuLeaseError) as exc:
                    self.log.warning("could not stop container: %s", exc)
            if self._owned:
                client.release(self._owned)
