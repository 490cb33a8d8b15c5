"""ContainerRuntime on the Docker Engine API (docker-py 7). The only module that imports docker.

Every container gets exactly its allocation's GPUs through a DeviceRequest for the "nvidia"
driver (UUIDs when known: they survive reboots and re-enumeration; indexes otherwise), a CPU
quota (NanoCpus), an optional cpuset near the GPUs, and a hard memory limit with no swap
beyond it. It carries the LABEL_* labels from which a restarted agent rebuilds its state, has
no restart policy (the agent decides) and is never auto-removed (exit codes and logs outlive it).

Hardening (issue 14, part B; ``ContainerLaunch.hardening``), set here for every container
whatever asked for it: not privileged, no-new-privileges, a PID limit, a private IPC namespace,
never the host's network, PID or UTS namespace, no devices but the DeviceRequest's GPUs, the
json-file log driver with a size limit, and the profile's capabilities: "baseline" drops NET_RAW
from Docker's default set, "restricted" drops them all and runs as nobody (65534:65534).

A pull has a hard wall-clock deadline (``pull_timeout``): a watcher thread shuts the connection
to dockerd down when it passes, or when the caller's PULL_CANCEL event is set, whatever the
registry sends meanwhile (dockerd cancels a pull whose client has gone).

Errors come out as gpulease errors: daemon unreachable -> Unavailable; container missing or not
ours -> ContainerNotFound; image missing and not pullable -> ImageUnavailable; anything the
daemon rejects as malformed (bad image reference, bad name, missing bind source, command not
found) -> InvalidRequest. A failed pull is reported in generic words; the registry's own message
goes to the agent's log. Which images, mounts and volumes may be asked for at all is decided
before the runtime is called (gpulease/common/container_policy.py, agent/host_mounts.py).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import math
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from http.client import HTTPException
from typing import Any
from urllib.parse import quote, urlencode

import docker
import docker.auth
import docker.errors
import docker.types
import docker.utils
import requests
import urllib3.exceptions

from gpulease.agent.firewall import NetworkGuard
from gpulease.agent.linux import cgroup_pids, process_tree
from gpulease.agent.runtime import (
    AGENT_BRIDGE,
    AGENT_NETWORK,
    BRIDGE_NAME_OPTION,
    ICC_OPTION,
    LABEL_ALLOCATION,
    LABEL_GPU_UUIDS,
    LABEL_GPUS,
    LABEL_MANAGED,
    LABEL_NODE,
    LABEL_OWNER,
    LABEL_REVISION,
    LABEL_TENANT,
    LOG_DRIVER,
    LOG_MAX_FILES,
    PULL_CANCEL,
    RESTRICTED_USER,
    ContainerInfo,
    ContainerLaunch,
    ContainerStateName,
    ImageInfo,
    VolumeInfo,
    default_name,
    network_problem,
)
from gpulease.common.container_policy import refuse, reserved_env
from gpulease.errors import ContainerNotFound, ImageUnavailable, Internal, InvalidRequest, Unavailable

log = logging.getLogger(__name__)

NVIDIA_VISIBLE_DEVICES = "NVIDIA_VISIBLE_DEVICES"
# What NVIDIA's runtime reads as "no GPUs at all"; overrides an image's ENV ...=all.
NO_GPUS = "void"
API_TIMEOUT_S = 60
MAX_POOL_SIZE = 64
PULL_LOG_INTERVAL_S = 5.0
DEFAULT_PULL_TIMEOUT_S = 600.0
# How often a pull's watcher looks at its deadline and its caller's cancel event.
PULL_WATCH_S = 0.2
_STREAM_HEADER = struct.Struct(">BxxxL")
_STREAM_NAMES = {0: "stdout", 1: "stdout", 2: "stderr"}
_ZERO_TIME = "0001-01-01T00:00:00Z"
_TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")

_STATES: dict[str, ContainerStateName] = {
    "created": "created",
    "running": "running",
    "restarting": "running",
    "paused": "running",
    "removing": "exited",
    "exited": "exited",
    "dead": "exited",
}


class DockerRuntime:
    """ContainerRuntime on a Docker daemon: base_url (e.g. "unix:///var/run/docker.sock") or DOCKER_HOST.

    The connection is made on first use and re-made after a failure, so an agent can start
    before dockerd does. Thread-safe as far as the SDK is (one connection pool, MAX_POOL_SIZE).
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        pull_timeout: float = DEFAULT_PULL_TIMEOUT_S,
        api_timeout: int = API_TIMEOUT_S,
        logger: logging.Logger = log,
        network_guard: NetworkGuard | None = None,
    ) -> None:
        self._base_url = base_url
        # Asked before every start on a bridge: does dockerd drop traffic between its containers
        # (and, for the agent's own, are the agent's firewall rules in place)? agent/firewall.py.
        self._network_guard = network_guard or NetworkGuard()
        self._pull_timeout = pull_timeout
        self._api_timeout = api_timeout
        self._log = logger
        self._lock = threading.Lock()
        self._client: Any = None

    # ----------------------------------------------------------------- connection

    def _where(self) -> str:
        return self._base_url or os.environ.get("DOCKER_HOST") or "the default socket (unix:///var/run/docker.sock)"

    def _unavailable(self, cause: object) -> Unavailable:
        return Unavailable(
            f"Docker daemon at {self._where()} is unreachable ({cause}); is dockerd running, "
            "and does DOCKER_HOST (or the agent's docker URL) point at it?"
        )

    @property
    def api(self) -> Any:
        """The low-level docker.APIClient (connecting first if needed)."""
        with self._lock:
            if self._client is None:
                try:
                    if self._base_url:
                        self._client = docker.DockerClient(
                            base_url=self._base_url,
                            version="auto",
                            timeout=self._api_timeout,
                            max_pool_size=MAX_POOL_SIZE,
                        )
                    else:
                        self._client = docker.from_env(
                            version="auto", timeout=self._api_timeout, max_pool_size=MAX_POOL_SIZE
                        )
                except docker.errors.DockerException as e:
                    raise self._unavailable(e) from e
            return self._client.api

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _translate(self, e: Exception, what: str) -> Exception:
        """A gpulease error for an SDK/transport error raised while doing `what`."""
        if isinstance(e, docker.errors.NotFound):
            return ContainerNotFound(f"{what}: {_explain(e)}")
        if isinstance(e, docker.errors.APIError):
            if e.status_code in (400, 409):
                return InvalidRequest(f"{what}: {_explain(e)}")
            return Internal(f"{what}: Docker daemon error: {_explain(e)}")
        if isinstance(e, requests.exceptions.RequestException | ConnectionError):
            with self._lock:
                # Drop pooled connections: the daemon may have restarted on a new socket inode.
                if self._client is not None:
                    with contextlib.suppress(Exception):
                        self._client.close()
                    self._client = None
            return self._unavailable(e)
        if isinstance(e, docker.errors.DockerException):
            return Internal(f"{what}: {e}")
        return e

    # ----------------------------------------------------------------- start

    def start(self, launch: ContainerLaunch) -> ContainerInfo:
        """ensure_image, then create_and_start: for callers with nothing to check in between.

        The agent's container service calls the two itself, fencing between them.
        """
        self._environment(launch)  # a malformed launch fails before a pull, not after it
        self.ensure_image(launch.image)
        return self.create_and_start(launch)

    def create_and_start(self, launch: ContainerLaunch) -> ContainerInfo:
        env = self._environment(launch)
        api = self.api
        name = launch.name or default_name(launch.allocation_id)
        try:
            host_config = api.create_host_config(**self._host_config(launch))
            created = api.create_container(
                image=launch.image,
                command=list(launch.command) or None,
                environment=env,
                working_dir=launch.working_dir or None,
                labels=labels(launch),
                host_config=host_config,
                name=name,
                detach=True,
                # "restricted": never root, whatever the image says.
                user=RESTRICTED_USER if launch.hardening.profile == "restricted" else None,
            )
        except docker.errors.ImageNotFound as e:  # not pulled, or removed between pull and create
            raise ImageUnavailable(f"image {launch.image!r} is not on this node (pulled first?): {e}") from e
        except docker.errors.NotFound as e:  # e.g. "network foo not found"
            raise InvalidRequest(f"cannot create container {name!r}: {_explain(e)}") from e
        except Exception as e:
            raise self._translate(e, f"cannot create container {name!r} for allocation {launch.allocation_id}") from e
        container_id = created["Id"]
        for warning in created.get("Warnings") or ():
            self._log.warning("docker: container %s: %s", name, warning)
        try:
            api.start(container_id)
        except Exception as e:
            # Never started: no exit code or logs worth keeping; leave nothing behind.
            with contextlib.suppress(Exception):
                api.remove_container(container_id, force=True)
            raise self._translate(e, f"cannot start container {name!r} (image {launch.image!r})") from e
        self._log.info(
            "started container %s (%s) for allocation %s rev %d: image %s, gpus %s, cpus %d, memory %d",
            name, container_id[:12], launch.allocation_id, launch.revision, launch.image,
            ",".join(map(str, launch.gpu_indexes)) or "none", launch.cpus, launch.memory_bytes,
        )  # fmt: skip
        return self.get(container_id)

    @staticmethod
    def _environment(launch: ContainerLaunch) -> dict[str, str]:
        env: dict[str, str] = {}
        for key, value in launch.env.items():
            if reserved_env(key):  # checked by the agent's policy first; the runtime never passes one on
                raise InvalidRequest(f"{key} is set by gpulease from the allocation; remove it")
            if not key or "=" in key or "\0" in key or "\0" in value:
                raise InvalidRequest(f"invalid environment variable name {key!r}")
            env[key] = value
        # Also set by dockerd's nvidia driver from the DeviceRequest; setting it here as well keeps
        # an image's ENV NVIDIA_VISIBLE_DEVICES=all (CUDA images have it) from ever applying.
        env[NVIDIA_VISIBLE_DEVICES] = ",".join(device_ids(launch)) or NO_GPUS
        return env

    @staticmethod
    def _host_config(launch: ContainerLaunch) -> dict[str, Any]:
        network = launch.network or "bridge"
        problem = network_problem(network)
        if problem is not None:  # the agent's configuration refuses these first
            raise InvalidRequest(f"{problem}: no container is started on it")
        hardening = launch.hardening
        config: dict[str, Any] = {
            "network_mode": network,
            "restart_policy": {"Name": "no"},
            "auto_remove": False,
            # Run-time hardening: whatever the spec says, and whatever dockerd's defaults are.
            "privileged": False,
            "security_opt": ["no-new-privileges:true"],
            "pids_limit": hardening.pids_limit,
            "cap_drop": ["ALL"] if hardening.profile == "restricted" else ["NET_RAW"],
            "ipc_mode": "private",  # a daemon's default may be "shareable"
            "log_config": docker.types.LogConfig(
                type=LOG_DRIVER, config={"max-size": str(hardening.log_max_size), "max-file": str(LOG_MAX_FILES)}
            ),
        }
        ids = device_ids(launch)
        if ids:
            config["device_requests"] = [
                docker.types.DeviceRequest(driver="nvidia", device_ids=ids, capabilities=[["gpu"]])
            ]
        if launch.cpus > 0:
            config["nano_cpus"] = int(launch.cpus * 1_000_000_000)
        if launch.cpuset:
            config["cpuset_cpus"] = launch.cpuset
        if launch.memory_bytes > 0:
            config["mem_limit"] = launch.memory_bytes
            config["memswap_limit"] = launch.memory_bytes  # memory+swap == memory: no swap
        if launch.shm_size_bytes > 0:
            config["shm_size"] = launch.shm_size_bytes
        mounts = []
        for v in launch.volumes:
            if not v.source or not v.target.startswith("/"):
                raise InvalidRequest(f"volume {v.source!r}:{v.target!r}: need a source and an absolute target")
            # An absolute source is a host path (must exist: no silent mkdir by dockerd), else a named volume.
            kind = "bind" if v.source.startswith("/") else "volume"
            mounts.append(docker.types.Mount(v.target, v.source, type=kind, read_only=v.read_only))
        if mounts:
            config["mounts"] = mounts
        return config

    # ----------------------------------------------------------------- networks

    def prepare_network(self, name: str) -> None:
        if name == "none":
            return
        problem = network_problem(name)
        if problem is not None:
            raise refuse("network-isolation", f"{problem}: no container is started on it")
        api = self.api
        try:
            attrs = api.inspect_network(name)
        except docker.errors.NotFound:
            if name != AGENT_NETWORK:
                raise refuse(
                    "network-isolation",
                    f"network {name!r} does not exist on this node: an admin creates it (a bridge with "
                    f"{ICC_OPTION}=false), or the agent uses its own ({AGENT_NETWORK!r})",
                ) from None
            attrs = self._create_agent_network(name)
        except Exception as e:
            raise self._translate(e, f"cannot inspect network {name!r}") from e
        problem = isolation_problem(attrs)
        if problem is None and attrs.get("Driver") == "bridge":
            # The option says icc is off; whether dockerd drops that traffic is the firewall's to say.
            problem = self._network_guard.problem(bridge_name(attrs))
        if problem is not None:
            raise refuse("network-isolation", f"network {name!r}: {problem}, so no container is started on it")

    def _create_agent_network(self, name: str) -> dict[str, Any]:
        api = self.api
        try:
            api.create_network(
                name,
                driver="bridge",
                options={ICC_OPTION: "false", BRIDGE_NAME_OPTION: AGENT_BRIDGE},
                labels={LABEL_MANAGED: "true"},
                check_duplicate=True,
            )
        except docker.errors.APIError as e:
            if e.status_code != 409:  # made meanwhile by another agent on this dockerd: use it
                raise self._translate(e, f"cannot create network {name!r}") from e
        except Exception as e:
            raise self._translate(e, f"cannot create network {name!r}") from e
        self._log.info("created network %s (bridge %s, inter-container traffic off)", name, AGENT_BRIDGE)
        try:
            attrs: dict[str, Any] = api.inspect_network(name)
        except Exception as e:
            raise self._translate(e, f"cannot inspect network {name!r}") from e
        return attrs

    # ----------------------------------------------------------------- images

    def has_image(self, image: str) -> bool:
        if not image or image != image.strip():
            raise InvalidRequest(f"invalid image reference {image!r}")
        try:
            self.api.inspect_image(image)
            return True
        except docker.errors.ImageNotFound:
            return False
        except docker.errors.APIError as e:
            if e.status_code == 400:  # "invalid reference format"
                raise self._pull_failed(image, _explain(e), invalid=True) from e
            raise self._translate(e, f"cannot inspect image {image!r}") from e
        except Exception as e:
            raise self._translate(e, f"cannot inspect image {image!r}") from e

    def ensure_image(self, image: str) -> None:
        """Pull the image if it is missing, with progress logged; ImageUnavailable on failure."""
        if not self.has_image(image):
            self._pull(image)

    def _pull_failed(self, image: str, cause: object, *, invalid: bool = False) -> ImageUnavailable | InvalidRequest:
        """The caller is told that the pull failed, in generic words; the cause (a registry's
        message, a proxy's, an address that did not answer) goes to the agent's log only: it can
        name internal hosts and tell a caller which of them answer."""
        self._log.warning("pull of image %s failed: %s", image, cause)
        if invalid:
            return InvalidRequest(f"invalid image reference {image!r} (the agent's log on this node says why)")
        return ImageUnavailable(
            f"image {image!r} is not on this node and could not be pulled (the agent's log on this node says why)"
        )

    def _pull(self, image: str) -> None:
        api = self.api
        repository, tag = docker.utils.parse_repository_tag(image)
        params = {"fromImage": repository, "tag": tag or "latest"}  # a digest goes in "tag" too
        headers: dict[str, str] = {}
        try:
            registry, _ = docker.auth.resolve_repository_name(repository)
            auth_header = docker.auth.get_config_header(api, registry)
        except docker.errors.DockerException as e:
            raise self._pull_failed(image, e, invalid=True) from e
        if auth_header:
            headers["X-Registry-Auth"] = auth_header
        cancel = PULL_CANCEL.get()
        self._log.info("pulling image %s", image)
        started = time.monotonic()
        deadline = started + self._pull_timeout
        stream = _PullStream(api, params, headers, self._pull_timeout)
        done = threading.Event()
        ended: list[str] = []  # why the watcher cut the pull short: "deadline" or "cancelled"
        # Started before the request: dockerd sends no answer at all until the registry has said
        # something, so the wait for the answer's headers is cut too.
        watcher = threading.Thread(
            target=_watch_pull, args=(stream, deadline, cancel, done, ended), name="pull-deadline", daemon=True
        )
        watcher.start()
        try:
            status = stream.open()
            if status >= 400:
                raise self._pull_failed(image, stream.error_message(), invalid=status == 400)
            progress = _PullProgress(image, self._log)
            for line in stream.lines():
                if ended or time.monotonic() > deadline:
                    break
                if not line:
                    continue
                event = _json(line)
                if event.get("error") or event.get("errorDetail"):
                    raise self._pull_failed(
                        image, event.get("error") or event["errorDetail"].get("message", "unknown error")
                    )
                progress.update(event)
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError, HTTPException) as e:
            if not ended:
                if not stream.answered:  # dockerd itself did not answer
                    raise self._translate(
                        e if isinstance(e, requests.exceptions.RequestException) else ConnectionError(str(e)),
                        f"cannot pull image {image!r}",
                    ) from e
                raise self._pull_failed(image, e) from e
        finally:
            done.set()
            stream.close()  # also cancels the pull in dockerd when we give up early
            watcher.join(timeout=5.0)
        if ended == ["cancelled"]:
            took = time.monotonic() - started
            self._log.info("pull of image %s: its caller has gone, given up after %.1fs", image, took)
            raise Unavailable(f"the pull of image {image!r} was given up: its caller has gone")
        if ended or time.monotonic() > deadline:
            self._log.warning("pull of image %s: not done after %.0fs, given up", image, self._pull_timeout)
            raise ImageUnavailable(
                f"image {image!r} could not be pulled: not done after {self._pull_timeout:.0f}s "
                "(raise the agent's pull timeout or pre-pull the image)"
            )
        try:
            api.inspect_image(image)
        except docker.errors.ImageNotFound as e:
            raise ImageUnavailable(f"image {image!r}: the pull finished but the image is not there") from e
        except Exception as e:
            raise self._translate(e, f"cannot inspect image {image!r}") from e
        self._log.info("pulled image %s in %.1fs", image, time.monotonic() - started)

    # ----------------------------------------------------------------- volumes

    def inspect_volume(self, name: str) -> VolumeInfo | None:
        try:
            attrs = self.api.inspect_volume(name)
        except docker.errors.NotFound:
            return None
        except Exception as e:
            raise self._translate(e, f"cannot inspect volume {name!r}") from e
        return volume_info(attrs)

    def create_volume(self, name: str, labels: Mapping[str, str]) -> VolumeInfo:
        try:
            attrs = self.api.create_volume(name, driver="local", labels=dict(labels))
        except Exception as e:
            raise self._translate(e, f"cannot create volume {name!r}") from e
        self._log.info("created volume %s (%s)", name, ", ".join(f"{k}={v}" for k, v in sorted(labels.items())))
        return volume_info(attrs)

    def list_volumes(self, unused_only: bool) -> list[VolumeInfo]:
        filters: dict[str, Any] = {"label": f"{LABEL_MANAGED}=true"}
        if unused_only:
            filters["dangling"] = True
        try:
            answer = self.api.volumes(filters=filters)
        except Exception as e:
            raise self._translate(e, "cannot list volumes") from e
        return [volume_info(v) for v in (answer or {}).get("Volumes") or ()]

    def remove_volume(self, name: str) -> bool:
        try:
            self.api.remove_volume(name)
        except docker.errors.NotFound:
            return False
        except docker.errors.APIError as e:
            if e.status_code == 409:  # in use by a container
                return False
            raise self._translate(e, f"cannot remove volume {name!r}") from e
        except Exception as e:
            raise self._translate(e, f"cannot remove volume {name!r}") from e
        return True

    # ----------------------------------------------------------------- image clean-up

    def list_images(self) -> list[ImageInfo]:
        api = self.api
        try:
            used = {str(c.get("ImageID", "")) for c in api.containers(all=True)}
            summaries = api.images()
        except Exception as e:
            raise self._translate(e, "cannot list images") from e
        out: list[ImageInfo] = []
        for summary in summaries:
            image_id = str(summary.get("Id", ""))
            try:
                attrs = api.inspect_image(image_id)
            except docker.errors.NotFound:
                continue  # removed since the listing
            except Exception as e:
                raise self._translate(e, f"cannot inspect image {image_id[:19]}") from e
            tags = tuple(t for t in summary.get("RepoTags") or () if t and t != "<none>:<none>")
            tagged = unix_ms((attrs.get("Metadata") or {}).get("LastTagTime"))
            tagged = tagged or int(summary.get("Created") or 0) * 1000
            out.append(ImageInfo(image_id, tags, int(summary.get("Size") or 0), tagged, image_id in used))
        return out

    def remove_image(self, image: ImageInfo) -> bool:
        api = self.api
        try:
            # By tag when it has several (removing by id would need force), else by id.
            for ref in image.tags or (image.id,):
                api.remove_image(ref, force=False, noprune=False)
        except docker.errors.NotFound:
            return False
        except docker.errors.APIError as e:
            if e.status_code == 409:  # a container refers to it (made since the listing)
                return False
            raise self._translate(e, f"cannot remove image {image.id[:19]}") from e
        except Exception as e:
            raise self._translate(e, f"cannot remove image {image.id[:19]}") from e
        return True

    # ----------------------------------------------------------------- stop / inspect

    def stop(self, container_id: str, grace_seconds: float) -> ContainerInfo:
        info = self.get(container_id)  # ContainerNotFound when not ours
        if info.state != "exited":
            # The API takes whole seconds; round up so the container gets at least its grace.
            t = max(0, math.ceil(grace_seconds))
            try:
                self.api.stop(info.id, timeout=t)
            except Exception as e:
                raise self._translate(e, f"cannot stop container {container_id!r}") from e
        return self.get(info.id)

    def remove(self, container_id: str) -> None:
        """Delete a stopped (or, forcibly, running) managed container; missing is a no-op."""
        try:
            info = self.get(container_id)
        except ContainerNotFound:
            return
        try:
            self.api.remove_container(info.id, force=True, v=True)
        except docker.errors.NotFound:
            return
        except Exception as e:
            raise self._translate(e, f"cannot remove container {container_id!r}") from e

    def _inspect(self, container_id: str) -> dict[str, Any]:
        if not container_id:
            raise ContainerNotFound("no container id given")
        try:
            attrs: dict[str, Any] = self.api.inspect_container(container_id)
        except docker.errors.NotFound as e:
            raise ContainerNotFound(f"no container {container_id!r}") from e
        except Exception as e:
            raise self._translate(e, f"cannot inspect container {container_id!r}") from e
        if ((attrs.get("Config") or {}).get("Labels") or {}).get(LABEL_MANAGED) != "true":
            raise ContainerNotFound(f"container {container_id!r} is not managed by gpulease")
        return attrs

    def get(self, container_id: str) -> ContainerInfo:
        return container_info(self._inspect(container_id))

    def list(self, allocation_id: str = "") -> list[ContainerInfo]:
        filters = [f"{LABEL_MANAGED}=true"]
        if allocation_id:
            filters.append(f"{LABEL_ALLOCATION}={allocation_id}")
        try:
            summaries = self.api.containers(all=True, filters={"label": filters})
        except Exception as e:
            raise self._translate(e, "cannot list containers") from e
        out = []
        for summary in summaries:
            try:
                out.append(self.get(summary["Id"]))
            except ContainerNotFound:
                continue  # removed since the listing
        out.sort(key=lambda c: (c.allocation_id, c.started_unix_ms, c.id))
        return out

    def wait(self, container_id: str, timeout_seconds: float) -> ContainerInfo:
        info = self.get(container_id)
        if info.state == "exited" or timeout_seconds <= 0:
            return info
        try:
            self.api.wait(info.id, timeout=timeout_seconds)
        except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
            # On unix sockets a read timeout surfaces as ConnectionError("Read timed out");
            # if the daemon is really gone, get() below says Unavailable.
            pass
        except docker.errors.NotFound as e:
            raise ContainerNotFound(f"container {container_id!r} was removed while waiting") from e
        except Exception as e:
            raise self._translate(e, f"cannot wait for container {container_id!r}") from e
        return self.get(info.id)

    # ----------------------------------------------------------------- logs / pids

    def logs(self, container_id: str, follow: bool) -> Iterator[tuple[str, bytes]]:
        """("stdout" | "stderr", bytes) in the daemon's order (one chunk per log record, mostly a line).

        The request is made here (so ContainerNotFound comes from the call, not from iteration);
        closing the iterator closes the connection.
        """
        attrs = self._inspect(container_id)
        api = self.api
        params = {"stdout": 1, "stderr": 1, "follow": 1 if follow else 0, "timestamps": 0, "tail": "all"}
        url = f"{api.base_url}/v{api.api_version}/containers/{quote(attrs['Id'], safe='')}/logs"
        try:
            # No read timeout: a followed container may stay silent for hours.
            response = api.get(url, params=params, stream=True, timeout=(10, None if follow else self._api_timeout))
        except requests.exceptions.RequestException as e:
            raise self._translate(e, f"cannot read logs of {container_id!r}") from e
        if response.status_code >= 400:
            cause = _response_message(response)
            response.close()
            if response.status_code == 404:
                raise ContainerNotFound(f"no container {container_id!r}: {cause}")
            raise Internal(f"cannot read logs of {container_id!r}: {cause}")
        tty = bool((attrs.get("Config") or {}).get("Tty"))
        return _log_frames(response, tty)

    def pids(self, container_id: str) -> frozenset[int]:
        info = self.get(container_id)
        if info.state != "running" or info.pid <= 0:
            return frozenset()
        return frozenset(process_tree(info.pid) | cgroup_pids(info.pid))


