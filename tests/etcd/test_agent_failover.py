"""An agent given every coordinator replica keeps its node up when the one it reports to dies (issue 17).

Real processes: etcd, two coordinators with short node leases (TTL 6 s, heartbeats every 2 s) and
agents with simulated GPUs, started by LocalCluster, which gives each agent every coordinator of
the cluster unless told one. The replica the agent heartbeats to (the first of its list) is
SIGKILLed; for three node TTLs after that the surviving replica must list the node UP at every
poll, and etcd must hold the node's `alive/` key at every poll (a node marked down loses it). The
key ends on the survivor's session lease (coordinator/liveness.py): the same lease as a node that
heartbeated to the survivor all along, so the heartbeats landed there.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from gpulease.dev.cluster import LocalCluster
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import types_pb2 as tpb
from tests.support import harness

NODE_TTL_S = 6
HEARTBEAT_S = 2
# How long the node must stay up after its coordinator died, and how often it is looked at.
WATCH_S = 3 * NODE_TTL_S
POLL_S = 0.5

pytestmark = pytest.mark.slow


def watch_nodes_stay_up(cluster: LocalCluster, survivor: str, etcd_url: str, prefix: str, nodes: list[str]) -> int:
    """For WATCH_S: every node UP at each poll of the survivor, and its alive/ key in etcd at each
    poll. Returns the lease all their keys hang on at the end (one: the survivor's session)."""
    channel = cluster.channel(survivor)
    try:
        stub = harness.AnyService(channel)
        polls = 0
        deadline = time.monotonic() + WATCH_S
        while time.monotonic() < deadline:
            states = {n.name: n.state for n in stub.ListNodes(pb.ListNodesRequest(), timeout=5).nodes}
            assert states == dict.fromkeys(nodes, tpb.NODE_STATE_UP), f"after {polls} polls: {states}"
            leases = harness.alive_leases(etcd_url, prefix, nodes)
            assert None not in leases.values(), f"after {polls} polls: {leases}"
            polls += 1
            time.sleep(POLL_S)
    finally:
        channel.close()
    assert polls >= WATCH_S  # looked at often enough (each poll also reads etcd)
    [session] = set(harness.alive_leases(etcd_url, prefix, nodes).values())
    assert session
    return session


def switch_lines(cluster: LocalCluster, agent: str) -> list[str]:
    log = cluster.agents[agent].process.log_path.read_text(errors="replace")
    return [line for line in log.splitlines() if " unreachable (" in line and " now go to " in line]


def test_the_node_stays_up_when_the_coordinator_it_heartbeats_to_is_killed(
    local_cluster: LocalCluster, etcd: harness.Etcd, prefix: str
) -> None:
    first = local_cluster.add_coordinator(node_ttl=NODE_TTL_S, heartbeat_interval=HEARTBEAT_S)
    survivor = local_cluster.add_coordinator(node_ttl=NODE_TTL_S, heartbeat_interval=HEARTBEAT_S)
    # Every coordinator, the first one first (LocalCluster's default); and one listing the survivor first.
    local_cluster.add_agent("steady", 1, cpus=4, memory="8GiB")
    local_cluster.add_agent("other", 1, cpus=4, memory="8GiB", coordinator=f"{survivor.address},{first.address}")
    nodes = ["other", "steady"]
    local_cluster.wait_nodes_up(nodes)
    leases = harness.alive_leases(etcd.url, prefix, nodes)
    assert all(leases.values()), leases
    # Nothing has failed over yet: "steady" heartbeats to the first coordinator, "other" to the survivor.
    assert switch_lines(local_cluster, "steady") == [] and switch_lines(local_cluster, "other") == []

    # Each on the session of the replica it heartbeats to.
    assert leases["steady"] != leases["other"]
    local_cluster.coordinator(first.address).process.kill()  # SIGKILL: no goodbye to anyone

    # Both on the survivor's session, which "other" was on all along.
    assert watch_nodes_stay_up(local_cluster, survivor.address, etcd.url, prefix, nodes) == leases["other"]

    # One switch, logged once, by the agent whose coordinator died; none by the other.
    [line] = switch_lines(local_cluster, "steady")
    assert f"coordinator {first.address} unreachable (" in line and line.endswith(f"now go to {survivor.address}")
    assert switch_lines(local_cluster, "other") == []
    assert local_cluster.agents["steady"].process.alive() and local_cluster.agents["other"].process.alive()


def test_the_node_stays_up_when_the_coordinator_it_heartbeats_to_hangs(
    local_cluster: LocalCluster, etcd: harness.Etcd, prefix: str
) -> None:
    # A replica that holds connections open but never answers (SIGSTOP): the heartbeat's deadline
    # (one interval) is what sends the agent to the next address, still within the node's TTL.
    hung = local_cluster.add_coordinator(node_ttl=NODE_TTL_S, heartbeat_interval=HEARTBEAT_S)
    survivor = local_cluster.add_coordinator(node_ttl=NODE_TTL_S, heartbeat_interval=HEARTBEAT_S)
    local_cluster.add_agent("steady", 1, cpus=4, memory="8GiB")
    local_cluster.wait_nodes_up(["steady"])
    leases = harness.alive_leases(etcd.url, prefix, ["steady"])
    assert leases["steady"] and switch_lines(local_cluster, "steady") == []
    pid = local_cluster.coordinator(hung.address).process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        moved_to = watch_nodes_stay_up(local_cluster, survivor.address, etcd.url, prefix, ["steady"])
    finally:
        os.kill(pid, signal.SIGCONT)  # so that the cluster's stop ends it as any other
    assert moved_to != leases["steady"]  # from the hung replica's session to the survivor's
    [line] = switch_lines(local_cluster, "steady")
    assert f"coordinator {hung.address} unreachable (DEADLINE_EXCEEDED" in line, line
    assert line.endswith(f"now go to {survivor.address}")


def test_an_agent_given_a_malformed_coordinator_list_exits_2_naming_the_address(
    local_cluster: LocalCluster,
) -> None:
    first = local_cluster.add_coordinator()
    child = local_cluster.add_agent("typo", 1, coordinator=f"{first.address},coordinator-2", wait=False)
    status = child.process.popen.wait(timeout=60)
    assert status == 2
    log = child.process.log_path.read_text(errors="replace")
    assert "gpulease-agent: coordinator: 'coordinator-2' is not HOST:PORT" in log, log
    with local_cluster.client() as client:
        assert [n.name for n in client.list_nodes()] == []  # it never registered anywhere
