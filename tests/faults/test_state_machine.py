"""A hypothesis state machine over a real coordinator process and the session's etcd (issue 17).

Rules: allocate, release (and release again), keepalive, cordon / uncordon, node down (its
heartbeats stop and its short node lease lapses) and up again, and waiting. Nodes are registered
directly through NodeService RegisterNode and kept alive by a heartbeat thread of the test's.
After every step, from the coordinator (GetClusterSummary, ListNodes, ListAllocations) and from
etcd itself (allocs/ and gpus/ keys): on every up, uncordoned node free + allocated = total, the
allocated GPUs agree everywhere, no GPU is in two live allocations, and the model's allocations are
exactly the live ones. Each example gets its own coordinator on its own prefix; its history of
allocate, release and keepalive calls is checked with tests/faults/history.py at the end.

Default: a few examples of a few dozen steps (about a minute); GPULEASE_FAULTS_LONG=1: more.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from typing import Any, ClassVar

import grpc
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from gpulease.dev.cluster import LocalCluster
from gpulease.errors import GpuLeaseError
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import types_pb2 as tpb
from tests.faults import b2_support as b2
from tests.faults.history import History, check, summary
from tests.faults.storm import gpu_names, read_allocations
from tests.support import harness

pytestmark = pytest.mark.slow

NODES = {"sm-a": 4, "sm-b": 2, "sm-c": 3}
NODE_TTL = 3
TTL = 60  # longer than any example: nothing expires unless a rule lets it
GiB = 2**30


def etcd_records(url: str, prefix: str) -> tuple[dict[str, set[str]], dict[str, str]]:
    """(allocation id -> "node/uuid" of its record's GPUs, "node/uuid" -> allocation id of gpus/ keys)."""
    from tests.faults.etcd_cluster import b64, post_json, unb64

    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    answer = post_json(url, "/v3/kv/range", {"key": b64(prefix), "range_end": b64(end)}, timeout=5.0)
    records: dict[str, set[str]] = {}
    keys: dict[str, str] = {}
    for kv in answer.get("kvs", []):
        key = unb64(kv["key"])[len(prefix) :]
        if key.startswith("allocs/"):
            rec = json.loads(unb64(kv.get("value", "")))
            members = rec.get("members") or [{"node": rec["node"], "gpus": rec["gpus"]}]
            records[key[len("allocs/") :]] = {f"{m['node']}/{g['uuid']}" for m in members for g in m["gpus"]}
        elif key.startswith("gpus/"):
            keys[key[len("gpus/") :]] = unb64(kv.get("value", ""))
    return records, keys


class Heartbeats:
    """Keeps the nodes in `up` alive: a Heartbeat every 0.5 s each (re-registering a lapsed one)."""

    def __init__(self, stub: Any, leases: dict[str, int]) -> None:
        self.stub = stub
        self.leases = leases
        self.up: set[str] = set(leases)
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sm-heartbeats", daemon=True)
        self._thread.start()

    def beat(self, node: str) -> None:
        with self.lock:
            lease = self.leases[node]
        resp = self.stub.Heartbeat(pb.HeartbeatRequest(node=node, lease_id=lease), timeout=5)
        with self.lock:
            self.leases[node] = resp.lease_id or lease

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            with self.lock:
                nodes = sorted(self.up)
            for node in nodes:
                # A failed beat is tried again next round; a lapse it caused is the invariants' to find.
                with contextlib.suppress(grpc.RpcError):
                    self.beat(node)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class GpuMachine(RuleBasedStateMachine):
    cluster: ClassVar[LocalCluster]
    etcd_url: ClassVar[str]
    examples: ClassVar[list[dict[str, Any]]]

    allocations = Bundle("allocations")
    released_ids = Bundle("released")

    def __init__(self) -> None:
        super().__init__()
        self.prefix = harness.new_prefix()
        child = self.cluster.add_coordinator(prefix=self.prefix, node_ttl=NODE_TTL, heartbeat_interval=1)
        self.address = child.address
        self.channel = self.cluster.channel(child.address)
        self.stub = harness.AnyService(self.channel)
        self.client = self.cluster.client(targets=[child.address])
        self.history = History()
        leases = {name: harness.register(self.stub, name, gpus=n, cpus=64, memory=256 * GiB)
                  for name, n in NODES.items()}  # fmt: skip
        self.beats = Heartbeats(self.stub, leases)
        harness.wait_nodes_up(self.stub, set(NODES))
        self.model: dict[str, set[str]] = {}  # live allocation id -> "node/uuid"
        self.cordoned: set[str] = set()
        self.certainly_up: set[str] = set(NODES)
        self.down_since: dict[str, float] = {}
        self.steps = 0

    def teardown(self) -> None:
        try:
            final = read_allocations([self.etcd_url], self.prefix)
            violations = check(self.history, final_allocations=final)
            self.examples.append({"steps": self.steps, "ops": self.history.counts()})
            assert not violations, summary(violations)
        finally:
            self.beats.close()
            self.client.close()
            self.channel.close()
            self.cluster.stop_coordinator(self.address)

    # -- rules ------------------------------------------------------------------------------

    def _free_on(self, node: str) -> int:
        held = sum(1 for gpus in self.model.values() for g in gpus if g.startswith(node + "/"))
        return NODES[node] - held

    @rule(target=allocations, gpus=st.integers(1, 4))
    def allocate(self, gpus: int) -> Any:
        self.steps += 1
        try:
            alloc = b2.recorded_allocate(self.history, "sm", self.client, gpus=gpus, cpus=1, memory=GiB, ttl=TTL)
        except GpuLeaseError as e:
            fits = [n for n in self.certainly_up - self.cordoned if self._free_on(n) >= gpus]
            assert e.code == "RESOURCE_EXHAUSTED" and not fits, (
                f"allocate({gpus}) refused ({e.code}: {e.message}) though {fits} certainly fit it"
            )
            return multiple()
        names = gpu_names(alloc.info)
        assert alloc.node not in self.cordoned, f"placed on cordoned node {alloc.node}"
        self.model[alloc.id] = set(names)
        return alloc.id

    @rule(target=released_ids, alloc_id=consumes(allocations))
    def release(self, alloc_id: str) -> str:
        self.steps += 1
        assert b2.recorded_release(self.history, "sm", self.client, alloc_id), f"{alloc_id} was not live"
        self.model.pop(alloc_id)
        return alloc_id

    @rule(alloc_id=released_ids)
    def release_again(self, alloc_id: str) -> None:
        self.steps += 1
        assert not b2.recorded_release(self.history, "sm", self.client, alloc_id)

    @rule(alloc_id=allocations)
    def keepalive(self, alloc_id: str) -> None:
        self.steps += 1
        assert b2.recorded_keepalive(self.history, "sm", self.client, alloc_id) == TTL

    @rule(node=st.sampled_from(sorted(NODES)), cordon=st.booleans())
    def cordon(self, node: str, cordon: bool) -> None:
        self.steps += 1
        self.stub.CordonNode(pb.CordonNodeRequest(node=node, cordoned=cordon), timeout=5)
        (self.cordoned.add if cordon else self.cordoned.discard)(node)

    @rule(node=st.sampled_from(sorted(NODES)))
    def node_down(self, node: str) -> None:
        self.steps += 1
        with self.beats.lock:
            self.beats.up.discard(node)
        self.certainly_up.discard(node)
        self.down_since.setdefault(node, time.monotonic())

    @rule(node=st.sampled_from(sorted(NODES)))
    def node_up(self, node: str) -> None:
        self.steps += 1
        self.beats.beat(node)  # re-registers it if its lease lapsed
        with self.beats.lock:
            self.beats.up.add(node)
        self.down_since.pop(node, None)
        up = (tpb.NODE_STATE_UP, tpb.NODE_STATE_CORDONED)
        harness.wait_until(lambda: harness.node_states(self.stub).get(node) in up, 5, f"{node} up")
        self.certainly_up.add(node)

    @rule(seconds=st.sampled_from([0.5, 1.0, NODE_TTL + 1.0]))
    def wait(self, seconds: float) -> None:
        self.steps += 1
        time.sleep(seconds)

    # -- after every step -------------------------------------------------------------------

    @invariant()
    def consistent(self) -> None:
        # Node lapses and cordons land in the view asynchronously (milliseconds); allocations are
        # read-your-writes. Poll briefly for one reading that agrees everywhere.
        last: list[str] = []
        for _ in range(20):
            last = self._disagreements()
            if not last:
                return
            time.sleep(0.1)
        raise AssertionError("state disagrees after a step:\n  " + "\n  ".join(last))

    def _disagreements(self) -> list[str]:
        bad: list[str] = []
        summary_ = self.stub.GetClusterSummary(pb.GetClusterSummaryRequest(), timeout=5)
        nodes = {n.name: n for n in self.stub.ListNodes(pb.ListNodesRequest(), timeout=5).nodes}
        live = list(self.stub.ListAllocations(pb.ListAllocationsRequest(), timeout=5).allocations)
        records, gpu_keys = etcd_records(self.etcd_url, self.prefix)

        # No GPU in two live allocations: etcd's records, and the coordinator's list.
        for source, allocs in (("etcd", records), ("ListAllocations", {
                a.id: {f"{a.node}/{g.uuid}" for g in a.gpus} for a in live})):  # fmt: skip
            seen: dict[str, str] = {}
            for alloc_id, gpus in allocs.items():
                for g in gpus:
                    if g in seen:
                        bad.append(f"{source}: GPU {g} in {seen[g]} and {alloc_id}")
                    seen[g] = alloc_id
        # etcd's gpus/ keys say the same as its allocs/ records, and the model the same as both.
        by_keys: dict[str, set[str]] = {}
        for g, alloc_id in gpu_keys.items():
            by_keys.setdefault(alloc_id, set()).add(g)
        if by_keys != records:
            bad.append(f"etcd gpus/ keys {by_keys} != allocs/ records {records}")
        if records != self.model:
            bad.append(f"etcd allocations {records} != the model's {self.model}")
        if {a.id for a in live} != set(self.model):
            bad.append(f"ListAllocations {sorted(a.id for a in live)} != the model's {sorted(self.model)}")

        total_alloc = total = free = 0
        for s in summary_.nodes:
            node = nodes.get(s.name)
            if node is None:
                bad.append(f"{s.name} in GetClusterSummary, not in ListNodes")
                continue
            allocated = len(node.allocated_gpu_indexes)
            in_etcd = sum(1 for g in gpu_keys if g.startswith(s.name + "/"))
            gpus = len(node.inventory.gpus)
            if allocated != in_etcd:
                bad.append(f"{s.name}: ListNodes says {allocated} allocated, etcd holds {in_etcd}")
            if s.gpus_total != gpus:
                bad.append(f"{s.name}: summary total {s.gpus_total}, ListNodes {gpus}")
            # A cordoned node that is up reports CORDONED; a down one DOWN, cordoned or not.
            usable = s.state == tpb.NODE_STATE_UP and not node.cordoned
            expected_free = gpus - allocated if usable else 0
            if s.gpus_free != expected_free:
                bad.append(f"{s.name} ({tpb.NodeState.Name(s.state)}, cordoned={node.cordoned}): free "
                           f"{s.gpus_free} + allocated {allocated} vs total {gpus}")  # fmt: skip
            if node.cordoned != (s.name in self.cordoned):
                bad.append(f"{s.name}: cordoned={node.cordoned}, the model says {s.name in self.cordoned}")
            if s.name in self.certainly_up and s.state not in (tpb.NODE_STATE_UP, tpb.NODE_STATE_CORDONED):
                bad.append(f"{s.name}: heartbeating, but {tpb.NodeState.Name(s.state)}")
            since = self.down_since.get(s.name)
            if since is not None and time.monotonic() - since > NODE_TTL + 2 and s.state != tpb.NODE_STATE_DOWN:
                bad.append(f"{s.name}: no heartbeat for {time.monotonic() - since:.1f}s, still UP")
            total += gpus
            total_alloc += allocated
            free += expected_free
        t = summary_.totals
        if (t.gpus_total, t.gpus_free) != (total, free) or total != sum(NODES.values()):
            bad.append(f"totals: summary {t.gpus_total} total / {t.gpus_free} free, nodes {total} / {free}")
        if total_alloc != len(gpu_keys):
            bad.append(f"{total_alloc} allocated per ListNodes, {len(gpu_keys)} in etcd")
        return bad


def test_allocations_nodes_and_cordons_stay_consistent(local_cluster: LocalCluster, etcd: harness.Etcd) -> None:
    examples: list[dict[str, Any]] = []

    class Machine(GpuMachine):
        cluster = local_cluster
        etcd_url = etcd.url

    Machine.examples = examples
    long = b2.long_run()
    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=25 if long else 4,
            stateful_step_count=60 if long else 20,
            deadline=None,
            derandomize=False,
            database=None,
            suppress_health_check=list(HealthCheck),
            print_blob=True,
        ),
    )
    print(f"state machine: {len(examples)} examples, steps {[e['steps'] for e in examples]}")
    assert examples, "no example ran"
