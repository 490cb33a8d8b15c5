"""The container policy (issue 14, part A) against the real test dockerd.

The agent's side in process (tests/support/agent_cluster.py) over a DockerRuntime whose every
HTTP request to dockerd is recorded: each refused case asserts that no Docker API call was made
(for a named volume, only the inspection that decides) and that dockerd has no new container.
Then the whole path with real processes: the coordinator refuses before forwarding, and an agent
enforces its own copy of the policy when the coordinator's allows more.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from gpulease.agent.config import load_config as load_agent_config
from gpulease.agent.runtime import LABEL_ALLOCATION, LABEL_MANAGED, LABEL_NODE, LABEL_TENANT, ContainerLaunch, Volume
from gpulease.agent.runtime.docker_runtime import DockerRuntime
from gpulease.client import Client
from gpulease.common.container_policy import ContainerPolicy
from gpulease.dev.cluster import LocalCluster
from gpulease.errors import GpuLeaseError, InvalidRequest, PermissionDenied
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import types_pb2 as tpb
from tests.support import harness
from tests.support.agent_cluster import NODE, Cluster, agent, node_inventory
from tests.support.agent_cluster import cluster as cluster  # the fixture: NODE and OTHER registered
from tests.support.dockerd import Dockerd
from tests.support.fake_runtime import FakeRuntime

MiB = 2**20
SHARED = "gpl-test-shared"  # an admin's volume on the allowlist
BIND_BACKED = "gpl-test-bindy"  # on the allowlist too, but a bind of /etc in disguise


@dataclass
class Counted:
    """A DockerRuntime on the test dockerd that records every HTTP request it sends."""

    runtime: DockerRuntime
    calls: list[str] = field(default_factory=list)

    def take(self) -> list[str]:
        calls, self.calls[:] = list(self.calls), []
        return calls


@pytest.fixture
def counted(dockerd: Dockerd) -> Iterator[Counted]:
    runtime = DockerRuntime(dockerd.base_url, pull_timeout=60)
    counted = Counted(runtime)

    def record(response: Any, *args: Any, **kwargs: Any) -> None:
        path = re.sub(r"^/v[0-9.]+", "", response.request.path_url.split("?", 1)[0])
        counted.calls.append(f"{response.request.method} {path}")

    runtime.api.hooks["response"].append(record)  # connects now (GET /version): not counted
    yield counted
    runtime.close()


@pytest.fixture
def docker_client(dockerd: Dockerd) -> Iterator[Any]:
    client = dockerd.client()
    yield client
    client.close()


@pytest.fixture
def allowed(tmp_path: Path) -> Path:
    d = tmp_path / "allowed"
    (d / "in").mkdir(parents=True)
    (d / "in" / "hello.txt").write_text("hello from the host\n")
    return d


@pytest.fixture
def volumes(docker_client: Any) -> Iterator[None]:
    """The allowlisted volume, and one that binds /etc under an allowlisted name."""
    docker_client.api.create_volume(SHARED, driver="local")
    docker_client.api.create_volume(
        BIND_BACKED, driver="local", driver_opts={"type": "none", "o": "bind", "device": "/etc"}
    )
    yield
    for name in (SHARED, BIND_BACKED, "t-local-sneaky"):
        with contextlib.suppress(Exception):
            docker_client.api.remove_volume(name, force=True)


def policy_for(dockerd: Dockerd, allowed: Path) -> ContainerPolicy:
    """As an agent configured with these settings makes it (its own Docker socket never mounted).
    dockerd's own directory is allowlisted too, to show that its socket is refused even so."""
    cfg = load_agent_config(
        ["--coordinator", "c:1", "--node-id", NODE, "--docker-host", dockerd.base_url,
         "--bind-allowlist", f"{allowed},{dockerd.root}", "--volume-allowlist", f"{SHARED},{BIND_BACKED}"],
        {},
    )  # fmt: skip
    return cfg.container_policy


def container_ids(docker_client: Any) -> set[str]:
    return {c["Id"] for c in docker_client.api.containers(all=True)}


def spec(image: str, **kw: Any) -> tpb.ContainerSpec:
    kw.setdefault("command", ["true"])
    return tpb.ContainerSpec(image=image, **kw)


def mount(source: str, target: str = "/mnt", read_only: bool = True) -> list[tpb.VolumeMount]:
    return [tpb.VolumeMount(source=source, target=target, read_only=read_only)]


