"""What a granted allocation's container may do to its GPU server (issue 14, part B), against the
real test dockerd (tests/support/dockerd.py).

- Inspection: every container the agent starts is not privileged, has no-new-privileges, the PID
  limit, no NET_RAW, its profile's capabilities (and user), the log size limit and exactly the
  allocated GPUs, as dockerd reports it and as the container's own /proc/self/status says.
- One running container per allocation: a second start is refused while one runs, concurrent
  starts give one container, so the summed CPU and memory limits never exceed the allocation's.
- Two agents on one dockerd: neither stops, removes or answers for the other's containers.
- Networks: the agent's own bridge with inter-container traffic off, refused on this dockerd (iptables
  off); other networks checked. What containers reach with iptables on: test_network_isolation.py.
- Unused images: removed by age and by disk use; images in use stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import tarfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from gpulease.agent.containers import Limits
from gpulease.agent.enforcer import Enforcer
from gpulease.agent.runtime import (
    AGENT_NETWORK,
    ICC_OPTION,
    LABEL_ALLOCATION,
    LABEL_MANAGED,
    LABEL_NODE,
    LOG_MAX_FILES,
    Hardening,
)
from gpulease.agent.runtime.docker_runtime import DockerRuntime
from gpulease.dev import procs
from gpulease.dev.cluster import LocalCluster
from gpulease.errors import ContainerNotFound, PermissionDenied, RateLimited
from gpulease.v1 import agent_pb2, agent_pb2_grpc
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import types_pb2 as tpb
from tests.support import harness
from tests.support.agent_cluster import GRACE, INTERVAL, NODE, Cluster, agent, node_inventory
from tests.support.agent_cluster import cluster as cluster  # the fixture: NODE and OTHER registered
from tests.support.dockerd import Dockerd
from tests.support.fake_runtime import FakeRuntime

GiB = 2**30
MiB = 2**20
# Docker's default capabilities (moby's oci/caps/defaults.go) and their numbers (linux/capability.h).
DOCKER_DEFAULT_CAPS = {
    "CHOWN": 0, "DAC_OVERRIDE": 1, "FOWNER": 3, "FSETID": 4, "KILL": 5, "SETGID": 6, "SETUID": 7, "SETPCAP": 8,
    "NET_BIND_SERVICE": 10, "NET_RAW": 13, "SYS_CHROOT": 18, "MKNOD": 27, "AUDIT_WRITE": 29, "SETFCAP": 31,
}  # fmt: skip
NET_RAW = 1 << DOCKER_DEFAULT_CAPS["NET_RAW"]
STATUS_SCRIPT = "grep -E '^(CapEff|CapBnd|CapPrm|NoNewPrivs)' /proc/self/status; echo uid=$(id -u) gid=$(id -g)"


@pytest.fixture
def docker_client(dockerd: Dockerd) -> Iterator[Any]:
    client = dockerd.client()
    yield client
    client.close()


@pytest.fixture
def runtime(dockerd: Dockerd) -> Iterator[DockerRuntime]:
    rt = DockerRuntime(dockerd.base_url, pull_timeout=60)
    yield rt
    rt.close()


def no_affinity() -> tpb.NodeInventory:
    """The fixture's node without CPU affinity: no cpuset (its 0-7 may be more CPUs than this machine has)."""
    inventory = node_inventory(NODE)
    for g in inventory.gpus:
        g.cpu_affinity = ""
    return inventory


def docker_agent(cluster: Cluster, runtime: DockerRuntime, **kw: Any) -> Any:
    """The agent's container side in process, on the test dockerd."""
    kw.setdefault("network", "none")
    return agent(cluster.address, FakeRuntime(), factory=lambda: runtime, inventory=no_affinity(), **kw)


def remove_allocation_containers(docker_client: Any, allocation_id: str) -> None:
    for c in docker_client.api.containers(all=True, filters={"label": f"{LABEL_ALLOCATION}={allocation_id}"}):
        with contextlib.suppress(Exception):
            docker_client.api.remove_container(c["Id"], force=True)


def caps(hex_mask: str) -> int:
    return int(hex_mask, 16)