# --------------------------------------------------------------------- helpers (pure)


def isolation_problem(attrs: Mapping[str, Any]) -> str | None:
    """Why containers on this network could talk to each other (None when they cannot)."""
    driver = str(attrs.get("Driver", ""))
    if driver == "null":  # "none"
        return None
    if driver != "bridge":
        return f"its driver is {driver!r}, not a bridge whose inter-container traffic can be turned off"
    options = attrs.get("Options") or {}
    if str(options.get(ICC_OPTION, "true")).lower() != "false":
        return (
            f'inter-container traffic is on ({ICC_OPTION} is not false: for the default bridge, set "icc": '
            "false in daemon.json), so containers of different allocations could reach each other"
        )
    return None


def bridge_name(attrs: Mapping[str, Any]) -> str:
    """The Linux bridge of a bridge network: its bridge.name option, else Docker's br-<id[:12]>."""
    options = attrs.get("Options") or {}
    return str(options.get(BRIDGE_NAME_OPTION) or f"br-{str(attrs.get('Id', ''))[:12]}")


def device_ids(launch: ContainerLaunch) -> list[str]:
    """UUIDs when known for every GPU (stable across reboots), else indexes."""
    if launch.gpu_uuids and all(launch.gpu_uuids) and len(launch.gpu_uuids) >= len(launch.gpu_indexes):
        return list(launch.gpu_uuids)
    return [str(i) for i in launch.gpu_indexes]


