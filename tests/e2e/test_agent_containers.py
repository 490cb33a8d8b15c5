"""The agent's container side against a real coordinator and etcd, with an in-memory runtime.

Fencing (GetAllocation before anything is created), enforcement (release, lease expiry and a
coordinator outage stop containers in bounded time), restart reconciliation (adopt what is
live, stop the rest, offer no GPUs meanwhile), the inventory context and the gRPC surface.
The end-to-end test with a real dockerd and agent process is at the bottom.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from gpulease.agent.container_spec import validate_spec
from gpulease.agent.containers import ReadyGate
from gpulease.agent.inventory.simulated import SimulatedInventory
from gpulease.agent.reconcile import Reconciler
from gpulease.agent.registration import AgentInventory, Registrar
from gpulease.agent.runtime import ContainerRuntime
from gpulease.agent.server import start_server
from gpulease.common.container_policy import ContainerPolicy
from gpulease.coordinator.liveness import TICK_S
from gpulease.coordinator.store import Store
from gpulease.dev import procs
from gpulease.dev.cluster import LocalCluster
from gpulease.errors import InvalidRequest, PermissionDenied, StaleFencingToken, Unavailable
from gpulease.v1 import agent_pb2, agent_pb2_grpc
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import types_pb2 as tpb
from tests.support import harness
from tests.support.agent_cluster import (
    GRACE,
    INTERVAL,
    NODE,
    OTHER,
    Cluster,
    GiB,
    agent,
    eventually,
    heartbeat,
    register_again,
    spec,
)
from tests.support.agent_cluster import cluster as cluster  # the fixture: NODE and OTHER registered
from tests.support.dockerd import Dockerd
from tests.support.fake_runtime import FakeRuntime


class TcpProxy:
    """A TCP forwarder the test can cut (every connection dropped, new ones refused) and restore."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self.port = procs.free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)
        return self

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