def status_of(output: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in output.splitlines():
        if ":" in line:
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        for word in line.split():
            if "=" in word:
                key, _, value = word.partition("=")
                fields[key] = value
    return fields


async def run_to_exit(
    a: Any, runtime: DockerRuntime, alloc: tpb.Allocation, image: str, script: str
) -> tuple[str, dict[str, Any]]:
    status = await a.containers.start(
        alloc.id, alloc.revision, tpb.ContainerSpec(image=image, command=["sh", "-c", script])
    )
    info = await asyncio.to_thread(runtime.wait, status.container_id, 30)
    assert info.state == "exited" and info.exit_code == 0, info
    output = b"".join(chunk for _, chunk in runtime.logs(status.container_id, follow=False)).decode()
    return output, runtime.api.inspect_container(status.container_id)


# -- inspection -----------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["baseline", "restricted"])
async def test_every_container_runs_hardened_with_its_profile(
    cluster: Cluster, dockerd: Dockerd, busybox: str, runtime: DockerRuntime, docker_client: Any, profile: str
) -> None:
    hardening = Hardening(profile=profile, pids_limit=321, log_max_size=3 * MiB)  # type: ignore[arg-type]
    alloc = await cluster.allocate(gpus=2, cpus=2)
    try:
        async with docker_agent(cluster, runtime, hardening=hardening) as a:
            output, attrs = await run_to_exit(a, runtime, alloc, busybox, STATUS_SCRIPT)
    finally:
        remove_allocation_containers(docker_client, alloc.id)
    host = attrs["HostConfig"]
    assert host["Privileged"] is False
    assert host["SecurityOpt"] == ["no-new-privileges:true"]
    assert host["PidsLimit"] == 321
    assert host["LogConfig"] == {
        "Type": "json-file",
        "Config": {"max-size": str(3 * MiB), "max-file": str(LOG_MAX_FILES)},
    }
    # No namespace of the host's: network "none" here (the agent's setting), private IPC, and
    # neither the host's PID nor UTS namespace.
    assert host["NetworkMode"] == "none" and host["IpcMode"] == "private"
    assert host["PidMode"] == "" and host["UTSMode"] == "" and host.get("UsernsMode", "") == ""
    # No devices but the allocated GPUs (by UUID), and nothing that could add any.
    uuids = [g.uuid for g in alloc.gpus]
    assert not host.get("Devices") and not host.get("DeviceCgroupRules")
    assert [(r["Driver"], r["DeviceIDs"], r["Capabilities"]) for r in host["DeviceRequests"]] == [
        ("nvidia", uuids, [["gpu"]])
    ]
    env = dict(e.split("=", 1) for e in attrs["Config"]["Env"])
    assert env["NVIDIA_VISIBLE_DEVICES"] == ",".join(uuids)
    assert not host.get("CapAdd")

    seen = status_of(output)
    assert seen["NoNewPrivs"] == "1"
    bounding = caps(seen["CapBnd"])
    assert not bounding & NET_RAW
    if profile == "baseline":
        assert host["CapDrop"] == ["NET_RAW"] and attrs["Config"]["User"] == ""
        expected = sum(1 << bit for name, bit in DOCKER_DEFAULT_CAPS.items() if name != "NET_RAW")
        assert bounding == expected, f"{bounding:#x} != {expected:#x}"
        assert (seen["uid"], seen["gid"]) == ("0", "0")
    else:
        assert host["CapDrop"] == ["ALL"] and attrs["Config"]["User"] == "65534:65534"
        assert bounding == 0 and caps(seen["CapEff"]) == 0 and caps(seen["CapPrm"]) == 0
        assert (seen["uid"], seen["gid"]) == ("65534", "65534")


async def test_the_pid_limit_holds_inside_the_container(
    cluster: Cluster, dockerd: Dockerd, busybox: str, runtime: DockerRuntime, docker_client: Any
) -> None:
    # 40 sleeping children against a limit of 24: forks fail once the limit is reached (counted with
    # shell builtins only: counting must not need a fork itself), and the container carries on.
    # busybox sh gives up at the first failed fork: the forks run in a subshell.
    script = (
        "(i=0; while [ $i -lt 40 ]; do sleep 30 & i=$((i+1)); done) 2>/dev/null; "
        "n=0; for p in /proc/[0-9]*; do n=$((n+1)); done; echo started=$n; kill -9 -1 2>/dev/null; exit 0"
    )
    alloc = await cluster.allocate(cpus=1)
    try:
        async with docker_agent(cluster, runtime, hardening=Hardening(pids_limit=24)) as a:
            output, attrs = await run_to_exit(a, runtime, alloc, busybox, script)
    finally:
        remove_allocation_containers(docker_client, alloc.id)
    assert attrs["HostConfig"]["PidsLimit"] == 24
    assert 10 <= int(status_of(output)["started"]) <= 24, output


# -- one running container per allocation ------------------------------------------------------------


async def test_an_allocation_runs_one_container_at_a_time(
    cluster: Cluster, dockerd: Dockerd, busybox: str, runtime: DockerRuntime, docker_client: Any
) -> None:
    alloc = await cluster.allocate(gpus=1, cpus=2)
    sleeper = tpb.ContainerSpec(image=busybox, command=["sleep", "300"])
    try:
        async with docker_agent(cluster, runtime) as a:
            # Five starts at once: one container, the others refused (one start in flight per
            # allocation, and one running container).
            results = await asyncio.gather(
                *(a.containers.start(alloc.id, alloc.revision, sleeper) for _ in range(5)), return_exceptions=True
            )
            started = [r for r in results if isinstance(r, tpb.ContainerStatus)]
            refused = [r for r in results if isinstance(r, (RateLimited, PermissionDenied))]
            assert len(started) == 1 and len(refused) == 4, results
            assert all(r.message.startswith(("rule 'starts': ", "rule 'one-container': ")) for r in refused)
            # While it runs, another start is refused before any pull or create.
            with pytest.raises(PermissionDenied) as e:
                await a.containers.start(alloc.id, alloc.revision, sleeper)
            assert e.value.message.startswith("rule 'one-container': ") and started[0].container_id[:12] in str(e.value)
            assert_within_allocation(docker_client, alloc)

            # Once it has stopped, the allocation may run another, again with all of its limits.
            await a.containers.stop(tpb.ContainerRef(container_id=started[0].container_id), 1)
            second = await a.containers.start(alloc.id, alloc.revision, sleeper)
            assert second.container_id != started[0].container_id
            assert_within_allocation(docker_client, alloc)
            await a.containers.stop(tpb.ContainerRef(container_id=second.container_id), 1)
    finally:
        remove_allocation_containers(docker_client, alloc.id)


def assert_within_allocation(docker_client: Any, alloc: tpb.Allocation) -> None:
    """The summed CPU and memory limits of the allocation's running containers are at most its own."""
    running = docker_client.api.containers(filters={"label": f"{LABEL_ALLOCATION}={alloc.id}", "status": "running"})
    hosts = [docker_client.api.inspect_container(c["Id"])["HostConfig"] for c in running]
    assert len(hosts) <= 1
    assert sum(h["NanoCpus"] for h in hosts) <= alloc.cpus * 1_000_000_000
    assert sum(h["Memory"] for h in hosts) <= alloc.memory_bytes
    assert all(h["NanoCpus"] > 0 and h["Memory"] > 0 for h in hosts)  # limits, not "unlimited"


# -- two agents on one dockerd ---------------------------------------------------------------------


@pytest.mark.slow
def test_two_agents_on_one_dockerd_touch_only_their_own_containers(
    coordinator: harness.Coordinator, local_cluster: LocalCluster, dockerd: Dockerd, busybox: str
) -> None:
    """d1 and d2 share a dockerd. d2's agent is killed; its allocation is released. d1's agent,
    whose enforcer lists every managed container on the daemon, leaves d2's container running,
    does not find it by id, and still stops its own on release. d2's agent, back, stops its own."""
    ports = {name: procs.free_port() for name in ("d1", "d2")}

    def start_agent(name: str) -> procs.ManagedProcess:
        return dockerd.add_agent(
            local_cluster, name, 2, coordinator=coordinator.address, port=ports[name], labels={"host": name}
        ).process

    def allocate(name: str) -> tpb.Allocation:
        request = pb.AllocateRequest(gpus=1, cpus=1, memory_bytes=GiB, ttl_seconds=120, owner="e2e",
                                     node_selector={"host": name})  # fmt: skip
        return coordinator.stub.Allocate(request).allocation

    def stub(name: str) -> tuple[grpc.Channel, agent_pb2_grpc.AgentServiceStub]:
        channel = grpc.insecure_channel(f"127.0.0.1:{ports[name]}")
        return channel, agent_pb2_grpc.AgentServiceStub(channel)

    def running(container_id: str) -> bool:
        return bool(client.api.inspect_container(container_id)["State"]["Running"])

    client = dockerd.client()
    ids: dict[str, str] = {}
    agents = {name: start_agent(name) for name in ("d1", "d2")}
    try:
        harness.wait_nodes_up(coordinator.stub, {"d1", "d2"})
        allocs = {name: allocate(name) for name in ("d1", "d2")}
        for name, alloc in allocs.items():
            channel, s = stub(name)
            with channel:
                spec = tpb.ContainerSpec(
                    image=busybox, command=["sleep", "600"], name=f"two-{name}-{uuid.uuid4().hex[:6]}"
                )
                status = s.StartContainer(
                    agent_pb2.StartContainerRequest(allocation_id=alloc.id, revision=alloc.revision, spec=spec),
                    timeout=120,
                )
            ids[name] = status.container_id
            labels = client.api.inspect_container(status.container_id)["Config"]["Labels"]
            assert labels[LABEL_NODE] == name

        agents["d2"].kill()  # no agent for d2 now: nothing of d2's may be stopped but by d2's own
        coordinator.stub.Release(pb.ReleaseRequest(allocation_id=allocs["d2"].id))
        channel, s = stub("d1")
        with channel:
            for call, request in (
                (s.GetContainer, tpb.ContainerRef(container_id=ids["d2"])),
                (s.StopContainer, tpb.StopContainerRequest(ref=tpb.ContainerRef(container_id=ids["d2"]))),
                (s.WaitContainer, tpb.WaitContainerRequest(ref=tpb.ContainerRef(container_id=ids["d2"]))),
            ):
                with pytest.raises(grpc.RpcError) as e:
                    call(request, timeout=30)
                assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value
            # The session's dockerd may keep exited containers of earlier tests' nodes named d1 too:
            # what matters is that d1 lists its own and never d2's.
            listed = {c.container_id for c in s.ListContainers(tpb.ListContainersRequest(), timeout=30).containers}
            assert ids["d1"] in listed and ids["d2"] not in listed
        # Several enforcement rounds of d1's agent: d2's container (its allocation gone) keeps running.
        time.sleep(3 * INTERVAL + GRACE)
        assert running(ids["d2"]) and running(ids["d1"])

        coordinator.stub.Release(pb.ReleaseRequest(allocation_id=allocs["d1"].id))
        harness.wait_until(lambda: not running(ids["d1"]), INTERVAL + GRACE + 3, "d1's container to stop")
        assert running(ids["d2"])

        agents["d2"] = start_agent("d2")  # reconciles: its allocation has ended, so it stops it
        harness.wait_until(lambda: not running(ids["d2"]), 30, "d2's container to be stopped by d2's agent")
    finally:
        for name in agents:
            with contextlib.suppress(Exception):
                local_cluster.stop_agent(name)
        for container_id in ids.values():
            with contextlib.suppress(Exception):
                client.api.remove_container(container_id, force=True)
        client.close()


async def test_an_agent_ignores_other_nodes_containers_in_process(cluster: Cluster) -> None:
    """The same with an in-memory runtime: a planted container of another node, of an allocation
    that is not live, is never stopped; one of this node's is."""
    runtime = FakeRuntime()
    theirs = runtime.plant(allocation_id="gone-elsewhere", revision=1, node="somewhere-else")
    mine = runtime.plant(allocation_id="gone-here", revision=1, node="n1")
    async with agent(cluster.address, runtime) as a:
        report = await a.enforcer.tick()
        assert [v.container.id for v in report.stopped] == [mine]
        assert runtime.info(theirs).state == "running" and runtime.info(mine).state == "exited"
        with pytest.raises(ContainerNotFound):
            await a.containers.get(tpb.ContainerRef(container_id=theirs))
        assert [c.container_id for c in await a.containers.list("")] == [mine]


def test_limits_have_the_documented_defaults() -> None:
    assert Limits() == Limits(max_concurrent_pulls=2, max_log_streams_per_allocation=4, max_waits_per_allocation=8)
    assert Hardening().profile == "baseline" and Hardening().pids_limit == 4096
    with pytest.raises(ValueError):
        Hardening(profile="privileged")  # type: ignore[arg-type]


# -- networks ------------------------------------------------------------------------------------------


async def test_the_agents_network_is_refused_while_dockerd_runs_with_iptables_off(
    cluster: Cluster, dockerd: Dockerd, busybox: str, runtime: DockerRuntime, docker_client: Any
) -> None:
    """The agent's own network (made on first use): a bridge with inter-container traffic off. The
    session's dockerd runs with --iptables=false, so nothing drops that traffic: every start on it
    is refused before any container exists, with the reason. (The same network on a dockerd with
    iptables on, what its containers can and cannot reach: tests/e2e/test_network_isolation.py.)"""
    with contextlib.suppress(Exception):
        docker_client.api.remove_network(AGENT_NETWORK)  # made by the agent below
    alloc = await cluster.allocate(cpus=1)
    try:
        async with docker_agent(cluster, runtime, network=AGENT_NETWORK) as a:
            with pytest.raises(PermissionDenied) as e:
                await a.containers.start(
                    alloc.id, alloc.revision, tpb.ContainerSpec(image=busybox, command=["sleep", "30"])
                )
        assert not docker_client.api.containers(all=True, filters={"label": f"{LABEL_ALLOCATION}={alloc.id}"})
    finally:
        remove_allocation_containers(docker_client, alloc.id)
    message = e.value.message
    assert message.startswith(f"rule 'network-isolation': network '{AGENT_NETWORK}': dockerd runs with iptables off")
    assert "-i gpulease0 -o gpulease0 -j DROP" in message and message.endswith("so no container is started on it")
    net = docker_client.api.inspect_network(AGENT_NETWORK)
    assert net["Driver"] == "bridge" and net["Options"][ICC_OPTION] == "false" and not net["Internal"]
    assert net["Options"]["com.docker.network.bridge.name"] == "gpulease0"  # for the host's firewall rules
    assert net["Labels"] == {LABEL_MANAGED: "true"}


async def test_a_network_that_lets_containers_talk_is_refused_before_any_pull(
    cluster: Cluster, dockerd: Dockerd, busybox: str, runtime: DockerRuntime, docker_client: Any
) -> None:
    name = f"icc-on-{uuid.uuid4().hex[:6]}"
    docker_client.api.create_network(name, driver="bridge")  # Docker's default: inter-container traffic on
    alloc = await cluster.allocate(cpus=1)
    try:
        for network, why in ((name, "inter-container traffic is on"), ("no-such-network", "does not exist")):
            async with docker_agent(cluster, runtime, network=network) as a:
                with pytest.raises(PermissionDenied) as e:
                    await a.containers.start(
                        alloc.id, alloc.revision, tpb.ContainerSpec(image=busybox, command=["true"])
                    )
            assert e.value.message.startswith("rule 'network-isolation': ") and why in e.value.message
        assert not docker_client.api.containers(all=True, filters={"label": f"{LABEL_ALLOCATION}={alloc.id}"})
    finally:
        docker_client.api.remove_network(name)
    # Never the host's network namespace, nor another container's: refused by the configuration
    # (and by the runtime, should a launch ask for it).
    from gpulease.agent.config import ConfigError, load_config

    for bad in ("host", "container:abc"):
        with pytest.raises(ConfigError, match="network namespace"):
            load_config(["--coordinator", "c:1", "--node-id", "n", "--container-network", bad], {})
        with pytest.raises(PermissionDenied, match="network-isolation"):
            runtime.prepare_network(bad)


# -- unused images ---------------------------------------------------------------------------------


def import_image(docker_client: Any, ref: str, size: int) -> str:
    """A one-file image of about ``size`` bytes (random: each image its own layer); its id."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = os.urandom(size)
        info = tarfile.TarInfo("blob")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    repository, tag = ref.rsplit(":", 1)
    docker_client.api.import_image_from_data(buf.getvalue(), repository=repository, tag=tag)
    return str(docker_client.api.inspect_image(ref)["Id"])


def image_refs(docker_client: Any) -> set[str]:
    return {t for i in docker_client.api.images() for t in i.get("RepoTags") or ()}


async def test_unused_images_are_removed_by_age_and_by_disk_use(
    cluster: Cluster, dockerd: Dockerd, busybox: str, runtime: DockerRuntime, docker_client: Any
) -> None:
    """Age: an image no container uses goes once unused for image_retention; one an exited
    container refers to, and the one a running container uses, stay. Disk use: over the limit,
    unused images go least recently used first, until under it."""
    alloc = await cluster.allocate(cpus=1)
    refs = {name: f"gpl-img/{name}-{uuid.uuid4().hex[:6]}:1" for name in ("old", "kept", "lru", "mru")}
    try:
        async with docker_agent(cluster, runtime) as a:
            await a.containers.start(
                alloc.id, alloc.revision, tpb.ContainerSpec(image=busybox, command=["sleep", "300"])
            )
            import_image(docker_client, refs["old"], 4096)
            import_image(docker_client, refs["kept"], 4096)
            exited = docker_client.api.create_container(refs["kept"], command=["none"])["Id"]  # never started
            ages = Enforcer(node=NODE, coordinator=a.coordinator, containers=a.containers, vouchers=a.vouchers,
                            interval=INTERVAL, grace=GRACE, image_retention=1.0, image_disk_limit=0)  # fmt: skip
            await asyncio.sleep(1.5)
            removed = {t for i in await ages.remove_unused_images(force=True) for t in i.tags}
            assert refs["old"] in removed and refs["kept"] not in removed and busybox not in removed
            assert refs["old"] not in image_refs(docker_client)
            assert {refs["kept"], busybox} <= image_refs(docker_client)
            docker_client.api.remove_container(exited, force=True)

            # Disk use: two unused images, the older-tagged one goes first; nothing by age.
            import_image(docker_client, refs["lru"], 64 * 1024)
            await asyncio.sleep(1.1)  # LastTagTime apart
            import_image(docker_client, refs["mru"], 64 * 1024)
            images = docker_client.api.images()
            in_use = {c["ImageID"] for c in docker_client.api.containers(all=True)}
            # Room for what is in use and the most recent image: every other unused one must go.
            budget = sum(int(i["Size"]) for i in images if i["Id"] in in_use)
            budget += sum(int(i["Size"]) for i in images if refs["mru"] in (i.get("RepoTags") or ()))
            disk = Enforcer(node=NODE, coordinator=a.coordinator, containers=a.containers, vouchers=a.vouchers,
                            interval=INTERVAL, grace=GRACE, image_retention=0, image_disk_limit=budget)  # fmt: skip
            disk._started_unix_ms = 0  # as if the agent had run for long: only the tag times count
            removed = [t for i in await disk.remove_unused_images(force=True) for t in i.tags]
            # Least recently used first: "kept" (tagged first) before "lru"; never what is in use.
            assert removed.index(refs["kept"]) < removed.index(refs["lru"]) and busybox not in removed, removed
            assert refs["mru"] not in removed and {refs["mru"], busybox} <= image_refs(docker_client)
            for enforcer in (ages, disk):
                enforcer.close()
    finally:
        remove_allocation_containers(docker_client, alloc.id)
        for ref in refs.values():
            with contextlib.suppress(Exception):
                docker_client.api.remove_image(ref, force=True)