def labels(launch: ContainerLaunch) -> dict[str, str]:
    return {
        LABEL_MANAGED: "true",
        LABEL_ALLOCATION: launch.allocation_id,
        LABEL_REVISION: str(launch.revision),
        LABEL_NODE: launch.node,
        LABEL_GPUS: ",".join(str(i) for i in launch.gpu_indexes),
        LABEL_GPU_UUIDS: ",".join(launch.gpu_uuids),
        LABEL_OWNER: launch.owner,
        LABEL_TENANT: launch.tenant,
    }


def unix_ms(timestamp: str | None) -> int:
    """Docker's RFC 3339 nanosecond timestamps -> Unix milliseconds; 0 for Go's zero time."""
    if not timestamp or timestamp.startswith("0001-01-01"):
        return 0
    m = _TIMESTAMP.match(timestamp)
    if not m:
        return 0
    whole, fraction, zone = m.groups()
    dt = datetime.fromisoformat(whole + ("+00:00" if zone == "Z" else zone))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    millis = int((fraction or "0")[:3].ljust(3, "0"))
    return int(dt.timestamp()) * 1000 + millis


def volume_info(attrs: Mapping[str, Any]) -> VolumeInfo:
    return VolumeInfo(
        name=str(attrs.get("Name", "")),
        driver=str(attrs.get("Driver", "")),
        options={str(k): str(v) for k, v in (attrs.get("Options") or {}).items()},
        labels={str(k): str(v) for k, v in (attrs.get("Labels") or {}).items()},
        created_unix_ms=unix_ms(attrs.get("CreatedAt")),
    )