def run_planter(runtime: DockerRuntime, image: str, allowed: Path, script: str) -> None:
    """An earlier container with write access to the allowlisted directory (the test mounts it
    read-write through the runtime itself, as no policy would) plants links there."""
    allocation = f"planter{uuid.uuid4().hex[:8]}"
    launch = ContainerLaunch(
        allocation_id=allocation, revision=1, node="elsewhere", gpu_uuids=(), gpu_indexes=(), cpus=1,
        memory_bytes=64 * MiB, image=image, command=("sh", "-c", script), network="none",
        volumes=(Volume(str(allowed), "/w"),),
    )  # fmt: skip
    info = runtime.start(launch)
    info = runtime.wait(info.id, 30)
    assert info.exit_code == 0, info
    runtime.remove(info.id)


# --- the agent: every refusal before any Docker call ---------------------------------------------


def refused_cases(dockerd: Dockerd, allowed: Path) -> list[tuple[str, dict[str, Any], str, type[GpuLeaseError]]]:
    return [
        ("/", {"volumes": mount("/")}, "bind-forbidden", PermissionDenied),
        ("//", {"volumes": mount("//")}, "mount-canonical", InvalidRequest),
        ("/./", {"volumes": mount("/./")}, "mount-canonical", InvalidRequest),
        ("/a/../b", {"volumes": mount(f"{allowed}/in/../in")}, "mount-canonical", InvalidRequest),
        ("trailing /", {"volumes": mount(f"{allowed}/in/")}, "mount-canonical", InvalidRequest),
        ("the docker socket", {"volumes": mount("/var/run/docker.sock")}, "bind-forbidden", PermissionDenied),
        ("this agent's docker socket", {"volumes": mount(str(dockerd.socket))}, "bind-forbidden",
         PermissionDenied),
        ("outside the allowlist", {"volumes": mount("/opt")}, "bind-allowlist", PermissionDenied),
        ("a writable bind", {"volumes": mount(f"{allowed}/in", read_only=False)}, "bind-read-only",
         PermissionDenied),
        ("a volume not on the list", {"volumes": mount("postgres-data")}, "volume-allowlist", PermissionDenied),
        ("another tenant's volume", {"volumes": mount("t-other-scratch", read_only=False)}, "volume-tenant",
         PermissionDenied),
        ("target under nvidia-container-devices",
         {"volumes": mount(f"{allowed}/in", "/var/run/nvidia-container-devices/GPU-0")}, "mount-target",
         PermissionDenied),
        ("NVIDIA_DRIVER_CAPABILITIES", {"env": {"NVIDIA_DRIVER_CAPABILITIES": "all"}}, "env-reserved",
         InvalidRequest),
        ("a hex-like name", {"name": "0123456789abcdef"}, "container-name", InvalidRequest),
        ("a gpulease- name", {"name": "gpulease-mine"}, "container-name", InvalidRequest),
    ]  # fmt: skip


async def test_refusals_make_no_docker_call_and_no_container(
    cluster: Cluster, dockerd: Dockerd, busybox: str, counted: Counted, docker_client: Any, allowed: Path,
    volumes: None,
) -> None:  # fmt: skip
    alloc = await cluster.allocate()
    policy = policy_for(dockerd, allowed)
    async with agent(cluster.address, FakeRuntime(), factory=lambda: counted.runtime, policy=policy,
                     network="none") as a:  # fmt: skip
        before = container_ids(docker_client)
        cases = [
            *refused_cases(dockerd, allowed),
            ("a registry not on the list", {"image": "registry.invalid/no/such-image:1"}, "image-registry",
             PermissionDenied),
        ]  # fmt: skip
        for what, asks, rule, error in cases:
            image = asks.pop("image", busybox)
            with pytest.raises(GpuLeaseError) as e:
                await a.containers.start(alloc.id, alloc.revision, spec(image, **asks))
            assert type(e.value) is error and e.value.message.startswith(f"rule {rule!r}: "), (what, e.value)
            assert counted.take() == [], what
        assert container_ids(docker_client) == before

        # Named volumes are judged from what Docker says of them: one inspection, nothing else.
        for source, rule in ((BIND_BACKED, "volume-driver"), (SHARED, "volume-read-only")):
            read_only = source == BIND_BACKED
            with pytest.raises(PermissionDenied) as e:
                await a.containers.start(
                    alloc.id, alloc.revision, spec(busybox, volumes=mount(source, "/v", read_only))
                )
            assert e.value.message.startswith(f"rule {rule!r}: "), e.value.message
            assert counted.take() == ([f"GET /volumes/{source}"] if read_only else [])
        assert "device" in e.value.message or "read-only" in e.value.message
        # A tenant-named volume that gpulease did not make, backed by a bind: refused all the same.
        docker_client.api.create_volume(
            "t-local-sneaky", driver="local", driver_opts={"type": "none", "o": "bind", "device": "/etc"}
        )
        with pytest.raises(PermissionDenied, match="rule 'volume-driver'"):
            await a.containers.start(
                alloc.id, alloc.revision, spec(busybox, volumes=mount("t-local-sneaky", "/v", read_only=False))
            )
        assert counted.take() == ["GET /volumes/t-local-sneaky"]
        assert container_ids(docker_client) == before


