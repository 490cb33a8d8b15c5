"""A container that exits on its own yields one container_exited event (issue 16, section 5): a real
agent on the tests' dockerd sees the exit when it lists its containers and reports it in its next
heartbeat; the coordinator records it once and the client's event stream shows it."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from gpulease.client import Client
from gpulease.client.models import Event
from gpulease.dev.cluster import LocalCluster
from tests.support import harness
from tests.support.dockerd import Dockerd

pytestmark = pytest.mark.slow


@pytest.fixture
def node(local_cluster: LocalCluster, coordinator: harness.Coordinator, dockerd: Dockerd, busybox: str
         ) -> Iterator[str]:  # fmt: skip
    dockerd.add_agent(local_cluster, "exit-e2e", 1, coordinator=coordinator.address)
    try:
        harness.wait_nodes_up(coordinator.stub, {"exit-e2e"})
        yield coordinator.address
    finally:
        local_cluster.stop_agent("exit-e2e")


def test_a_container_exiting_on_its_own_is_one_container_exited_event(node: str, busybox: str) -> None:
    with Client(node, timeout=10) as client, client.allocate(gpus=1, cpus=1, memory="64MiB", ttl="60s") as alloc:
        job = alloc.run_container(busybox, ["sh", "-c", "exit 7"])
        assert job.wait(timeout=30).exit_code == 7

        def exits() -> list[Event]:
            return list(client.events(types=["container_exited"]))

        harness.wait_until(exits, 30, "a container_exited event")
        # A few more heartbeats (each may resend until answered): still one.
        time.sleep(3)
        (ev,) = exits()
        assert (ev.allocation_id, ev.node) == (alloc.id, "exit-e2e")
        assert ev.detail.endswith("exit code 7"), ev