def container_info(attrs: Mapping[str, Any]) -> ContainerInfo:
    config = attrs.get("Config") or {}
    container_labels = config.get("Labels") or {}
    state = attrs.get("State") or {}
    status = str(state.get("Status", "")).lower()
    name: ContainerStateName = _STATES.get(status, "exited" if state.get("Dead") else "created")
    gpus = tuple(int(g) for g in str(container_labels.get(LABEL_GPUS, "")).split(",") if g.strip().isdigit())
    gpu_uuids = tuple(u.strip() for u in str(container_labels.get(LABEL_GPU_UUIDS, "")).split(",") if u.strip())
    started = unix_ms(state.get("StartedAt"))
    finished = unix_ms(state.get("FinishedAt")) if name == "exited" else 0
    if finished:
        # dockerd stamps StartedAt after runc start returns and FinishedAt from containerd's exit
        # event: a container that exits at once can "finish" a millisecond before it "started".
        finished = max(finished, started)
    try:
        revision = int(container_labels.get(LABEL_REVISION, "0"))
    except ValueError:
        revision = 0
    return ContainerInfo(
        id=attrs["Id"],
        name=str(attrs.get("Name", "")).lstrip("/"),
        allocation_id=container_labels.get(LABEL_ALLOCATION, ""),
        revision=revision,
        state=name,
        exit_code=int(state.get("ExitCode", 0)) if name == "exited" else None,
        image=config.get("Image") or attrs.get("Image", ""),
        gpu_indexes=gpus,
        started_unix_ms=started,
        finished_unix_ms=finished,
        restart_count=int(attrs.get("RestartCount") or 0),
        pid=int(state.get("Pid") or 0) if name == "running" else 0,
        gpu_uuids=gpu_uuids,
        node=str(container_labels.get(LABEL_NODE, "")),
    )