async def test_a_symlink_planted_by_an_earlier_container_is_refused(
    cluster: Cluster, dockerd: Dockerd, busybox: str, counted: Counted, docker_client: Any, allowed: Path
) -> None:
    run_planter(counted.runtime, busybox, allowed, "ln -s /etc /w/escape && ln -s /w/in /w/inner")
    assert (allowed / "escape").is_symlink()
    counted.take()
    alloc = await cluster.allocate()
    async with agent(cluster.address, FakeRuntime(), factory=lambda: counted.runtime,
                     policy=policy_for(dockerd, allowed), network="none") as a:  # fmt: skip
        before = container_ids(docker_client)
        for source, link in (
            (allowed / "escape", allowed / "escape"),  # the link itself: host /etc
            (allowed / "escape" / "shadow", allowed / "escape"),  # through it
            (allowed / "inner" / "hello.txt", allowed / "inner"),  # a link inside the allowlist is refused too
        ):
            with pytest.raises(PermissionDenied) as e:
                await a.containers.start(alloc.id, alloc.revision, spec(busybox, volumes=mount(str(source))))
            assert e.value.message.startswith("rule 'bind-symlink': ") and f"{link} is a symlink" in e.value.message
            assert counted.take() == []
        assert container_ids(docker_client) == before


async def test_what_the_policy_allows_runs(
    cluster: Cluster, dockerd: Dockerd, busybox: str, counted: Counted, docker_client: Any, allowed: Path,
    volumes: None,
) -> None:  # fmt: skip
    alloc = await cluster.allocate(cpus=1)  # this machine may have 2 CPUs
    assert alloc.tenant == "local"  # a clear-text coordinator's one local admin
    volume = "t-local-scratch"
    inventory = node_inventory(NODE)
    for g in inventory.gpus:
        g.cpu_affinity = ""  # no cpuset: the fixture's 0-7 may be more CPUs than this machine has
    async with agent(cluster.address, FakeRuntime(), factory=lambda: counted.runtime, inventory=inventory,
                     policy=policy_for(dockerd, allowed), network="none", retention=0) as a:  # fmt: skip
        try:
            # An allowlisted directory, read-only; the shared volume, read-only; the tenant's own
            # volume, writable, made by the agent on first use.
            script = (
                "cat /in/hello.txt; touch /in/x 2>/dev/null && echo in-writable; echo kept > /scratch/out; ls /shared"
            )
            started = await a.containers.start(
                alloc.id, alloc.revision,
                spec(busybox, command=["sh", "-c", script], volumes=[
                    *mount(f"{allowed}/in", "/in"), *mount(SHARED, "/shared"),
                    *mount(volume, "/scratch", read_only=False)]),
            )  # fmt: skip
            info = await asyncio.to_thread(counted.runtime.wait, started.container_id, 30)
            assert info.exit_code == 0
            out = b"".join(chunk for _, chunk in counted.runtime.logs(info.id, follow=False)).decode()
            assert out == "hello from the host\n"
            assert not (allowed / "in" / "x").exists()
            labels = docker_client.api.inspect_volume(volume)["Labels"]
            assert labels == {LABEL_MANAGED: "true", LABEL_TENANT: "local", LABEL_NODE: NODE}

            # The next container of the tenant finds what the first wrote.
            again = await a.containers.start(
                alloc.id, alloc.revision, spec(busybox, command=["cat", "/s/out"], volumes=mount(volume, "/s"))
            )
            info = await asyncio.to_thread(counted.runtime.wait, again.container_id, 30)
            assert b"".join(c for _, c in counted.runtime.logs(info.id, follow=False)) == b"kept\n"
        finally:
            await cluster.release(alloc.id)
        # Ended and retained 0 s: the containers go, then the volume no container uses.
        report = await a.enforcer.tick()
        assert {c.id for c in report.removed} == {started.container_id, again.container_id}
        assert [v.name for v in report.removed_volumes] == [volume]
    assert [v["Name"] for v in docker_client.api.volumes()["Volumes"] or () if v["Name"] == volume] == []
    assert docker_client.api.containers(all=True, filters={"label": f"{LABEL_ALLOCATION}={alloc.id}"}) == []


