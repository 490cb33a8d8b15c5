"""Gangs (issue 15, section 5) against the session's real etcd: N nodes x M GPUs committed in one
transaction, all or nothing, as one allocation under one lease.

- in process (tests/support/inproc.py): a 2 x 4 gang commits whole on 2 nodes (one id, keys on
  both nodes, one lease whose revocation frees both); a release deletes every member's keys; a gang
  too large for one etcd transaction is refused at once, naming the limit; --same picks nodes
  sharing a label;
- through a real coordinator: a 2 x 4 gang on a cluster with enough GPUs in total but not on 2
  nodes waits in the queue and commits whole when they free up; a coordinator configured with more
  operations per transaction than etcd allows stops at start saying so;
- in a secure cluster: the agent of a member node reads the allocation as seen on its node (its own
  GPUs), the agent of another node is refused.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import pytest

from gpulease.client import Client, PendingInfo
from gpulease.common.identity import Kind
from gpulease.coordinator.allocations import AllocationPolicy
from gpulease.dev import procs
from gpulease.dev.cluster import LocalCluster
from gpulease.errors import InvalidRequest
from gpulease.v1 import coordinator_pb2 as pb
from tests.support import harness
from tests.support.harness import rpc_error
from tests.support.inproc import core, node_info, until
from tests.support.secure import Caller, channel, token_caller

GiB = 2**30


async def test_a_gang_commits_whole_on_two_nodes_under_one_lease(etcd: harness.Etcd, prefix: str) -> None:
    async with core([etcd.url], prefix) as c:
        for name in ("n1", "n2", "n3"):
            await c.nodes.register(node_info(name, 4, cpus=8))
        await until(lambda: len(c.view.nodes()) == 3, 5, "three nodes in the view")
        gang = await c.allocate(4, nodes=2, cpus=2, memory_bytes=GiB)
        assert gang.is_gang and len(gang.members) == 2
        assert len(set(gang.nodes)) == 2
        assert all(len(m.gpus) == 4 and m.cpus == 2 and m.memory_bytes == GiB for m in gang.members)
        assert (gang.node, gang.gpus) == (gang.members[0].node, gang.members[0].gpus)
        # One allocation id: its keys on both member nodes, on its one lease.
        held = await c.keys_under("gpus")
        for m in gang.members:
            assert sorted(k for k in held if k.startswith(f"{m.node}/")) == sorted(f"{m.node}/{g.uuid}" for g in m.gpus)
            assert await c.reserved(m.node) == (2, GiB)
        assert await c.keys_under("allocs") == [gang.id]
        for m in gang.members:
            kv = await c.store.get(c.keys.res(m.node, gang.id))
            assert kv is not None and kv.lease == gang.lease_id
        # Read back as one record with its members (a reader that knows no gangs sees the first).
        stored = await c.allocations.get(gang.id)
        assert stored.members == gang.members
        seen = stored.on(gang.members[1].node)
        assert (seen.node, seen.gpus) == (gang.members[1].node, gang.members[1].gpus)
        listed = await c.allocations.list(node=gang.members[1].node)
        assert [(a.id, a.node, a.gpus) for a in listed] == [(gang.id, seen.node, seen.gpus)]

        # Revoking its single lease frees every member at once.
        await c.store.revoke(gang.lease_id)
        await until(lambda: all(not v.gpus_held for v in c.view.nodes()), 5, "every GPU free again")
        assert await c.keys_under("gpus") == [] and await c.keys_under("res") == []


async def test_a_release_deletes_every_members_keys(etcd: harness.Etcd, prefix: str) -> None:
    async with core([etcd.url], prefix) as c:
        for name in ("n1", "n2"):
            await c.nodes.register(node_info(name, 4, cpus=8))
        await until(lambda: len(c.view.nodes()) == 2, 5, "two nodes in the view")
        gang = await c.allocate(2, nodes=2, cpus=1, memory_bytes=GiB, tenant="ml")
        assert await c.keys_under("usage/ml") == [gang.id]
        assert gang.usage.gpus == 4 and gang.usage.cpus == 2
        assert await c.allocations.release(gang.id) > 0
        for kind in ("gpus", "res", "allocs", "usage"):
            assert await c.keys_under(kind) == [], kind
        # The request key stays, as a tombstone (issue 17): no attempt of the gang's request can commit.
        [req] = await c.keys_under("reqs")
        kv = await c.store.get(f"{c.keys.prefix}reqs/{req}")
        assert kv is not None and kv.value == b"~released " + gang.id.encode()


async def test_a_gang_too_large_for_one_transaction_is_refused_naming_the_limit(
    etcd: harness.Etcd, prefix: str
) -> None:
    async with core([etcd.url], prefix, policy=AllocationPolicy(max_txn_ops=64)) as c:
        for name in ("n1", "n2"):
            await c.nodes.register(node_info(name, 8, cpus=16))
        await until(lambda: len(c.view.nodes()) == 2, 5, "two nodes in the view")
        with pytest.raises(InvalidRequest) as err:
            await c.allocate(8, nodes=8, cpus=1, memory_bytes=GiB)
        msg = err.value.message
        assert "a gang of 8 nodes x 8 GPUs needs" in msg and "etcd allows 64" in msg, msg
        assert "--max-txn-ops" in msg and "etcd_max_txn_ops" in msg, msg
        assert await c.keys_under("allocs") == []  # nothing was written, no lease taken for it
        # One that fits the limit commits.
        assert len((await c.allocate(8, nodes=2, cpus=1, memory_bytes=GiB)).members) == 2


async def test_same_label_picks_nodes_sharing_it(etcd: harness.Etcd, prefix: str) -> None:
    async with core([etcd.url], prefix) as c:
        racks = {"a1": "a", "b1": "b", "b2": "b", "c1": "c"}
        for name, rack in racks.items():
            info = node_info(name, 4, cpus=8)
            await c.nodes.register(type(info)(**{**info.__dict__, "labels": {"rack": rack}}))
        await until(lambda: len(c.view.nodes()) == 4, 5, "four nodes in the view")
        gang = await c.allocate(4, nodes=2, cpus=1, memory_bytes=GiB, same_label="rack")
        assert sorted(gang.nodes) == ["b1", "b2"]


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as ex:
        yield ex


def test_a_gang_waits_until_two_nodes_have_the_gpus_and_commits_whole(
    start_coordinator: Callable[..., harness.Coordinator], pool: ThreadPoolExecutor
) -> None:
    """The issue's case: 2 nodes x 4 GPUs, one GPU held on each: 6 free in total, but not 4 on 2
    nodes. The 2 x 4 gang waits (saying so) and is admitted with 4 + 4 once they free up."""
    c = start_coordinator(extra=["--queue-ttl", "3s"])
    for name in ("n1", "n2"):
        harness.register(c.stub, name, gpus=4, cpus=16, labels={"host": name})
    harness.wait_nodes_up(c.stub, {"n1", "n2"})
    with Client(c.address, timeout=5) as client:
        holders = [client.allocate(gpus=1, cpus=1, memory="1MiB", ttl="60s", node_selector={"host": name})
                   for name in ("n1", "n2")]  # fmt: skip
        seen: list[PendingInfo] = []
        waiting: Future[object] = pool.submit(client.allocate, gpus=4, nodes=2, cpus=1, memory="1MiB", wait="30s",
                                              request_id="gang", on_pending=seen.append)  # fmt: skip
        harness.wait_until(lambda: any(s.position == 1 for s in seen), 10, "a pending status")
        reason = next(s for s in seen if s.position == 1).reason
        assert "no 2 nodes have 4 GPUs free each" in reason and "3 on n1, 3 on n2" in reason, reason
        assert not waiting.done()

        holders[0].release()  # one node with 4 free is not enough: it still waits, and says so
        harness.wait_until(lambda: any("4 on n1, 3 on n2" in s.reason for s in seen), 10, "the new reason")
        assert not waiting.done()
        holders[1].release()
        gang = waiting.result(timeout=15)
        members = gang.members  # type: ignore[attr-defined]
        assert sorted(m.node for m in members) == ["n1", "n2"]
        assert all(len(m.gpus) == 4 for m in members)
        assert all(m.node_address for m in members)
        assert harness.free_gpus(client) == 0
        assert [p.request_id for p in client.list_pending()] == []
        assert gang.release()  # type: ignore[attr-defined]
        assert harness.free_gpus(client) == 8


def test_a_coordinator_allowed_more_operations_than_etcd_stops_at_start(etcd: harness.Etcd, prefix: str) -> None:
    # The test etcd runs with --max-txn-ops 1024 (gpulease/dev/procs.py).
    port = procs.free_port()
    argv = [sys.executable, "-m", "gpulease.coordinator.main", "--etcd", etcd.url, "--prefix", prefix,
            "--listen", f"127.0.0.1:{port}", "--etcd-max-txn-ops", "2000", "--http-listen", ""]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    assert "etcd_max_txn_ops is 2000, which exceeds etcd's --max-txn-ops" in done.stderr, done.stderr[-2000:]


def test_member_agents_see_their_own_gpus_and_other_agents_are_refused(secure_cluster: LocalCluster) -> None:
    mtls = secure_cluster.coordinator(secure_cluster.coordinator_address).mtls_address
    admin, admin_ch = token_caller(secure_cluster, "admin", secure_cluster.admin_token())
    agents: dict[str, Caller] = {}
    channels = [admin_ch]
    for name in ("node-1", "node-2", "node-3"):
        ch = channel(secure_cluster, mtls, secure_cluster.issue(Kind.AGENT, name))
        channels.append(ch)
        agents[name] = Caller(name, harness.AnyService(ch))
        gpus = 4 if name != "node-3" else 2  # node-3 can never hold a member
        agents[name].RegisterNode(pb.RegisterNodeRequest(node=name, address=f"127.0.0.1:{procs.free_port()}",
                                                         inventory=harness.inventory(gpus, node=name)))  # fmt: skip
    try:
        harness.wait_until(lambda: len(admin.ListNodes(pb.ListNodesRequest()).nodes) == 3, 10, "three nodes")
        gang = admin.Allocate(pb.AllocateRequest(gpus=4, nodes=2, cpus=1, memory_bytes=GiB, request_id="g")).allocation
        assert [m.node for m in gang.members] == ["node-1", "node-2"]
        for m in gang.members:
            seen = agents[m.node].GetNodeAllocation(pb.GetAllocationRequest(allocation_id=gang.id)).allocation
            assert seen.node == m.node and [g.uuid for g in seen.gpus] == [g.uuid for g in m.gpus]
            assert all(g.uuid.startswith(f"GPU-{m.node}-") for g in seen.gpus)
            listed = agents[m.node].ListNodeAllocations(pb.ListAllocationsRequest(node=m.node)).allocations
            assert [(a.id, a.node) for a in listed] == [(gang.id, m.node)]
        err = rpc_error(lambda: agents["node-3"].GetNodeAllocation(pb.GetAllocationRequest(allocation_id=gang.id)))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
        assert "node-1, node-2" in err.details()
        # A run on a node that is not a member is refused before anything is forwarded.
        err = rpc_error(lambda: admin.RunContainer(pb.RunContainerRequest(allocation_id=gang.id, node="node-3")))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a member" in err.details(), err.details()
    finally:
        for ch in channels:
            ch.close()