def _watch_pull(
    stream: _PullStream, deadline: float, cancel: threading.Event | None, done: threading.Event, ended: list[str]
) -> None:
    """Until the pull is done: at its deadline, or once its caller has gone, cut the connection.

    Bounded: it returns by the deadline at the latest."""
    while not done.is_set():
        now = time.monotonic()
        if now >= deadline:
            ended.append("deadline")
            break
        if cancel is not None and cancel.is_set():
            ended.append("cancelled")
            break
        done.wait(min(PULL_WATCH_S, deadline - now))
    else:
        return
    stream.abort()


class _PullStream:
    """POST /images/create and its JSON lines, on a connection that abort() (from another thread)
    ends at any moment.

    On a unix socket (the agent's usual docker_host) the connection is a socket of its own, so it
    is cut while dockerd has not answered yet too: dockerd sends nothing until the registry has
    said something. Elsewhere (tcp://, ssh://) it goes through the Docker SDK's session, which is
    cut once dockerd has answered; before that its read timeout (the pull timeout) bounds it."""

    def __init__(self, api: Any, params: Mapping[str, str], headers: Mapping[str, str], timeout: float) -> None:
        self._api = api
        self._params = dict(params)
        self._headers = dict(headers)
        self._timeout = timeout
        adapter = None
        with contextlib.suppress(Exception):
            adapter = api.get_adapter(api.base_url)
        path = getattr(adapter, "socket_path", None)
        self._socket_path: str | None = path if isinstance(path, str) and path else None
        self._lock = threading.Lock()
        self._aborted = False
        self._sock: socket.socket | None = None
        self._conn: http.client.HTTPConnection | None = None
        self._answer: http.client.HTTPResponse | None = None
        self._response: Any = None  # requests.Response, off unix sockets
        self.answered = False

    def open(self) -> int:
        """Send the request; the answer's HTTP status."""
        if self._socket_path is None:
            url = f"{self._api.base_url}/v{self._api.api_version}/images/create"
            response = self._api.post(
                url, params=self._params, headers=self._headers, stream=True, timeout=(10, self._timeout)
            )
            with self._lock:
                self._response = response
                aborted = self._aborted
            if aborted:
                _abort_response(response)
            self.answered = True
            return int(response.status_code)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with self._lock:
            self._sock = sock
        sock.settimeout(10)
        sock.connect(self._socket_path)
        sock.settimeout(self._timeout)
        with self._lock:  # an abort() before the connect could not shut it down: it said so here
            if self._aborted:
                raise ConnectionAbortedError("the pull was cut before it was sent")
        conn = http.client.HTTPConnection("localhost", timeout=self._timeout)
        conn.sock = sock
        self._conn = conn
        path = f"/v{self._api.api_version}/images/create?{urlencode(self._params)}"
        conn.request("POST", path, headers=self._headers)
        self._answer = conn.getresponse()
        self.answered = True
        return int(self._answer.status)

    def error_message(self) -> str:
        if self._answer is None:
            return str(_response_message(self._response))
        body = self._answer.read(64 * 1024)
        try:
            message = json.loads(body).get("message")
        except (ValueError, AttributeError):
            message = None
        return str(message) if message else f"HTTP {self._answer.status}: {body[:500].decode(errors='replace')}"

    def lines(self) -> Iterator[bytes]:
        if self._answer is None:
            yield from self._response.iter_lines()
            return
        while True:
            line = self._answer.readline(1 << 20)
            if not line:
                return
            yield line.strip()

    def abort(self) -> None:
        """Cut the connection, from any thread; a read blocked on it returns at once."""
        with self._lock:
            self._aborted = True
            sock, response = self._sock, self._response
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if response is not None:
            _abort_response(response)

    def close(self) -> None:
        self.abort()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        elif self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()


