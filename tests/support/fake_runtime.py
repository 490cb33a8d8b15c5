"""An in-memory ContainerRuntime for fast logic tests of the agent (never used outside tests).

It follows the Protocol in agent/runtime/__init__.py faithfully: labels carry the allocation and
its revision, states go created -> running -> exited, stop() is SIGTERM then SIGKILL after the
grace, wait() honours its timeout, logs() follows until exit. What a container "does" is decided
by its command:

- ``["exit", "N"]``: exits at once with status N;
- ``["echo", word, ...]``: writes the words to stdout and exits 0;
- anything else runs until stopped, or until the test calls ``finish()``.

A container started with ``env["IGNORE_SIGTERM"] = "1"`` needs the full grace and a SIGKILL (137),
like a process that traps SIGTERM; others exit on SIGTERM with 143.

Like dockerd's create, ``create_and_start`` never pulls: it refuses an image that ``ensure_image``
has not fetched first (or that is in ``missing_images``).
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from gpulease.agent.runtime import (
    LABEL_ALLOCATION,
    LABEL_GPU_UUIDS,
    LABEL_GPUS,
    LABEL_MANAGED,
    LABEL_NODE,
    LABEL_REVISION,
    ContainerInfo,
    ContainerLaunch,
    ContainerStateName,
    ImageInfo,
    VolumeInfo,
)
from gpulease.common.container_policy import reserved_env
from gpulease.errors import Conflict, ContainerNotFound, ImageUnavailable, InvalidRequest

_pids = itertools.count(40000)


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class FakeContainer:
    id: str
    name: str
    image: str
    labels: dict[str, str]
    launch: ContainerLaunch | None
    state: ContainerStateName = "created"
    exit_code: int | None = None
    started_unix_ms: int = 0
    finished_unix_ms: int = 0
    restart_count: int = 0
    pid: int = 0
    ignores_sigterm: bool = False
    logs: list[tuple[str, bytes]] = field(default_factory=list)
    stops: list[float] = field(default_factory=list)


class _LogStream:
    """Like the Docker SDK's CancellableStream: an iterator whose close() may be called from another
    thread while a read blocks, and ends the iteration."""

    def __init__(self, runtime: FakeRuntime, c: FakeContainer, follow: bool) -> None:
        self._runtime = runtime
        self._c = c
        self._follow = follow
        self._sent = 0
        self._closed = False

    def __iter__(self) -> _LogStream:
        return self

    def __next__(self) -> tuple[str, bytes]:
        cond = self._runtime._cond
        with cond:
            while True:
                if self._closed:
                    raise StopIteration
                if len(self._c.logs) > self._sent:
                    self._sent += 1
                    return self._c.logs[self._sent - 1]
                if self._c.state == "exited" or not self._follow:
                    self._finish()
                    raise StopIteration
                cond.wait(timeout=1.0)

    def close(self) -> None:
        with self._runtime._cond:
            self._finish()
            self._runtime._cond.notify_all()

    def _finish(self) -> None:
        if not self._closed:
            self._closed = True
            self._runtime.active_log_readers -= 1


class FakeRuntime:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.containers: dict[str, FakeContainer] = {}
        self.launches: list[ContainerLaunch] = []
        self.missing_images: set[str] = set()
        self.images: set[str] = set()  # pulled by ensure_image
        self.active_log_readers = 0
        self.calls: list[str] = []
        self.networks_prepared: list[str] = []  # not in calls: tests count the calls of a start
        # Named volumes (name -> info); one that a container mounts is not removed, as in dockerd.
        self.volumes: dict[str, VolumeInfo] = {}

    # -- the Protocol ---------------------------------------------------------------------------

    def has_image(self, image: str) -> bool:
        self.calls.append("has_image")
        with self._cond:
            return image in self.images and image not in self.missing_images

    def ensure_image(self, image: str) -> None:
        self.calls.append("ensure_image")
        if image in self.missing_images:
            raise ImageUnavailable(f"image {image} not found")
        with self._cond:
            self.images.add(image)

    def prepare_network(self, name: str) -> None:
        self.networks_prepared.append(name)

    def create_and_start(self, launch: ContainerLaunch) -> ContainerInfo:
        self.calls.append("create_and_start")
        bad = [key for key in launch.env if reserved_env(key)]
        if bad:
            raise InvalidRequest(f"env {sorted(bad)} may not be set")
        with self._cond:
            if launch.image not in self.images:  # like dockerd: create never pulls
                raise ImageUnavailable(f"image {launch.image} is not on this node")
            if launch.name and any(c.name == launch.name for c in self.containers.values()):
                raise Conflict(f"a container named {launch.name} already exists")
            labels = {
                LABEL_MANAGED: "true",
                LABEL_ALLOCATION: launch.allocation_id,
                LABEL_REVISION: str(launch.revision),
                LABEL_NODE: launch.node,
                LABEL_GPUS: ",".join(str(i) for i in launch.gpu_indexes),
                LABEL_GPU_UUIDS: ",".join(launch.gpu_uuids),
            }
            c = FakeContainer(
                id=secrets.token_hex(32),
                name=launch.name or f"fake-{secrets.token_hex(4)}",
                image=launch.image,
                labels=labels,
                launch=launch,
                ignores_sigterm=launch.env.get("IGNORE_SIGTERM") == "1",
            )
            for v in launch.volumes:  # like dockerd: a named volume that does not exist is made, unlabelled
                if not v.source.startswith("/") and v.source not in self.volumes:
                    self.volumes[v.source] = VolumeInfo(v.source, "local", {}, {}, _now_ms())
            self.containers[c.id] = c
            self.launches.append(launch)
            self._run(c)
            return self._info(c)

    def stop(self, container_id: str, grace_seconds: float) -> ContainerInfo:
        self.calls.append("stop")
        with self._cond:
            c = self._find(container_id)
            if c.state != "running":
                return self._info(c)
            c.stops.append(grace_seconds)
            ignores = c.ignores_sigterm
        if ignores:
            time.sleep(grace_seconds)  # SIGTERM is ignored: SIGKILL after the grace
        with self._cond:
            if c.state == "running":
                self._exit(c, 137 if ignores else 143)
            return self._info(c)

    def get(self, container_id: str) -> ContainerInfo:
        self.calls.append("get")
        with self._cond:
            return self._info(self._find(container_id))

    def remove(self, container_id: str) -> None:
        self.calls.append("remove")
        with self._cond:
            try:
                c = self._find(container_id)
            except ContainerNotFound:
                return
            del self.containers[c.id]

    def list(self, allocation_id: str = "") -> list[ContainerInfo]:
        self.calls.append("list")
        with self._cond:
            return [
                self._info(c)
                for c in self.containers.values()
                if c.labels.get(LABEL_MANAGED) == "true"
                and (not allocation_id or c.labels.get(LABEL_ALLOCATION) == allocation_id)
            ]

    def wait(self, container_id: str, timeout_seconds: float) -> ContainerInfo:
        self.calls.append("wait")
        with self._cond:
            c = self._find(container_id)
            self._cond.wait_for(lambda: c.state == "exited", timeout=max(0.0, timeout_seconds))
            return self._info(c)

    def logs(self, container_id: str, follow: bool) -> Iterator[tuple[str, bytes]]:
        with self._cond:
            c = self._find(container_id)  # ContainerNotFound before the first chunk
            self.active_log_readers += 1
        return _LogStream(self, c, follow)

    def pids(self, container_id: str) -> frozenset[int]:
        with self._cond:
            c = self._find(container_id)
            return frozenset({c.pid, c.pid + 1}) if c.state == "running" else frozenset()

    def inspect_volume(self, name: str) -> VolumeInfo | None:
        self.calls.append("inspect_volume")
        with self._cond:
            return self.volumes.get(name)

    def create_volume(self, name: str, labels: Mapping[str, str]) -> VolumeInfo:
        self.calls.append("create_volume")
        with self._cond:
            return self.volumes.setdefault(name, VolumeInfo(name, "local", {}, dict(labels), created_unix_ms=_now_ms()))

    def list_volumes(self, unused_only: bool) -> list[VolumeInfo]:
        self.calls.append("list_volumes")
        with self._cond:
            used = self._used_volumes()
            return [
                v
                for v in self.volumes.values()
                if v.labels.get(LABEL_MANAGED) == "true" and not (unused_only and v.name in used)
            ]

    def remove_volume(self, name: str) -> bool:
        self.calls.append("remove_volume")
        with self._cond:
            if name not in self.volumes or name in self._used_volumes():
                return False
            del self.volumes[name]
            return True

    def list_images(self) -> list[ImageInfo]:
        self.calls.append("list_images")
        with self._cond:
            used = {c.image for c in self.containers.values()}
            return [ImageInfo(i, (i,), 0, 0, i in used) for i in sorted(self.images)]

    def remove_image(self, image: ImageInfo) -> bool:
        self.calls.append("remove_image")
        with self._cond:
            if image.id not in self.images or any(c.image == image.id for c in self.containers.values()):
                return False
            self.images.discard(image.id)
            return True

    # -- test helpers ---------------------------------------------------------------------------

    def add_volume(self, name: str, driver: str = "local", options: Mapping[str, str] | None = None,
                   labels: Mapping[str, str] | None = None) -> None:  # fmt: skip
        """A volume made outside gpulease (an admin's, or anyone's)."""
        with self._cond:
            self.volumes[name] = VolumeInfo(name, driver, dict(options or {}), dict(labels or {}), _now_ms())

    def emit(self, container_id: str, data: bytes, stream: str = "stdout") -> None:
        with self._cond:
            self._find(container_id).logs.append((stream, data))
            self._cond.notify_all()

    def finish(self, container_id: str, exit_code: int = 0) -> None:
        with self._cond:
            c = self._find(container_id)
            if c.state == "running":
                self._exit(c, exit_code)

    def plant(
        self,
        *,
        allocation_id: str,
        revision: int,
        node: str,
        managed: bool = True,
        gpus: tuple[tuple[int, str], ...] = (),
    ) -> str:
        """A running container as a previous agent (or someone else) might have left it; ``gpus``
        are its (index, uuid) pairs, a uuid "" for a container without the UUID label."""
        with self._cond:
            labels = {LABEL_ALLOCATION: allocation_id, LABEL_REVISION: str(revision), LABEL_NODE: node}
            if gpus:
                labels[LABEL_GPUS] = ",".join(str(i) for i, _ in gpus)
                if all(u for _, u in gpus):
                    labels[LABEL_GPU_UUIDS] = ",".join(u for _, u in gpus)
            if managed:
                labels[LABEL_MANAGED] = "true"
            c = FakeContainer(id=secrets.token_hex(32), name=f"planted-{secrets.token_hex(4)}", image="planted",
                              labels=labels, launch=None)  # fmt: skip
            self.containers[c.id] = c
            self._run(c)
            return c.id

    def wait_readers_gone(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.active_log_readers == 0, timeout=timeout)

    def info(self, container_id: str) -> ContainerInfo:
        return self.get(container_id)

    # -- internals ------------------------------------------------------------------------------

    def _used_volumes(self) -> set[str]:
        return {
            v.source
            for c in self.containers.values()
            if c.launch is not None
            for v in c.launch.volumes
            if not v.source.startswith("/")
        }

    def _run(self, c: FakeContainer) -> None:
        c.state = "running"
        c.started_unix_ms = _now_ms()
        c.pid = next(_pids) * 2
        command = list(c.launch.command) if c.launch else []
        if command[:1] == ["exit"]:
            self._exit(c, int(command[1]) if len(command) > 1 else 0)
        elif command[:1] == ["echo"]:
            c.logs.append(("stdout", (" ".join(command[1:]) + "\n").encode()))
            self._exit(c, 0)
        self._cond.notify_all()

    def _exit(self, c: FakeContainer, code: int) -> None:
        c.state = "exited"
        c.exit_code = code
        c.finished_unix_ms = _now_ms()
        c.pid = 0
        self._cond.notify_all()

    def _find(self, ref: str) -> FakeContainer:
        c = self.containers.get(ref)
        if c is None:
            matches = [
                x for x in self.containers.values() if x.name == ref or (len(ref) >= 12 and x.id.startswith(ref))
            ]
            c = matches[0] if len(matches) == 1 else None
        if c is None or c.labels.get(LABEL_MANAGED) != "true":
            raise ContainerNotFound(f"no gpulease container {ref}")
        return c

    def _info(self, c: FakeContainer) -> ContainerInfo:
        gpus = c.labels.get(LABEL_GPUS, "")
        return ContainerInfo(
            id=c.id,
            name=c.name,
            allocation_id=c.labels.get(LABEL_ALLOCATION, ""),
            revision=int(c.labels.get(LABEL_REVISION, "0")),
            state=c.state,
            exit_code=c.exit_code,
            image=c.image,
            gpu_indexes=tuple(int(i) for i in gpus.split(",") if i),
            started_unix_ms=c.started_unix_ms,
            finished_unix_ms=c.finished_unix_ms,
            restart_count=c.restart_count,
            pid=c.pid,
            gpu_uuids=tuple(u for u in c.labels.get(LABEL_GPU_UUIDS, "").split(",") if u),
            node=c.labels.get(LABEL_NODE, ""),
        )


__all__ = ["FakeContainer", "FakeRuntime"]