# -- validation (no cluster) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"image": ""}, "image is required"),
        ({"image": "x" * 513}, "image is too long"),
        ({"image": "a b"}, "must not contain spaces"),
        ({"env": {f"K{i}": "v" for i in range(257)}}, "at most 256"),
        ({"env": {"1BAD": "v"}}, "env name '1BAD' is invalid"),
        ({"working_dir": "relative/dir"}, "must be an absolute path"),
        ({"volumes": [tpb.VolumeMount(source="/data", target="rel")]}, "must be an absolute path other than /"),
        ({"volumes": [tpb.VolumeMount(source="/a:b", target="/data")]}, "must not contain ':'"),
        ({"shm_size_bytes": -1}, "shm_size_bytes"),
        ({"name": "-bad"}, "container name '-bad' is invalid"),
        ({"command": ["a\x00b"]}, "NUL"),
    ],
)
def test_spec_validation_names_the_problem(bad: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        validate_spec(spec(**bad))
    assert message in e.value.message


# -- fencing ------------------------------------------------------------------------------------


async def test_stale_token_is_refused_and_nothing_is_created(cluster: Cluster) -> None:
    alloc = await cluster.allocate()
    runtime = FakeRuntime()
    async with agent(cluster.address, runtime) as a:
        for bad in (alloc.revision + 1, alloc.revision - 1):
            with pytest.raises(StaleFencingToken) as e:
                await a.containers.start(alloc.id, bad, spec())
            assert f"request carries revision {bad}" in e.value.message
            assert f"live allocation has revision {alloc.revision}" in e.value.message
        # Released: absent is stale too.
        await cluster.release(alloc.id)
        with pytest.raises(StaleFencingToken, match="not live"):
            await a.containers.start(alloc.id, alloc.revision, spec())
    # Refused before the pull, too: a stale token costs no download.
    assert runtime.launches == [] and runtime.calls == []


async def test_allocation_of_another_node_is_refused(cluster: Cluster) -> None:
    alloc = await cluster.allocate(node=OTHER)
    runtime = FakeRuntime()
    async with agent(cluster.address, runtime, node=NODE) as a:
        with pytest.raises(StaleFencingToken) as e:
            await a.containers.start(alloc.id, alloc.revision, spec())
    assert f"is on node '{OTHER}', not on this node '{NODE}'" in e.value.message
    assert runtime.launches == []


async def test_unreachable_coordinator_means_no_start() -> None:
    runtime = FakeRuntime()
    async with agent(f"127.0.0.1:{procs.free_port()}", runtime) as a:
        with pytest.raises(Unavailable, match="no container is started"):
            await a.containers.start("0123456789abcdef01234", 7, spec())
    assert runtime.launches == []


async def test_resources_come_from_the_allocation_record(cluster: Cluster, tmp_path: Path) -> None:
    alloc = await cluster.allocate(gpus=2, cpus=6)
    runtime = FakeRuntime()
    data = str(tmp_path)
    policy = ContainerPolicy(bind_allowlist=(data,))
    async with agent(cluster.address, runtime, inventory=cluster.inventories[NODE], policy=policy) as a:
        status = await a.containers.start(
            alloc.id,
            alloc.revision,
            spec(
                env={"A": "1"},
                working_dir="/w",
                shm_size_bytes=GiB,
                volumes=[tpb.VolumeMount(source=data, target="/d", read_only=True)],
            ),
        )
        # Reserved variables are refused before the coordinator is even asked.
        with pytest.raises(InvalidRequest, match="CUDA_VISIBLE_DEVICES"):
            await a.containers.start(alloc.id, alloc.revision, spec(env={"CUDA_VISIBLE_DEVICES": "0"}))
    (launch,) = runtime.launches
    assert launch.gpu_indexes == tuple(g.index for g in alloc.gpus) and len(launch.gpu_indexes) == 2
    assert launch.gpu_uuids == tuple(g.uuid for g in alloc.gpus)
    assert (launch.cpus, launch.memory_bytes) == (6, 8 * GiB)
    assert launch.revision == alloc.revision and launch.node == NODE
    # GPUs 0 and 1 sit on CPUs 0-7 (see node_inventory): at least the 6 CPUs allocated.
    assert sorted(launch.gpu_indexes) == [0, 1] and launch.cpuset == "0-7"
    assert launch.network == "gpulease-test"
    assert launch.name.startswith(f"gpulease-{alloc.id}-")
    assert dict(launch.env) == {"A": "1"} and launch.working_dir == "/w" and launch.shm_size_bytes == GiB
    assert [(v.source, v.target, v.read_only) for v in launch.volumes] == [(data, "/d", True)]
    assert status.state == tpb.CONTAINER_STATE_RUNNING and status.node == NODE
    assert list(status.gpu_indexes) == [0, 1] and status.revision == alloc.revision


# -- enforcement --------------------------------------------------------------------------------


async def test_release_stops_the_container_within_the_budget(cluster: Cluster) -> None:
    alloc = await cluster.allocate()
    keep = await cluster.allocate()
    runtime = FakeRuntime()
    async with agent(cluster.address, runtime) as a:
        # Traps SIGTERM: needs the whole grace and a SIGKILL.
        doomed = await a.containers.start(alloc.id, alloc.revision, spec(env={"IGNORE_SIGTERM": "1"}))
        kept = await a.containers.start(keep.id, keep.revision, spec())
        a.start_enforcer()
        await asyncio.sleep(0.5)
        await cluster.release(alloc.id)
        released_at = time.monotonic()
        await eventually(lambda: runtime.info(doomed.container_id).state == "exited", 6, "the container stopped")
        took = time.monotonic() - released_at
        assert took <= INTERVAL + GRACE + 1.5, took
        status = await a.containers.get(tpb.ContainerRef(container_id=doomed.container_id))
        assert status.exit_code == 137 and "no longer live" in status.error
        assert runtime.containers[doomed.container_id].stops == [GRACE]
        # The other allocation's container is untouched.
        await asyncio.sleep(INTERVAL + 0.5)
        assert runtime.info(kept.container_id).state == "running"


async def test_exited_containers_of_ended_allocations_are_removed_after_retention(cluster: Cluster) -> None:
    ended, live = await cluster.allocate(), await cluster.allocate()
    runtime = FakeRuntime()
    async with agent(cluster.address, runtime, retention=0.5) as a:
        old = (await a.containers.start(ended.id, ended.revision, spec())).container_id
        done = (await a.containers.start(live.id, live.revision, spec())).container_id
        runtime.finish(old, 0)
        runtime.finish(done, 3)
        await cluster.release(ended.id)
        first = await a.enforcer.tick()  # finished just now: kept for its logs and exit code
        assert first.contacted and first.removed == [] and old in runtime.containers
        await asyncio.sleep(0.6)
        second = await a.enforcer.tick()
        assert [c.id for c in second.removed] == [old] and old not in runtime.containers
        # An exited container of a live allocation stays, however old: its holder may still ask.
        assert runtime.info(done).exit_code == 3
        assert [c.id for c in runtime.list()] == [done]


async def test_nothing_is_removed_while_the_coordinator_is_unreachable(cluster: Cluster) -> None:
    proxy = await TcpProxy(cluster.address).start()
    alloc = await cluster.allocate()
    runtime = FakeRuntime()
    try:
        async with agent(proxy.address, runtime, retention=0.0) as a:
            container = (await a.containers.start(alloc.id, alloc.revision, spec())).container_id
            runtime.finish(container, 0)
            await proxy.cut()
            await cluster.release(alloc.id)
            report = await a.enforcer.tick()  # no allocation list: the agent cannot tell it has ended
            assert not report.contacted and report.removed == [] and container in runtime.containers
    finally:
        await proxy.cut()


@pytest.mark.slow
async def test_lease_expiry_stops_the_container_within_ttl_plus_5s(cluster: Cluster) -> None:
    ttl = 5
    runtime = FakeRuntime()
    async with agent(cluster.address, runtime) as a:
        a.start_enforcer()
        asked = time.monotonic()
        alloc = await cluster.allocate(ttl=ttl)  # nobody keeps it alive
        status = await a.containers.start(alloc.id, alloc.revision, spec())
        await asyncio.sleep(max(0.0, ttl - 1.5 - (time.monotonic() - asked)))
        assert runtime.info(status.container_id).state == "running"  # not before the lease is gone
        await eventually(lambda: runtime.info(status.container_id).state == "exited", ttl + 6, "the container stopped")
        took = time.monotonic() - asked
        assert took <= ttl + 5, took
        assert not await cluster.is_live(alloc.id)


@pytest.mark.slow
async def test_coordinator_unreachable_longer_than_ttl_stops_the_container(cluster: Cluster) -> None:
    ttl = 6
    proxy = await TcpProxy(cluster.address).start()
    runtime = FakeRuntime()
    alloc = await cluster.allocate(ttl=ttl)

    async def keep_alive() -> None:  # the holder keeps the allocation live all along
        while True:
            await cluster.stub.KeepAlive(pb.KeepAliveRequest(allocation_id=alloc.id))
            await asyncio.sleep(1)

    keeper = asyncio.create_task(keep_alive())
    try:
        async with agent(proxy.address, runtime) as a:
            status = await a.containers.start(alloc.id, alloc.revision, spec())
            report = await a.enforcer.tick()
            assert report.contacted and [c.id for c in report.kept] == [status.container_id]
            a.start_enforcer()
            await proxy.cut()
            cut_at = time.monotonic()
            await asyncio.sleep(3)
            assert runtime.info(status.container_id).state == "running"  # an outage shorter than the TTL is fine
            await eventually(
                lambda: runtime.info(status.container_id).state == "exited", ttl + INTERVAL + GRACE + 3, "the stop"
            )
            assert time.monotonic() - cut_at >= ttl
            got = await a.containers.get(tpb.ContainerRef(container_id=status.container_id))
            assert "can no longer vouch" in got.error
            assert await cluster.is_live(alloc.id)  # it was the outage, not the allocation, that ended it
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        await proxy.cut()


async def test_enforcer_stops_a_container_started_under_another_revision(cluster: Cluster) -> None:
    alloc = await cluster.allocate()
    runtime = FakeRuntime()
    planted = runtime.plant(allocation_id=alloc.id, revision=alloc.revision - 1, node=NODE)
    async with agent(cluster.address, runtime) as a:
        report = await a.enforcer.tick()
    assert [v.container.id for v in report.stopped] == [planted]
    assert f"live at revision {alloc.revision}" in report.stopped[0].reason
    assert runtime.info(planted).state == "exited"


# -- restart reconciliation ---------------------------------------------------------------------


# -- allocations revision: heartbeats say when asking again is pointless --------------------------


async def test_heartbeat_revision_changes_exactly_when_the_nodes_allocations_do(
    cluster: Cluster, start_coordinator: Callable[..., harness.Coordinator]
) -> None:
    registered = await register_again(cluster)
    lease, first = registered.lease_id, registered.allocations_revision
    assert first > 0
    assert await heartbeat(cluster, NODE, lease) == first
    await cluster.allocate(node=OTHER)  # another node's allocation is not this node's news
    assert await heartbeat(cluster, NODE, lease) == first

    alloc = await cluster.allocate()
    assert await heartbeat(cluster, NODE, lease) == alloc.revision  # the creating transaction's revision
    assert await heartbeat(cluster, NODE, lease) == alloc.revision
    released = await cluster.stub.Release(pb.ReleaseRequest(allocation_id=alloc.id))
    assert released.released and await heartbeat(cluster, NODE, lease) == released.revision

    # Lease expiry is a change too: etcd deletes the keys, the watch brings the deletes.
    short = await cluster.allocate(ttl=5)
    assert await heartbeat(cluster, NODE, lease) == short.revision
    await eventually(lambda: _expired(cluster, short.id), 12, "the allocation's lease expired")
    after_expiry = await heartbeat(cluster, NODE, lease)
    assert after_expiry > short.revision

    # A fresh replica has not seen those events one by one: it answers its load revision, which
    # is never older than the last change, so an agent that switches replicas asks again, once.
    replica = start_coordinator()
    async with grpc.aio.insecure_channel(replica.address) as channel:
        stub = harness.AnyService(channel)
        fresh = (await stub.Heartbeat(pb.HeartbeatRequest(node=NODE, lease_id=lease))).allocations_revision
        assert fresh >= after_expiry
        again = (await stub.Heartbeat(pb.HeartbeatRequest(node=NODE, lease_id=lease))).allocations_revision
        assert again == fresh


async def _expired(cluster: Cluster, allocation_id: str) -> bool:
    return not await cluster.is_live(allocation_id)


async def test_heartbeat_revision_survives_writes_outside_the_prefix(
    cluster: Cluster, etcd: harness.Etcd, prefix: str
) -> None:
    """Writes outside the prefix (a shared etcd) move etcd's revision past anything the view's
    watch delivers; a marker put under the prefix proves the view has caught up anyway. A
    heartbeat vouches for the revision of the replica's last session renewal (coordinator/
    liveness.py: once a second), so the foreign write counts once a renewal has seen it."""
    lease = (await register_again(cluster)).lease_id
    before = await heartbeat(cluster, NODE, lease)
    assert before > 0
    store = Store([etcd.url])
    await store.start()
    try:
        foreign = await store.put("/someone-else/key", b"x")
        assert foreign > before
        await asyncio.sleep(2 * TICK_S + 0.5)  # a renewal has answered with etcd's revision since
        # Not 0 (what giving up after 1 s would send), and not fooled by the foreign write.
        assert await heartbeat(cluster, NODE, lease) == before
        marker = await store.get(f"{prefix}marker")
        assert marker is not None and marker.mod_revision > foreign
    finally:
        await store.close()
    alloc = await cluster.allocate()
    assert await heartbeat(cluster, NODE, lease) == alloc.revision


async def test_enforcer_asks_only_when_the_heartbeat_revision_changes(cluster: Cluster) -> None:
    lease = (await register_again(cluster)).lease_id
    runtime = FakeRuntime()
    async with agent(cluster.address, runtime) as a:

        async def beat(valid_for: float = 60.0) -> float:
            asked_at = time.monotonic()
            a.enforcer.note_allocations_revision(await heartbeat(cluster, NODE, lease), asked_at, valid_for)
            return asked_at

        alloc = await cluster.allocate()
        first = await a.containers.start(alloc.id, alloc.revision, spec())
        await beat()
        report = await a.enforcer.tick()
        assert report.contacted and a.enforcer.lists == 1 and [c.id for c in report.kept] == [first.container_id]

        # Nothing changed: the heartbeat vouches for the last answer, which counts as fresh news
        # from the moment that heartbeat was sent.
        listed = a.vouchers.get(alloc.id)
        assert listed is not None
        heard_at = await beat()
        report = await a.enforcer.tick()
        assert a.enforcer.lists == 1 and [c.id for c in report.kept] == [first.container_id]
        voucher = a.vouchers.get(alloc.id)
        assert voucher is not None and listed.confirmed_at < voucher.confirmed_at == heard_at

        # A container started since the last answer is judged only on a fresh answer.
        second_alloc = await cluster.allocate()
        second = await a.containers.start(second_alloc.id, second_alloc.revision, spec())
        report = await a.enforcer.tick()
        assert a.enforcer.lists == 2 and {c.id for c in report.kept} == {first.container_id, second.container_id}

        # Released, but no heartbeat has said so yet: the enforcer does not know.
        await beat()
        report = await a.enforcer.tick()  # the revision moved with second_alloc: asks once
        assert a.enforcer.lists == 3
        await cluster.release(alloc.id)
        report = await a.enforcer.tick()
        assert a.enforcer.lists == 3 and runtime.info(first.container_id).state == "running"
        # The next heartbeat carries the release: the enforcer asks, and stops the container.
        await beat()
        report = await a.enforcer.tick()
        assert a.enforcer.lists == 4
        assert [v.container.id for v in report.stopped] == [first.container_id]
        assert runtime.info(first.container_id).state == "exited"
        assert runtime.info(second.container_id).state == "running"

        # A heartbeat answer counts for a while only (missed heartbeats), and 0 means none.
        await beat(valid_for=0.0)
        await asyncio.sleep(0.01)
        await a.enforcer.tick()
        assert a.enforcer.lists == 5
        a.enforcer.note_allocations_revision(0, time.monotonic(), 60.0)
        await a.enforcer.tick()
        assert a.enforcer.lists == 6


async def test_a_changed_revision_wakes_the_enforcer_at_once(cluster: Cluster) -> None:
    lease = (await register_again(cluster)).lease_id
    runtime = FakeRuntime()
    async with agent(cluster.address, runtime, interval=30.0) as a:
        alloc = await cluster.allocate()
        started = await a.containers.start(alloc.id, alloc.revision, spec())
        a.enforcer.note_allocations_revision(await heartbeat(cluster, NODE, lease), time.monotonic(), 60)
        a.start_enforcer()
        await eventually(lambda: a.enforcer.lists == 1, 5, "the first check")
        await cluster.release(alloc.id)
        a.enforcer.note_allocations_revision(await heartbeat(cluster, NODE, lease), time.monotonic(), 60)
        # Long before the 30 s interval would have come round: the new revision woke it.
        await eventually(lambda: runtime.info(started.container_id).state == "exited", 5, "the container stopped")
        assert a.enforcer.lists == 2


async def test_registrar_hands_each_answers_revision_to_the_enforcer(cluster: Cluster) -> None:
    heard: list[tuple[int, float, float]] = []
    inventory = AgentInventory(SimulatedInventory("n3", 2, "m", cpus=4, memory_bytes=GiB), reconciling=lambda: False)
    async with grpc.aio.insecure_channel(cluster.address) as channel:
        reg = Registrar(node="n3", address="127.0.0.1:9", channel=channel, source=inventory,
                        on_allocations_revision=lambda *args: heard.append(args))  # fmt: skip
        before = time.monotonic()
        await reg.step()  # registers
        await reg.step()  # heartbeats
    assert len(heard) == 2
    assert heard[0][0] == heard[1][0] > 0  # nothing was allocated on n3 in between
    assert before <= heard[0][1] <= heard[1][1] <= time.monotonic()
    assert heard[1][2] == 2 * reg.interval  # counts until one heartbeat has been missed


async def test_reconcile_adopts_live_containers_and_stops_the_rest(cluster: Cluster) -> None:
    live = await cluster.allocate()
    gone = await cluster.allocate()
    runtime = FakeRuntime()  # Docker, which outlives the agent
    async with agent(cluster.address, runtime) as first:
        adopted = await first.containers.start(live.id, live.revision, spec())
        orphan = await first.containers.start(gone.id, gone.revision, spec())
    stale = runtime.plant(allocation_id=live.id, revision=live.revision + 1, node=NODE)
    await cluster.release(gone.id)
    launches_before = len(runtime.launches)

    async with agent(cluster.address, runtime, reconciling=True) as second:
        inventory = AgentInventory(SimulatedInventory(NODE, 4, "m"), reconciling=lambda: second.gate.reconciling)
        assert inventory.collect().reconciling
        report = await Reconciler(enforcer=second.enforcer, gate=second.gate).run()
        assert not second.gate.reconciling and not inventory.collect().reconciling

    assert [c.id for c in report.adopted] == [adopted.container_id]
    assert sorted(v.container.id for v in report.stopped) == sorted([orphan.container_id, stale])
    kept = runtime.info(adopted.container_id)
    assert kept.state == "running" and kept.restart_count == 0 and kept.started_unix_ms == adopted.started_unix_ms
    assert len(runtime.launches) == launches_before  # nothing started again, no duplicate
    assert [c.id for c in runtime.list(live.id) if c.state == "running"] == [adopted.container_id]
    assert runtime.info(orphan.container_id).state == "exited" and runtime.info(stale).state == "exited"


async def test_reconciling_until_the_coordinator_answers(cluster: Cluster) -> None:
    proxy = await TcpProxy(cluster.address).start()
    await proxy.cut()
    alloc = await cluster.allocate()
    runtime = FakeRuntime()
    planted = runtime.plant(allocation_id=alloc.id, revision=alloc.revision, node=NODE)
    done = asyncio.Event()

    async def on_done() -> None:
        done.set()

    try:
        async with agent(proxy.address, runtime, reconciling=True) as a:
            inventory = AgentInventory(SimulatedInventory(NODE, 4, "m"), reconciling=lambda: a.gate.reconciling)
            task = asyncio.create_task(Reconciler(enforcer=a.enforcer, gate=a.gate, on_done=on_done).run())
            a.tasks.append(task)
            await asyncio.sleep(2)
            assert a.gate.reconciling and inventory.collect().reconciling and not done.is_set()
            with pytest.raises(Unavailable, match="reconciling"):
                await a.containers.start(alloc.id, alloc.revision, spec())
            assert runtime.info(planted).state == "running"  # left alone while it cannot be judged
            await proxy.start()
            await asyncio.wait_for(done.wait(), 10)
            assert not inventory.collect().reconciling
            report = task.result()
            assert [c.id for c in report.adopted] == [planted] and report.attempts > 1
            # Starts are accepted again; the adopted container is the allocation's one running
            # container (issue 14), so a second waits until it has stopped.
            with pytest.raises(PermissionDenied, match="rule 'one-container'"):
                await a.containers.start(alloc.id, alloc.revision, spec())
            await a.containers.stop(tpb.ContainerRef(container_id=planted), 1)
            started = await a.containers.start(alloc.id, alloc.revision, spec())
            assert started.state == tpb.CONTAINER_STATE_RUNNING
    finally:
        await proxy.cut()


async def test_registrar_reports_ready_only_after_reconciliation(cluster: Cluster) -> None:
    gate = ReadyGate(reconciling=True)
    inventory = AgentInventory(
        SimulatedInventory("n3", 2, "m", cpus=4, memory_bytes=GiB), reconciling=lambda: gate.reconciling
    )
    ready: list[bool] = []

    async def on_ready() -> None:
        ready.append(True)

    async with grpc.aio.insecure_channel(cluster.address) as channel:
        reg = Registrar(node="n3", address="127.0.0.1:9", channel=channel, source=inventory, on_registered=on_ready)
        await reg.step()
        assert reg.lease_id is not None and ready == []  # registered, but still reconciling
        gate.open()
        await reg.step()  # the changed inventory (reconciling=false) goes out with this heartbeat
        assert ready == [True]
        nodes = (await cluster.stub.ListNodes(pb.ListNodesRequest())).nodes
        assert not next(n for n in nodes if n.name == "n3").inventory.reconciling


# -- inventory context --------------------------------------------------------------------------


async def test_inventory_source_gets_managed_pids_and_allocated_gpus(cluster: Cluster) -> None:
    alloc = await cluster.allocate(gpus=2)
    runtime = FakeRuntime()
    seen: list[Any] = []

    class ContextSource:
        def collect(self, context: Any = None) -> tpb.NodeInventory:
            seen.append(context)
            return tpb.NodeInventory()

    async with agent(cluster.address, runtime) as a:
        inventory = AgentInventory(ContextSource(), context=a.enforcer.inventory_context)
        status = await a.containers.start(alloc.id, alloc.revision, spec())
        expected = runtime.pids(status.container_id)
        await asyncio.to_thread(inventory.collect)  # at once, before the enforcer's next check
        report = await a.enforcer.tick()
        assert report.contacted
        runtime.finish(status.container_id)
        await asyncio.sleep(1.1)  # past the PID cache
        await a.enforcer.tick()
        await asyncio.to_thread(inventory.collect)
    first, second = seen
    assert first.managed_pids == expected and len(expected) == 2
    assert first.allocated_gpus == frozenset(g.index for g in alloc.gpus) and len(first.allocated_gpus) == 2
    assert second.managed_pids == frozenset()  # it exited
    assert second.allocated_gpus == first.allocated_gpus  # the allocation is still live


# -- the gRPC surface ---------------------------------------------------------------------------


def _reason(e: grpc.aio.AioRpcError) -> str:
    return str(dict(e.trailing_metadata() or ()).get("gpulease-reason", ""))


async def test_agent_service_over_grpc(cluster: Cluster) -> None:
    alloc = await cluster.allocate()
    runtime = FakeRuntime()
    async with agent(cluster.address, runtime) as a:
        source = AgentInventory(SimulatedInventory(NODE, 4, "m"), reconciling=lambda: a.gate.reconciling)
        server = await start_server("127.0.0.1:0", NODE, source, a.containers)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = agent_pb2_grpc.AgentServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.StartContainer(
                        agent_pb2.StartContainerRequest(
                            allocation_id=alloc.id, revision=alloc.revision + 1, spec=spec()
                        )
                    )
                assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert _reason(e.value) == "STALE_FENCING_TOKEN"
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.StartContainer(
                        agent_pb2.StartContainerRequest(
                            allocation_id=alloc.id,
                            revision=alloc.revision,
                            spec=spec(env={"NVIDIA_VISIBLE_DEVICES": "0"}),
                        )
                    )
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "NVIDIA_VISIBLE_DEVICES" in (
                    e.value.details() or ""
                )
                assert runtime.launches == []

                started = await stub.StartContainer(
                    agent_pb2.StartContainerRequest(allocation_id=alloc.id, revision=alloc.revision, spec=spec())
                )
                ref = tpb.ContainerRef(allocation_id=alloc.id)  # the allocation's only container
                assert (await stub.GetContainer(ref)).container_id == started.container_id
                listed = (await stub.ListContainers(tpb.ListContainersRequest(allocation_id=alloc.id))).containers
                assert [c.container_id for c in listed] == [started.container_id]

                t0 = time.monotonic()
                waited = await stub.WaitContainer(tpb.WaitContainerRequest(ref=ref, timeout_seconds=1))
                assert waited.state == tpb.CONTAINER_STATE_RUNNING and 0.9 <= time.monotonic() - t0 < 3
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.WaitContainer(tpb.WaitContainerRequest(ref=ref, timeout_seconds=301))
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

                # Logs, followed; the client goes away mid-stream and the reader thread stops.
                runtime.emit(started.container_id, b"one\n")
                call = stub.StreamLogs(tpb.StreamLogsRequest(ref=ref, follow=True))
                first = await asyncio.wait_for(call.read(), 5)
                assert first.data == b"one\n" and first.stream == "stdout"
                runtime.emit(started.container_id, b"two\n", "stderr")
                second = await asyncio.wait_for(call.read(), 5)
                assert (second.data, second.stream) == (b"two\n", "stderr")
                call.cancel()
                assert await asyncio.to_thread(runtime.wait_readers_gone, 5)

                stopped = await stub.StopContainer(tpb.StopContainerRequest(ref=ref, grace_seconds=1))
                assert stopped.state == tpb.CONTAINER_STATE_EXITED and stopped.exit_code == 143
                assert stopped.error == "stopped by request"
                waited = await stub.WaitContainer(tpb.WaitContainerRequest(ref=ref))
                assert waited.state == tpb.CONTAINER_STATE_EXITED

                # Logs of an exited container end by themselves.
                chunks = [c.data async for c in stub.StreamLogs(tpb.StreamLogsRequest(ref=ref, follow=True))]
                assert chunks == [b"one\n", b"two\n"]

                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.GetContainer(tpb.ContainerRef(container_id="f" * 64))
                assert e.value.code() == grpc.StatusCode.NOT_FOUND and _reason(e.value) == "CONTAINER_NOT_FOUND"
                inv = await stub.GetInventory(agent_pb2.GetInventoryRequest())
                assert inv.node == NODE and not inv.inventory.reconciling and len(inv.inventory.gpus) == 4
        finally:
            await server.stop(0)


async def test_without_docker_container_calls_are_unavailable_with_a_hint(cluster: Cluster) -> None:
    def no_docker() -> ContainerRuntime:
        raise ConnectionRefusedError("connect to /var/run/docker.sock: connection refused")

    async with agent(cluster.address, FakeRuntime(), factory=no_docker) as a:
        source = AgentInventory(SimulatedInventory(NODE, 4, "m"))
        server = await start_server("127.0.0.1:0", NODE, source, a.containers)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = agent_pb2_grpc.AgentServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.ListContainers(tpb.ListContainersRequest())
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE and _reason(e.value) == "UNAVAILABLE"
                assert "dockerd" in (e.value.details() or "") and "connection refused" in (e.value.details() or "")
                # The agent still serves its inventory.
                assert len((await stub.GetInventory(agent_pb2.GetInventoryRequest())).inventory.gpus) == 4
            # Reconciliation does not wait for Docker: nothing can be adopted without it.
            report = await Reconciler(enforcer=a.enforcer, gate=a.gate).reconcile_once()
            assert not report.runtime_available and report.adopted == []
        finally:
            await server.stop(0)


# -- configuration ------------------------------------------------------------------------------


def test_container_settings_defaults_and_sources(tmp_path: Any) -> None:
    from gpulease.agent.config import ConfigError, load_config

    base = ["--coordinator", "c:1", "--node-id", "n"]
    cfg = load_config(base, {})
    assert cfg.docker_host is None and cfg.container_network == "gpulease"  # the agent's own, icc off
    assert (cfg.stop_grace_seconds, cfg.enforce_interval_seconds, cfg.enforce_grace_seconds) == (10.0, 2.0, 1.0)

    # DOCKER_HOST is the default; every gpulease source beats it.
    assert load_config(base, {"DOCKER_HOST": "unix:///d.sock"}).docker_host == "unix:///d.sock"
    env = {"DOCKER_HOST": "unix:///d.sock", "GPULEASE_AGENT_DOCKER_HOST": "tcp://h:2375"}
    assert load_config(base, env).docker_host == "tcp://h:2375"
    assert load_config([*base, "--docker-host", "unix:///f.sock"], env).docker_host == "unix:///f.sock"

    toml = tmp_path / "a.toml"
    toml.write_text('container-network = "jobs"\nenforce_interval_seconds = 0.5\nstop_grace_seconds = 3\n')
    cfg = load_config([*base, "--config", str(toml), "--enforce-grace-seconds", "2.5"], {})
    assert (cfg.container_network, cfg.enforce_interval_seconds, cfg.stop_grace_seconds) == ("jobs", 0.5, 3.0)
    assert cfg.enforce_grace_seconds == 2.5

    for bad, message in (
        (["--enforce-interval-seconds", "0"], "enforce_interval_seconds must be between"),
        (["--stop-grace-seconds", "-1"], "stop_grace_seconds must be between"),
        (["--container-network", "bad net"], "not a valid Docker network name"),
        (["--container-network", "host"], "shares the host's or another container's network namespace"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config([*base, *bad], {})


# -- end to end: a real agent process and a real dockerd -----------------------------------------


@pytest.mark.slow
def test_killed_agent_restarts_and_adopts_its_docker_container(
    coordinator: harness.Coordinator, local_cluster: LocalCluster, request: pytest.FixtureRequest
) -> None:
    pytest.importorskip("gpulease.agent.runtime.docker_runtime")
    daemon: Dockerd = request.getfixturevalue("dockerd")
    image: str = request.getfixturevalue("busybox")
    port = procs.free_port()
    listen = f"127.0.0.1:{port}"

    def start_agent() -> procs.ManagedProcess:
        # SERVING once registered and reconciled; the restarted agent listens where the first did.
        return daemon.add_agent(local_cluster, "d1", 2, coordinator=coordinator.address, port=port).process

    client = daemon.client()
    try:
        first = start_agent()
        alloc = coordinator.stub.Allocate(
            pb.AllocateRequest(gpus=1, cpus=1, memory_bytes=GiB, ttl_seconds=120, owner="e2e")
        ).allocation
        with grpc.insecure_channel(listen) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            started = stub.StartContainer(
                agent_pb2.StartContainerRequest(
                    allocation_id=alloc.id,
                    revision=alloc.revision,
                    spec=tpb.ContainerSpec(image=image, command=["sleep", "3600"]),
                ),
                timeout=120,
            )
        assert started.state == tpb.CONTAINER_STATE_RUNNING
        before = client.api.inspect_container(started.container_id)

        first.kill()  # kill -9: no chance to clean up
        log_before = first.log_path.read_text()
        second = start_agent()
        with grpc.insecure_channel(listen) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            listed = stub.ListContainers(tpb.ListContainersRequest(allocation_id=alloc.id), timeout=30).containers
        assert [(c.container_id, c.state) for c in listed] == [(started.container_id, tpb.CONTAINER_STATE_RUNNING)]
        after = client.api.inspect_container(started.container_id)
        assert after["State"]["Running"] and after["RestartCount"] == 0
        assert after["State"]["StartedAt"] == before["State"]["StartedAt"]  # not restarted
        ours = client.api.containers(all=True, filters={"label": f"io.gpulease.allocation={alloc.id}"})
        assert [c["Id"] for c in ours] == [started.container_id]  # no duplicate
        # One log for both (agent-d1.log): what the restarted agent wrote comes after the first's.
        assert "adopting container" in second.log_path.read_text()[len(log_before) :]

        # Released: the enforcer of the new agent stops it within the budget.
        coordinator.stub.Release(pb.ReleaseRequest(allocation_id=alloc.id))
        harness.wait_until(
            lambda: not client.api.inspect_container(started.container_id)["State"]["Running"],
            INTERVAL + GRACE + 3,
            "the released allocation's container to stop",
        )
    finally:
        client.close()