def _abort_response(response: Any) -> None:
    """Close a streamed response so that a read blocked on it in another thread returns at once.

    Closing alone does not wake a thread blocked in recv(): the socket is shut down first (as the
    Docker SDK's CancellableStream does)."""
    with contextlib.suppress(Exception):
        sock_fp = response.raw._fp.fp
        raw = getattr(sock_fp, "raw", sock_fp)
        sock = getattr(raw, "_sock", None) or getattr(raw, "sock", None)
        if isinstance(sock, socket.socket):
            sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(Exception):
        response.close()


def _log_frames(response: Any, tty: bool) -> Iterator[tuple[str, bytes]]:
    raw = response.raw
    try:
        if tty:  # no multiplexing: one stream
            for chunk in response.iter_content(chunk_size=None):
                if chunk:
                    yield ("stdout", bytes(chunk))
            return
        while True:
            header = _read_exact(raw, _STREAM_HEADER.size)
            if len(header) < _STREAM_HEADER.size:
                return
            stream, length = _STREAM_HEADER.unpack(header)
            data = _read_exact(raw, length)
            if data:
                yield (_STREAM_NAMES.get(stream, "stdout"), data)
            if len(data) < length:
                return
    except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
        raise Unavailable(f"the log stream from the Docker daemon broke: {e}") from e
    finally:
        response.close()


