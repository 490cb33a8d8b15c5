"""Agent faults against the real test dockerd (issue 17): an agent killed with SIGKILL over and over
while its containers run, an agent cut off from the coordinator for longer than its allocations'
TTL, and a paused client that comes back with a stale fencing token.

Agents report simulated GPUs and run their containers on the session's dockerd
(tests/support/dockerd.py); the coordinator is a real process on the session's etcd.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from gpulease.client import Client
from gpulease.dev import procs
from gpulease.dev.cluster import LocalCluster
from gpulease.errors import AllocationNotFound, GpuLeaseError, InsufficientResources, StaleFencingToken
from gpulease.v1 import agent_pb2, agent_pb2_grpc
from gpulease.v1 import types_pb2 as tpb
from tests.faults import b2_support as b2
from tests.faults.history import History
from tests.support import harness
from tests.support.dockerd import Dockerd
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.slow

# Short enough that an expiry and a partition fit a default run; the enforcement interval is the
# agent's own setting, passed to every agent here, and part of the promised bound.
TTL = 10
INTERVAL = 1.0


@pytest.fixture
def coordinator(start_coordinator: Callable[..., harness.Coordinator]) -> harness.Coordinator:
    # Quick heartbeats (the enforcer's allocations revision follows them); the node TTL stays the
    # harness's long one, so a node is never down during these scenarios unless a test says so.
    return start_coordinator(heartbeat=1)


@pytest.fixture
def docker(dockerd: Dockerd, busybox: str) -> Iterator[Any]:
    client = dockerd.client()
    try:
        yield client
    finally:
        client.close()


def start_agent(cluster: LocalCluster, dockerd: Dockerd, name: str, gpus: int, coordinator: str, *extra: str,
                **kw: Any) -> Any:  # fmt: skip
    return dockerd.add_agent(cluster, name, gpus, "--enforce-interval-seconds", str(INTERVAL), *extra,
                             coordinator=coordinator, **kw)  # fmt: skip


def node_containers(docker: Any, node: str) -> list[b2.ContainerState]:
    return b2.containers(docker, f"io.gpulease.node={node}")


def one_gpu(history: History, process: str, c: Client) -> Any:
    """The scenarios' allocation: one GPU, the smallest share of the node, the module's TTL (recorded)."""
    return b2.recorded_allocate(history, process, c, gpus=1, cpus=1, memory="64MiB", ttl=TTL)


def expired(client: Client, alloc_id: str) -> bool:
    try:
        client.get_allocation(alloc_id)
    except AllocationNotFound:
        return True
    return False


# -- kill -9 loop ----------------------------------------------------------------------------


def test_agent_killed_repeatedly_leaves_its_containers_alone_and_still_enforces_ends(
    local_cluster: LocalCluster,
    coordinator: harness.Coordinator,
    dockerd: Dockerd,
    busybox: str,
    docker: Any,
    etcd: harness.Etcd,
) -> None:
    rng = b2.seeded("agent kill loop")
    history = History()
    kills = 30 if b2.long_run() else 10
    node = "kill9"
    port = procs.free_port()
    start_agent(local_cluster, dockerd, node, 3, coordinator.address, port=port)
    harness.wait_nodes_up(coordinator.stub, {node})
    with local_cluster.client() as c, b2.KeepAlives(c, period=TTL / 3, history=history) as keep:
        allocs = [b2.recorded_allocate(history, f"holder{i}", c, gpus=1, cpus=1, memory="64MiB", ttl=TTL)
                  for i in range(2)]  # fmt: skip
        for a in allocs:
            keep.add(a.id)
        started = {a.id: c.run_container(a.id, busybox, b2.TRAPPING).id for a in allocs}
        before = {a: b2.inspect(docker, cid) for a, cid in started.items()}
        assert all(s.running for s in before.values()), before

        def unchanged(when: str) -> None:
            now = node_containers(docker, node)
            by_alloc: dict[str, list[b2.ContainerState]] = {}
            for s in now:
                by_alloc.setdefault(s.allocation, []).append(s)
            for alloc_id, was in before.items():
                seen = by_alloc.get(alloc_id, [])
                assert [s.id for s in seen] == [was.id], f"{when}: containers of {alloc_id}: {seen}"
                s = seen[0]
                assert s.running, f"{when}: {s.id[:12]} of {alloc_id} is not running: {s}"
                assert (s.restart_count, s.started_at) == (was.restart_count, was.started_at), f"{when}: {s} vs {was}"
            assert set(by_alloc) <= set(before), f"{when}: unexpected containers {by_alloc}"

        agent = local_cluster.agents[node]
        phases = []
        for i in range(kills):
            started_at = time.monotonic()
            # Anywhere from mid-start (registering, reconciling) to well after it settled.
            time.sleep(rng.uniform(0.2, 6.0))
            agent.process.kill()
            phases.append(round(time.monotonic() - started_at, 2))
            unchanged(f"after kill {i + 1}")
            start_agent(local_cluster, dockerd, node, 3, coordinator.address, port=port, wait=False)
            agent = local_cluster.agents[node]
        print(f"killed {kills} times, at {phases} s after each (re)start")
        local_cluster.wait_agent(node)
        harness.wait_nodes_up(coordinator.stub, {node}, timeout=30)
        time.sleep(3 * INTERVAL + 1)  # several enforcement checks of the last agent
        unchanged("after the last restart")
        assert not keep.errors or all("Unavailable" in e for e in keep.errors), keep.errors
        for a in allocs:
            assert c.get_allocation(a.id).id == a.id  # the kill loop ended nothing

        # An allocation released while the agent is dead: the restarted agent stops its container
        # within TTL + the enforcement interval of the release.
        released, lapsing = allocs
        local_cluster.agents[node].process.kill()
        keep.drop(released.id)
        assert b2.recorded_release(history, "holder0", c, released.id)
        released_at = time.time()
        start_agent(local_cluster, dockerd, node, 3, coordinator.address, port=port, wait=False)
        stopped = b2.wait_for(lambda: (s := b2.inspect(docker, started[released.id])).finished_at and s,
                              TTL + INTERVAL + 30, "the released allocation's container stopped")  # fmt: skip
        assert stopped.finished_at - released_at <= TTL + INTERVAL, (
            f"container {stopped.id[:12]} outlived its released allocation by {stopped.finished_at - released_at:.1f}s"
        )
        local_cluster.wait_agent(node)

        # An allocation whose lease lapses while the agent is dead: stopped within TTL + the interval
        # of the moment it lapsed (no earlier than its last renewal + TTL).
        local_cluster.agents[node].process.kill()
        last_renewal = keep.drop(lapsing.id)
        b2.wait_for(lambda: expired(c, lapsing.id), 2 * TTL, "the lease to lapse")
        start_agent(local_cluster, dockerd, node, 3, coordinator.address, port=port, wait=False)
        stopped = b2.wait_for(lambda: (s := b2.inspect(docker, started[lapsing.id])).finished_at and s,
                              TTL + INTERVAL + 30, "the lapsed allocation's container stopped")  # fmt: skip
        lapsed_no_earlier = last_renewal + TTL
        assert stopped.finished_at - lapsed_no_earlier <= TTL + INTERVAL, (
            f"container {stopped.id[:12]} outlived its expired allocation by "
            f"{stopped.finished_at - lapsed_no_earlier:.1f}s"
        )
        local_cluster.wait_agent(node)
        # Still exactly one container per allocation, never restarted.
        for alloc_id, was in before.items():
            seen = [s for s in node_containers(docker, node) if s.allocation == alloc_id]
            assert [(s.id, s.restart_count) for s in seen] == [(was.id, 0)], seen
    b2.check_history(history, [etcd.url], local_cluster.prefix or "", expired={lapsing.id})


# -- partition -------------------------------------------------------------------------------


def test_partitioned_agent_stops_its_containers_before_their_gpus_are_granted_again(
    local_cluster: LocalCluster,
    coordinator: harness.Coordinator,
    dockerd: Dockerd,
    busybox: str,
    docker: Any,
    etcd: harness.Etcd,
) -> None:
    rng = b2.seeded("agent partition")
    history = History()
    node = "cutoff"
    host, cport = coordinator.address.rsplit(":", 1)
    # Both directions go through proxies: the agent's calls to the coordinator, and the
    # coordinator's calls to the agent (its advertised address).
    agent_port = procs.free_port()
    to_coordinator = TcpProxy(host, int(cport))
    to_agent = TcpProxy("127.0.0.1", agent_port)
    with b2.closing_all(to_coordinator.close, to_agent.close):
        start_agent(local_cluster, dockerd, node, 2, f"127.0.0.1:{to_coordinator.port}",
                    "--advertise", f"127.0.0.1:{to_agent.port}", port=agent_port)  # fmt: skip
        harness.wait_nodes_up(coordinator.stub, {node})
        with local_cluster.client() as c, b2.KeepAlives(c, TTL / 3, history, "cut-host") as held, \
                b2.KeepAlives(c, TTL / 3, history, "elsewhere") as kept:  # fmt: skip
            # `cut` is the holder on the partitioned host itself (a job launched there): its
            # renewals stop with the partition. `other` is renewed from elsewhere throughout.
            cut = one_gpu(history, "cut-host", c)
            other = one_gpu(history, "elsewhere", c)
            held.add(cut.id)
            kept.add(other.id)
            cut_ct = c.run_container(cut.id, busybox, b2.TRAPPING).id
            other_ct = c.run_container(other.id, busybox, b2.TRAPPING).id
            with pytest.raises(InsufficientResources):
                one_gpu(history, "next", c)

            # The partition starts at a random point of the holder's renewal cycle.
            b2.wait_for(lambda: time.time() - held.acked[cut.id] < 0.3, TTL, "a renewal")
            time.sleep(rng.uniform(0.05, 0.95) * TTL / 3)
            to_coordinator.refuse()
            to_agent.refuse()
            cut_at = time.time()
            last_renewal = held.drop(cut.id)
            print(f"partition at +{cut_at - last_renewal:.2f}s after the holder's last renewal")

            # Someone else asks for the GPU until it is granted (bounded). Its GPU drains (issue 17,
            # coordinator/draining.py): it is not granted again before the agent has told a coordinator
            # that its container stopped, so the partition is lifted once the agent stopped it (the
            # agent cannot be told anything before that either way).
            granted = None
            stopped = None
            deadline = time.monotonic() + 4 * TTL + 10
            while granted is None and time.monotonic() < deadline:
                if stopped is None and (state := b2.inspect(docker, cut_ct)).finished_at:
                    stopped = state
                    to_coordinator.allow()
                    to_agent.allow()
                try:
                    granted = one_gpu(history, "next", c)
                except InsufficientResources:
                    time.sleep(0.1)
            granted_at = time.time()
            assert granted is not None, "the cut holder's GPU was never granted again"
            assert stopped is not None, "granted again while the partitioned agent's container still ran"
            assert granted.node == node and [g.uuid for g in granted.gpus] == [g.uuid for g in cut.gpus]
            print(f"container stopped at +{stopped.finished_at - cut_at:.2f}s, GPU granted again at "
                  f"+{granted_at - cut_at:.2f}s (created +{granted.info.created_unix_ms / 1000 - cut_at:.2f}s), "
                  f"after the partition")  # fmt: skip
            assert stopped.finished_at < granted.info.created_unix_ms / 1000, (
                f"the GPU was granted again {stopped.finished_at - granted_at:.2f}s before the partitioned agent "
                f"stopped the container of the allocation that held it"
            )
            # The allocation renewed from elsewhere is still live, but the agent could not vouch for
            # it either: its container stopped within TTL + the interval of the partition.
            other_state = b2.wait_for(lambda: (s := b2.inspect(docker, other_ct)).finished_at and s,
                                      2 * TTL + 10, "the other container stopped")  # fmt: skip
            assert other_state.finished_at - cut_at <= TTL + INTERVAL + 1, other_state
            assert c.get_allocation(other.id).id == other.id

            to_coordinator.allow()
            to_agent.allow()
            harness.wait_nodes_up(coordinator.stub, {node}, timeout=30)
            b2.recorded_release(history, "next", c, granted.id)
            kept.drop(other.id)
            b2.recorded_release(history, "elsewhere", c, other.id)
    b2.check_history(history, [etcd.url], local_cluster.prefix or "", expired={cut.id})


# -- a node marked down that comes back (issue 18) -------------------------------------------


def test_a_node_marked_down_comes_back_and_stops_what_ended_while_it_was_away(
    local_cluster: LocalCluster,
    start_coordinator: Callable[..., harness.Coordinator],
    dockerd: Dockerd,
    busybox: str,
    docker: Any,
    etcd: harness.Etcd,
) -> None:
    """The agent is SIGSTOPped until its node is marked down (node TTL 4 s), its allocation is
    released meanwhile, and the agent resumes: the node comes back UP through a heartbeat, the
    container of the ended allocation is stopped (the enforcer's etcd read says it ended), and its
    GPU is granted again only after that. A container of an allocation still live keeps running."""
    history = History()
    node = "sleeper"
    coordinator = start_coordinator(node_ttl=4, heartbeat=1)
    agent = start_agent(local_cluster, dockerd, node, 2, coordinator.address)
    harness.wait_nodes_up(coordinator.stub, {node})
    with local_cluster.client() as c, b2.KeepAlives(c, TTL / 3, history, "holder") as kept:
        ended = one_gpu(history, "holder", c)
        live = one_gpu(history, "holder", c)
        kept.add(ended.id)
        kept.add(live.id)
        ended_ct = c.run_container(ended.id, busybox, b2.TRAPPING).id
        live_ct = c.run_container(live.id, busybox, b2.TRAPPING).id
        pid = agent.process.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            b2.wait_for(lambda: harness.node_states(coordinator.stub)[node] == tpb.NODE_STATE_DOWN, 4 + 5,
                        "the stopped agent's node down")  # fmt: skip
            kept.drop(ended.id)
            assert b2.recorded_release(history, "holder", c, ended.id)
            # Nobody could stop the container yet: it runs, and its GPU is not free.
            assert not b2.inspect(docker, ended_ct).finished_at
        finally:
            os.kill(pid, signal.SIGCONT)
        harness.wait_nodes_up(coordinator.stub, {node}, timeout=10)
        stopped = b2.wait_for(lambda: (s := b2.inspect(docker, ended_ct)).finished_at and s, 10,
                              "the ended allocation's container stopped")  # fmt: skip
        granted = b2.wait_for(lambda: _try_allocate(history, c), 10, "the drained GPU granted again")
        assert [g.uuid for g in granted.gpus] == [g.uuid for g in ended.gpus]
        assert stopped.finished_at < granted.info.created_unix_ms / 1000
        assert not b2.inspect(docker, live_ct).finished_at, "the live allocation's container was stopped"
        kept.drop(live.id)
        b2.recorded_release(history, "holder", c, live.id)
        b2.recorded_release(history, "holder", c, granted.id)
    b2.check_history(history, [etcd.url], local_cluster.prefix or "")


def _try_allocate(history: History, c: Client) -> Any:
    try:
        return one_gpu(history, "next", c)
    except InsufficientResources:
        return None


# -- stale fencing token ---------------------------------------------------------------------


def test_paused_client_with_a_stale_token_cannot_start_a_container(
    local_cluster: LocalCluster,
    coordinator: harness.Coordinator,
    dockerd: Dockerd,
    busybox: str,
    docker: Any,
    etcd: harness.Etcd,
) -> None:
    history = History()
    node = "fenced"
    agent = start_agent(local_cluster, dockerd, node, 1, coordinator.address)
    harness.wait_nodes_up(coordinator.stub, {node})
    with local_cluster.client() as c:
        paused = b2.recorded_allocate(history, "paused", c, gpus=1, cpus=1, memory="64MiB", ttl=5)
        # The holder pauses (no renewal); its lease lapses and the GPU goes to someone else.
        b2.wait_for(lambda: expired(c, paused.id), 15, "the paused holder's lease to lapse")
        new = b2.recorded_allocate(history, "new", c, gpus=1, cpus=1, memory="64MiB", ttl=60)
        assert [g.uuid for g in new.gpus] == [g.uuid for g in paused.gpus]
        assert new.revision > paused.revision
        running = c.run_container(new.id, busybox, b2.TRAPPING)

        # The paused client resumes and asks for a container on its old allocation.
        with pytest.raises(GpuLeaseError) as refused:
            c.run_container(paused.id, busybox, b2.TRAPPING)
        assert isinstance(refused.value, (AllocationNotFound, StaleFencingToken)), refused.value
        assert paused.id in refused.value.message, refused.value.message

        # Straight to the agent with its old token, as a replica with a stale view would forward it.
        with grpc.insecure_channel(agent.address) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            spec = tpb.ContainerSpec(image=busybox, command=b2.TRAPPING)
            for alloc_id, revision, words in (
                (paused.id, paused.revision, "not live"),  # its own ended allocation
                (new.id, paused.revision, f"carries revision {paused.revision}"),  # the new holder's, old token
            ):
                with pytest.raises(grpc.RpcError) as err:
                    stub.StartContainer(agent_pb2.StartContainerRequest(
                        allocation_id=alloc_id, revision=revision, spec=spec), timeout=60)  # fmt: skip
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value
                assert StaleFencingToken.reason in dict(err.value.trailing_metadata() or ()).values()
                assert "stale fencing token" in (err.value.details() or "") and words in (err.value.details() or "")

        time.sleep(2 * INTERVAL)  # an enforcement check in between: nothing changes
        live = [s for s in node_containers(docker, node) if s.running]
        assert [(s.id, s.allocation) for s in live] == [(running.id, new.id)], live
        assert [s for s in node_containers(docker, node) if s.allocation == paused.id] == []
        per_gpu: dict[str, int] = {}
        for s in live:
            for uuid in s.gpu_uuids:
                per_gpu[uuid] = per_gpu.get(uuid, 0) + 1
        assert per_gpu == {new.gpus[0].uuid: 1}, per_gpu
        b2.recorded_release(history, "new", c, new.id)
    b2.check_history(history, [etcd.url], local_cluster.prefix or "", expired={paused.id})