# --- the coordinator refuses before forwarding; the agent enforces its own copy --------------------


async def test_the_coordinator_refuses_before_forwarding(cluster: Cluster) -> None:
    """The cluster fixture's nodes are registered at addresses where nothing listens: a call the
    coordinator forwarded would be UNAVAILABLE, so a refusal naming the rule was the coordinator's."""
    alloc = await cluster.allocate()
    cases = [
        (spec("busybox", volumes=mount("/etc", "/x")), grpc.StatusCode.PERMISSION_DENIED, "bind-forbidden"),
        (spec("busybox", volumes=mount("/data", "/x")), grpc.StatusCode.PERMISSION_DENIED, "bind-allowlist"),
        (spec("busybox", volumes=mount("/a/../b", "/x")), grpc.StatusCode.INVALID_ARGUMENT, "mount-canonical"),
        (spec("ghcr.io/acme/x:1"), grpc.StatusCode.PERMISSION_DENIED, "image-registry"),
        (spec("busybox", env={"NVIDIA_DRIVER_CAPABILITIES": "all"}), grpc.StatusCode.INVALID_ARGUMENT,
         "env-reserved"),
        (spec("busybox", name="gpulease-x"), grpc.StatusCode.INVALID_ARGUMENT, "container-name"),
        (spec("busybox", volumes=mount("t-other-x", "/x")), grpc.StatusCode.PERMISSION_DENIED, "volume-tenant"),
    ]  # fmt: skip
    for s, code, rule in cases:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await cluster.stub.RunContainer(pb.RunContainerRequest(allocation_id=alloc.id, spec=s))
        assert e.value.code() == code and (e.value.details() or "").startswith(f"rule {rule!r}: "), e.value
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await cluster.stub.RunContainer(pb.RunContainerRequest(allocation_id=alloc.id, spec=spec("busybox")))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # allowed: forwarded, to an agent that is not there


@contextlib.contextmanager
def policy_node(
    cluster: LocalCluster, dockerd: Dockerd, coordinator_args: list[str], agent_args: list[str]
) -> Iterator[str]:
    """A coordinator and a Docker agent of the test's cluster, each with its own policy settings."""
    c = harness.start_coordinator(cluster, extra=coordinator_args)
    try:
        dockerd.add_agent(cluster, "gpu-policy", 1, *agent_args, coordinator=c.address)
        harness.wait_nodes_up(c.stub, {"gpu-policy"})
        yield c.address
    finally:
        c.channel.close()


@pytest.mark.slow
def test_the_agent_enforces_its_own_copy(
    local_cluster: LocalCluster, dockerd: Dockerd, busybox: str, docker_client: Any, allowed: Path
) -> None:
    """The coordinator allows a bind mount its allowlist names, the agent's allowlist does not:
    the agent refuses it, and no container is made. With both allowing it, it runs."""
    source = f"{allowed}/in"
    with policy_node(local_cluster, dockerd, ["--bind-allowlist", str(allowed)], []) as address, \
            Client(address) as c:  # fmt: skip
        a = c.allocate(gpus=1, ttl=60)
        before = container_ids(docker_client)
        with pytest.raises(PermissionDenied) as e:
            c.run_container(a.id, busybox, ["true"], volumes=[f"{source}:/in:ro"])
        assert e.value.message.startswith("rule 'bind-allowlist': ") and "bind mounts are off" in e.value.message
        assert container_ids(docker_client) == before
        c.release(a.id)
    local_cluster.stop_agent("gpu-policy")

    with policy_node(local_cluster, dockerd, ["--bind-allowlist", str(allowed)],
                     ["--bind-allowlist", str(allowed)]) as address, Client(address) as c:  # fmt: skip
        # The first allocation asked for a container on the GPU: it drains until the (new) agent has
        # reported that nothing of it runs (coordinator/draining.py).
        harness.wait_until(lambda: harness.free_gpus(c) == 1, 30, "the GPU to drain")
        a = c.allocate(gpus=1, ttl=60)
        try:
            started = c.run_container(a.id, busybox, ["cat", "/in/hello.txt"], volumes=[f"{source}:/in:ro"])
            deadline = time.monotonic() + 30
            while c.wait_container(a.id, started.id, timeout=5).state != "exited" and time.monotonic() < deadline:
                pass
            assert b"".join(chunk.data for chunk in c.logs(a.id, started.id)) == b"hello from the host\n"
        finally:
            c.release(a.id)
