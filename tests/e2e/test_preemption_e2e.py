"""Preemption end to end (issue 15, section 3): a high-priority request preempts a preemptible
low-priority allocation whose container runs on the real test dockerd. The holder's client hears
it (AllocationPreempted through its on_preempted callback, and on every later use), the container
gets SIGTERM (its trap exits 0 within the grace), and the preemptor gets the freed GPUs."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import docker
import pytest

from gpulease.client import Client
from gpulease.dev.cluster import LocalCluster
from gpulease.errors import AllocationPreempted
from tests.support import harness
from tests.support.dockerd import Dockerd

pytestmark = pytest.mark.slow
# Exits 0 on SIGTERM (the trap runs between sleeps); without the signal it runs forever.
TRAPPING = ["sh", "-c", "trap 'echo got-sigterm; exit 0' TERM; while :; do sleep 0.2; done"]


@pytest.fixture
def node(local_cluster: LocalCluster, coordinator: harness.Coordinator, dockerd: Dockerd, busybox: str
         ) -> Iterator[str]:  # fmt: skip
    dockerd.add_agent(local_cluster, "pre-e2e", 2, coordinator=coordinator.address)
    try:
        harness.wait_nodes_up(coordinator.stub, {"pre-e2e"})
        yield coordinator.address
    finally:
        local_cluster.stop_agent("pre-e2e")


def test_the_victim_hears_it_its_container_gets_sigterm_and_the_preemptor_gets_the_gpus(
    node: str, dockerd: Dockerd, busybox: str
) -> None:
    told: list[AllocationPreempted] = []
    heard = threading.Event()
    with Client(node, timeout=10) as admin, ThreadPoolExecutor(1) as pool:
        admin.set_priority_class("low", -100, grace="4s")
        victim = admin.allocate(gpus=2, cpus=1, memory="64MiB", ttl="6s", priority="low", preemptible=True)

        def on_preempted(err: AllocationPreempted) -> None:
            told.append(err)
            heard.set()

        victim.on_preempted(on_preempted)
        with victim:
            job = victim.run_container(busybox, TRAPPING)
            waiting = pool.submit(admin.allocate, gpus=2, cpus=1, memory="64MiB", wait="60s", priority="high")
            assert heard.wait(30), "the victim's keepalive never brought the preemption notice"
            notice = told[0]
            assert notice.cause == "priority" and "priority 100 over -100" in notice.message
            status = job.wait(timeout=30)  # SIGTERM from the preemption, not from the release below
            assert status.exit_code == 0, status
            assert "got-sigterm" in "".join(c.data.decode() for c in job.logs(follow=False))
            winner = waiting.result(timeout=30)
            assert winner.node == "pre-e2e" and sorted(g.uuid for g in winner.gpus) == sorted(
                g.uuid for g in victim.gpus
            )
            with pytest.raises(AllocationPreempted):
                victim.keep_alive()
        assert victim.preempted is notice
        winner.release()
    running = docker.DockerClient(base_url=dockerd.base_url).containers.list(
        filters={"label": f"io.gpulease.allocation={victim.id}"}
    )
    assert running == []