def _read_exact(raw: Any, n: int) -> bytes:
    if n == 0:
        return b""
    parts = []
    left = n
    while left > 0:
        chunk = raw.read(left)
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _explain(e: docker.errors.APIError) -> str:
    explanation = e.explanation
    if isinstance(explanation, bytes):
        explanation = explanation.decode(errors="replace")
    return str(explanation or e)


def _response_message(response: Any) -> str:
    try:
        body = response.json()
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    except ValueError:
        pass
    return f"HTTP {response.status_code}: {response.text[:500]}"


def _json(line: bytes) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError:
        return {"status": line.decode(errors="replace")}
    return value if isinstance(value, dict) else {}


class _PullProgress:
    """Logs layer status changes, and byte progress at most every PULL_LOG_INTERVAL_S."""

    def __init__(self, image: str, logger: logging.Logger) -> None:
        self._image = image
        self._log = logger
        self._status: dict[str, str] = {}
        self._last_progress_log = 0.0

    def update(self, event: Mapping[str, Any]) -> None:
        status = str(event.get("status", ""))
        layer = str(event.get("id", ""))
        if not status:
            return
        if not layer or event.get("progressDetail") is None or status not in ("Downloading", "Extracting"):
            if self._status.get(layer) != status:
                self._status[layer] = status
                self._log.info("pull %s: %s%s", self._image, f"{layer}: " if layer else "", status)
            return
        now = time.monotonic()
        if now - self._last_progress_log >= PULL_LOG_INTERVAL_S:
            self._last_progress_log = now
            self._log.info("pull %s: %s: %s %s", self._image, layer, status, event.get("progress", ""))
