"""No false down (issue 18): nodes whose agents are alive stay UP through an etcd leader change, an
etcd leader pause, and a coordinator replica's restart.

Real processes: the fault suite's 3-member etcd, two coordinators with a 1 s heartbeat interval
and a 4 s node TTL (short, so that each fault spans several TTLs), and three agents with
simulated GPUs, each given both coordinators. Both replicas are polled all along: every answer
must list every node UP, and no coordinator may log a node marked down.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpulease.dev.cluster import LocalCluster
from tests.faults.etcd_cluster import ELECTION_TIMEOUT_MS, EtcdCluster
from tests.support import harness

pytestmark = pytest.mark.timeout(300)

INTERVAL_S = 1
NODE_TTL_S = 4
NODES = ("a", "b", "c")
POLL_S = 0.2


@pytest.fixture
def cluster(etcd3: EtcdCluster, tmp_path: Path) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path / "cluster", etcd_url=etcd3.url_list, prefix=harness.new_prefix(),
                     node_ttl=NODE_TTL_S, heartbeat_interval=INTERVAL_S,
                     startup_timeout=harness.STARTUP_TIMEOUT_S)  # fmt: skip
    try:
        c.add_coordinator()
        c.add_coordinator()
        first, second = c.coordinator_addresses
        for i, name in enumerate(NODES):  # each starts on a different replica, and may use both
            c.add_agent(name, 1, cpus=4, memory="8GiB",
                        coordinator=f"{first},{second}" if i % 2 == 0 else f"{second},{first}")  # fmt: skip
        c.wait_nodes_up(NODES)
        yield c
    finally:
        c.stop()


class Watcher:
    """Polls every live replica's ListNodes; each answer must list every node UP."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.answers = 0
        self.unanswered = 0

    def watch(self, seconds: float, skip: str = "") -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for address in self.cluster.coordinator_addresses:
                if address == skip:
                    continue
                try:
                    with self.cluster.client(targets=[address], retry_deadline=0) as client:
                        states = {n.name: n.state for n in client.list_nodes()}
                except Exception:  # a replica whose etcd is away may refuse: not a node's state
                    self.unanswered += 1
                    continue
                self.answers += 1
                assert states == dict.fromkeys(NODES, "up"), f"{address} after {self.answers} answers: {states}"
            time.sleep(POLL_S)

    def no_down_logged(self) -> None:
        for address in self.cluster.coordinator_addresses:
            log = self.cluster.coordinator(address).process.log_path.read_text(errors="replace")
            assert "marked down" not in log, address


def test_etcd_leader_changes_mark_no_node_down(cluster: LocalCluster, etcd3: EtcdCluster) -> None:
    w = Watcher(cluster)
    w.watch(NODE_TTL_S)
    # Killed, then paused past its election timeout: two leader changes, each watched for 3 TTLs.
    leader = etcd3.leader()
    etcd3.kill(leader)
    w.watch(3 * NODE_TTL_S)
    etcd3.restart(leader)
    etcd3.wait_healthy(30)
    leader = etcd3.leader()
    etcd3.pause(leader)
    try:
        w.watch(max(3 * NODE_TTL_S, 3 * ELECTION_TIMEOUT_MS / 1000))
    finally:
        etcd3.resume(leader)
    etcd3.wait_healthy(30)
    w.watch(2 * NODE_TTL_S)
    w.no_down_logged()
    assert w.answers >= 100, (w.answers, w.unanswered)


def test_a_coordinator_restart_marks_no_node_down(cluster: LocalCluster) -> None:
    w = Watcher(cluster)
    first = cluster.coordinator_addresses[0]
    port = int(first.rsplit(":", 1)[1])
    cluster.coordinator(first).process.kill()  # SIGKILL, then started again in place
    w.watch(3 * NODE_TTL_S, skip=first)
    cluster.add_coordinator(port)
    w.watch(3 * NODE_TTL_S)
    # And the other one, now that agents of the first came back to it or stayed on the second.
    second = cluster.coordinator_addresses[1]
    cluster.coordinator(second).process.kill()
    w.watch(3 * NODE_TTL_S, skip=second)
    w.no_down_logged()
    assert w.answers >= 100, (w.answers, w.unanswered)
