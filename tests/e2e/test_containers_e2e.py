"""Containers end to end: gpuctl / client -> coordinator -> agent -> a real dockerd.

The agent reports simulated GPUs (there is no GPU here); the stand-in nvidia hook on the test
dockerd's PATH lets DeviceRequests through, so the container sees NVIDIA_VISIBLE_DEVICES with
exactly the allocated GPUs, and real cgroup limits.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import docker
import grpc
import pytest

from gpulease.client import Client
from gpulease.dev import procs
from gpulease.dev.cluster import LocalCluster
from gpulease.errors import ImageUnavailable, StaleFencingToken
from gpulease.v1 import agent_pb2, agent_pb2_grpc
from gpulease.v1 import types_pb2 as tpb
from tests.support import harness
from tests.support.dockerd import Dockerd

pytestmark = pytest.mark.slow
GiB = 2**30


class Node:
    def __init__(self, address: str, listen: str, proc: procs.ManagedProcess) -> None:
        self.coordinator, self.listen, self.proc = address, listen, proc


@contextlib.contextmanager
def running_node(cluster: LocalCluster, coordinator: harness.Coordinator, dockerd: Dockerd, *extra: str
                 ) -> Iterator[Node]:  # fmt: skip
    agent = dockerd.add_agent(cluster, "gpu-e2e", 4, *extra, coordinator=coordinator.address)
    try:
        harness.wait_nodes_up(coordinator.stub, {"gpu-e2e"})
        yield Node(coordinator.address, agent.address, agent.process)
    finally:
        cluster.stop_agent("gpu-e2e")


@pytest.fixture
def node(local_cluster: LocalCluster, coordinator: harness.Coordinator, dockerd: Dockerd, busybox: str
         ) -> Iterator[Node]:  # fmt: skip
    with running_node(local_cluster, coordinator, dockerd) as n:
        yield n


def gpuctl(node: Node, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = procs.python_child_env(drop_prefixes=("GPULEASE_",))
    return subprocess.run([sys.executable, "-m", "gpulease.cli.main", "--coordinator", node.coordinator, *args],
                          capture_output=True, text=True, timeout=timeout, env=env)  # fmt: skip


def live_allocations(node: Node) -> list[str]:
    with Client(node.coordinator) as c:
        return [a.id for a in c.list_allocations()]


def test_gpuctl_run_sees_exactly_its_gpus_and_limits_and_exits_with_its_code(node: Node, busybox: str) -> None:
    # cgroup v2 (cpu.max, memory.max) or v1 (cfs quota/period, limit_in_bytes), whichever is mounted.
    script = (
        "echo gpus=$NVIDIA_VISIBLE_DEVICES; "
        "if [ -f /sys/fs/cgroup/cpu.max ]; then echo cpu=$(cat /sys/fs/cgroup/cpu.max); "
        "echo mem=$(cat /sys/fs/cgroup/memory.max); else "
        "echo cpu=$(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us) $(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us); "
        "echo mem=$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes); fi; echo oops >&2; exit 3"
    )
    out = gpuctl(node, "run", "--gpus", "2", "--cpus", "2", "--memory", "1GiB", busybox, "sh", "-c", script)
    assert out.returncode == 3, out.stderr
    lines = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    assert lines["gpus"] == "GPU-SIM-gpu-e2e-0,GPU-SIM-gpu-e2e-1"  # best fit takes the lowest indexes
    assert lines["cpu"] == "200000 100000"  # 2 CPUs of quota per 100 ms period
    assert lines["mem"] == str(GiB)
    assert "oops" in out.stderr and "Traceback" not in out.stderr
    assert "released" in out.stderr
    assert live_allocations(node) == []


def test_user_cannot_choose_the_gpus(node: Node, busybox: str) -> None:
    out = gpuctl(node, "run", "--gpus", "1", "--env", "NVIDIA_VISIBLE_DEVICES=all", busybox, "true")
    assert out.returncode == 1 and "NVIDIA_VISIBLE_DEVICES" in out.stderr
    assert live_allocations(node) == []


def test_logs_come_back_in_order(node: Node, busybox: str) -> None:
    out = gpuctl(
        node, "run", "--gpus", "1", busybox, "sh", "-c", "i=1; while [ $i -le 300 ]; do echo line-$i; i=$((i+1)); done"
    )
    assert out.returncode == 0, out.stderr
    assert [line for line in out.stdout.splitlines() if line.startswith("line-")] == [
        f"line-{i}" for i in range(1, 301)
    ]


def test_bad_image_is_a_clear_error_and_the_allocation_is_released(node: Node) -> None:
    image = "gpulease-test/no-such-image:1"  # Docker Hub (allowed), not on the node, and no registry reachable
    out = gpuctl(node, "run", "--gpus", "1", image, "true", timeout=300)
    assert out.returncode == 1
    assert image in out.stderr and "Traceback" not in out.stderr
    # Generic words: the registry's (or the resolver's) message is in the agent's log only.
    assert "could not be pulled (the agent's log on this node says why)" in out.stderr, out.stderr
    assert live_allocations(node) == []
    with Client(node.coordinator) as c, pytest.raises(ImageUnavailable):
        a = c.allocate(gpus=1, ttl=30)
        try:
            c.run_container(a.id, image, ["true"])
        finally:
            c.release(a.id)


def test_an_image_from_a_registry_not_on_the_list_is_refused_before_any_pull(node: Node) -> None:
    out = gpuctl(node, "run", "--gpus", "1", "registry.invalid/no/such-image:1", "true")
    assert out.returncode == 4, out.stderr  # PERMISSION_DENIED
    assert "rule 'image-registry'" in out.stderr and "registry.invalid/no/such-image" in out.stderr
    assert live_allocations(node) == []


def _container_stops(c: Client, alloc_id: str, container_id: str) -> Callable[[], bool]:
    return lambda: c.list_containers(alloc_id)[0].state == "exited"


def test_release_stops_the_container(node: Node, busybox: str) -> None:
    with Client(node.coordinator) as c:
        a = c.allocate(gpus=1, ttl=60)
        started = c.run_container(a.id, busybox, ["sleep", "3600"])
        assert started.state == "running" and started.gpu_indexes == a.gpu_indexes
        c.release(a.id)
        harness.wait_until(_container_stops(c, a.id, started.id), 60 + 5, "container stopped after release")


def test_exited_container_is_removed_once_its_allocation_ends(
    local_cluster: LocalCluster, coordinator: harness.Coordinator, dockerd: Dockerd, busybox: str
) -> None:
    with running_node(local_cluster, coordinator, dockerd, "--container-retention-seconds", "0") as node, \
            Client(node.coordinator) as c:  # fmt: skip
        a = c.allocate(gpus=1, ttl=60)
        done = c.run_container(a.id, busybox, ["sh", "-c", "exit 3"])
        finished = c.wait_container(a.id, done.id, timeout=30)
        assert finished.state == "exited" and finished.exit_code == 3
        time.sleep(2.5)  # a check has passed: the allocation is live, so the container stays
        assert dockerd.client().api.inspect_container(done.id)["State"]["ExitCode"] == 3
        c.release(a.id)

        def gone() -> bool:
            try:
                dockerd.client().api.inspect_container(done.id)
            except docker.errors.NotFound:
                return True
            return False

        harness.wait_until(gone, 15, "the exited container removed after release")


def test_lease_expiry_stops_the_container(node: Node, busybox: str) -> None:
    with Client(node.coordinator) as c:
        a = c.allocate(gpus=1, ttl=5)
        started = c.run_container(a.id, busybox, ["sleep", "3600"])
        t0 = time.monotonic()
        harness.wait_until(_container_stops(c, a.id, started.id), 5 + 5, "container stopped after lease expiry")
        assert time.monotonic() - t0 > 2, "stopped before the lease could have lapsed"


def test_stale_fencing_token_is_refused_and_creates_nothing(node: Node, busybox: str, dockerd: Dockerd) -> None:
    with Client(node.coordinator) as c:
        a = c.allocate(gpus=1, ttl=60)
    with grpc.insecure_channel(node.listen) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.StartContainer(agent_pb2.StartContainerRequest(
                allocation_id=a.id, revision=a.revision + 1, spec=tpb.ContainerSpec(image=busybox, command=["true"])),
                timeout=60)  # fmt: skip
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert StaleFencingToken.reason in dict(err.value.trailing_metadata() or ()).values()
    docker = dockerd.client()
    try:
        assert docker.api.containers(all=True, filters={"label": f"io.gpulease.allocation={a.id}"}) == []
    finally:
        docker.close()


def test_wait_and_stop_through_the_coordinator(node: Node, busybox: str) -> None:
    with Client(node.coordinator) as c:
        a = c.allocate(gpus=1, ttl=60)
        try:
            started = c.run_container(a.id, busybox, ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"])
            assert c.wait_container(a.id, started.id, timeout=1).state == "running"
            stopped = c.stop_container(a.id, started.id, grace=5)
            assert stopped.state == "exited"
            assert [x.id for x in c.list_containers(a.id)] == [started.id]
        finally:
            c.release(a.id)
        # The allocation is gone but the logs and exit status stay reachable.
        assert c.list_containers(a.id)[0].state == "exited"
        logs = gpuctl(node, "logs", a.id)
        assert logs.returncode == 0, logs.stderr


def test_gpuctl_run_keeps_a_short_lease_alive(node: Node, busybox: str) -> None:
    # A 5 s lease, a container that runs 9 s: without renewals the lease would expire and the
    # agent stop the container.
    out = gpuctl(node, "run", "--gpus", "1", "--ttl", "5s", busybox, "sh", "-c", "sleep 9; echo done")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "done"
    assert "lost" not in out.stderr and "released" in out.stderr, out.stderr
    assert live_allocations(node) == []


@pytest.mark.parametrize(("signum", "name"), [(signal.SIGINT, "SIGINT"), (signal.SIGTERM, "SIGTERM")])
def test_gpuctl_run_ctrl_c_or_sigterm_stops_and_releases(node: Node, busybox: str, signum: int, name: str) -> None:
    env = procs.python_child_env(drop_prefixes=("GPULEASE_",))
    p = subprocess.Popen([sys.executable, "-m", "gpulease.cli.main", "--coordinator", node.coordinator, "run",
                          "--gpus", "1", busybox, "sh", "-c", "echo started; sleep 3600"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "started"
        p.send_signal(signum)  # SIGINT, as Ctrl-C; SIGTERM, as a scheduler or systemd
        _, err = p.communicate(timeout=60)
        assert p.returncode == 128 + signum, err
        assert f"{name}: stopping the container and releasing the allocation" in err, err
        assert "released" in err and "Traceback" not in err, err
        assert live_allocations(node) == []
        match = re.search(r"allocated (\w+) on", err)
        assert match, err
        with Client(node.coordinator) as c:
            assert [x.state for x in c.list_containers(match.group(1))] == ["exited"]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
