"""etcd faults under an allocate/release storm through 2 coordinators on a 3-member etcd cluster:
the leader SIGKILLed and restarted, members SIGSTOPped past the election timeout, history
compacted under a running coordinator. Every scenario records a history and checks it
(tests/faults/history.py): no overlap, no acknowledged allocation lost, nothing leaked once
quiet, no INTERNAL or UNKNOWN error. Scale: tests/faults/conftest.py (GPULEASE_FAULTS_LONG=1)."""

from __future__ import annotations

import json
import time

import pytest

from gpulease.client import Client
from gpulease.dev.cluster import LocalCluster
from tests.faults.conftest import Scale, Scenario
from tests.faults.etcd_cluster import ELECTION_TIMEOUT_MS, EtcdCluster
from tests.faults.history import summary
from tests.faults.storm import recovery_after, unavailable_spells

pytestmark = pytest.mark.timeout(900)


def record_recoveries(s: Scenario, faults: list[tuple[str, float]]) -> None:
    """Time from each fault to the first success sent after it, and the longest spell without
    success, into the scenario's figures (figures.json in its tmp dir)."""
    s.figures["recovery_s"] = {f"{what}@{at - s.history.ops[0].invoked:.1f}s": recovery_after(s.history, at)
                               for what, at in faults} if s.history.ops else {}  # fmt: skip
    spells = unavailable_spells(s.history)
    s.figures["longest_unavailable_s"] = max((b - a for a, b in spells), default=0.0)
    s.figures["faults"] = len(faults)


def test_storm_without_faults(scenario: Scenario, scale: Scale) -> None:
    """The baseline: the same storm with nothing injected passes the checker."""
    s = scenario
    s.storm(clients=min(scale.clients, 8), duration_s=4.0, max_ops=scale.max_ops)
    violations = s.finish()
    assert violations == [], summary(violations)
    assert s.figures["counts"].get("allocate.ok", 0) > 0


def test_etcd_leader_kill(scenario: Scenario, scale: Scale) -> None:
    """SIGKILL the etcd leader mid-storm and restart it, `scale.kills` times."""
    s = scenario
    # The issue asks for >= 32 clients; 2 cores take that (threads mostly wait on gRPC).
    clients = max(32, scale.clients)
    storm = s.storm_in_background(clients=clients, duration_s=scale.duration_s + 6.0 * scale.kills,
                                  max_ops=scale.max_ops)  # fmt: skip
    faults: list[tuple[str, float]] = []
    time.sleep(2.0)
    for _ in range(scale.kills):
        if s.stop.is_set() or not storm.is_alive():
            break
        leader = s.etcd.leader()
        at = time.monotonic()
        s.etcd.kill(leader)
        s.history.note("kill etcd leader", member=leader)
        faults.append((f"kill m{leader}", at))
        time.sleep(2.0)
        s.etcd.restart(leader)
        s.etcd.wait_healthy(30)
        s.history.note("restart etcd member", member=leader)
        time.sleep(2.5)
    s.join_storm(storm)
    record_recoveries(s, faults)
    violations = s.finish()
    assert len(faults) == scale.kills
    assert violations == [], summary(violations)
    assert s.figures["counts"].get("allocate.ok", 0) > 0


def test_etcd_member_pause(scenario: Scenario, scale: Scale) -> None:
    """SIGSTOP a follower, then the leader, each longer than the election timeout, then SIGCONT."""
    s = scenario
    pause_s = 3 * ELECTION_TIMEOUT_MS / 1000
    storm = s.storm_in_background(clients=scale.clients, duration_s=scale.duration_s + 4 * pause_s,
                                  max_ops=scale.max_ops)  # fmt: skip
    faults: list[tuple[str, float]] = []
    time.sleep(2.0)
    for role in ("follower", "leader") * (scale.kills // 2 or 1):
        if not storm.is_alive():
            break
        member = s.etcd.leader() if role == "leader" else s.etcd.followers()[0]
        at = time.monotonic()
        s.etcd.pause(member)
        s.history.note(f"pause etcd {role}", member=member)
        faults.append((f"pause {role} m{member}", at))
        time.sleep(pause_s)
        s.etcd.resume(member)
        s.history.note(f"resume etcd {role}", member=member)
        s.etcd.wait_healthy(30)
        time.sleep(2.0)
    s.join_storm(storm)
    record_recoveries(s, faults)
    violations = s.finish()
    assert violations == [], summary(violations)
    assert s.figures["counts"].get("allocate.ok", 0) > 0


def compaction_under_watch(etcd: EtcdCluster, member: int) -> int:
    """Compact etcd's history while member's watch streams are stalled, then break them: a watch
    that went through it reopens elsewhere from a revision etcd has compacted away, and its
    coordinator must reload. (A compaction alone does not touch a watch that keeps up.)"""
    etcd.pause(member)
    try:
        # Two writes outside any coordinator's prefix: the compaction then lies past the revision
        # any stalled watch would reopen from, even one that had seen everything before the pause.
        etcd.put("/faults-compaction-bump/a")
        etcd.put("/faults-compaction-bump/b")
        rev = etcd.compact()
    finally:
        etcd.kill(member)
    etcd.restart(member)
    etcd.wait_healthy(30)
    return rev


def reloads(cluster: LocalCluster) -> dict[str, int]:
    """How often each coordinator's view reloaded because its watch lost its place (its log)."""
    return {
        c.name: c.process.log_path.read_text(errors="replace").count("watch lost its place")
        for c in cluster.coordinators.values()
    }


def view_matches_etcd(client: Client, etcd: EtcdCluster, prefix: str) -> str | None:
    """None when the coordinator's view (ListNodes) holds exactly the GPUs and CPUs etcd holds under
    prefix; else what differs."""
    _, kvs = etcd.get_prefix(prefix)
    held: dict[str, set[str]] = {}
    cpus: dict[str, int] = {}
    for key, value in kvs.items():
        if key.startswith("gpus/"):
            name, uuid = key[len("gpus/") :].split("/", 1)
            held.setdefault(name, set()).add(uuid)
        elif key.startswith("res/"):
            name = key[len("res/") :].split("/", 1)[0]
            cpus[name] = cpus.get(name, 0) + int(json.loads(value)["cpus"])
    for node in client.list_nodes():
        by_index = {g.index: g.uuid for g in node.gpus}
        view = {by_index[i] for i in node.allocated_gpu_indexes}
        if view != held.get(node.name, set()) or node.cpus_allocated != cpus.get(node.name, 0):
            return f"{node.name}: view holds {sorted(view)} / {node.cpus_allocated} CPUs, etcd {sorted(held.get(node.name, set()))} / {cpus.get(node.name, 0)}"  # noqa: E501
    return None


def test_watch_compaction(scenario: Scenario, scale: Scale) -> None:
    """etcd compacts its history under running coordinators, mid-storm, while their watches are
    cut: each coordinator's view reloads, the storm's history checks out, and afterwards each
    coordinator's ListNodes equals a fresh read of etcd (with allocations held and one released
    across the compaction)."""
    s = scenario
    storm = s.storm_in_background(clients=min(scale.clients, 8), duration_s=scale.duration_s, max_ops=scale.max_ops)
    compactions: list[int] = []
    time.sleep(1.0)
    for k in range(3 * max(1, scale.kills // 2)):
        if not storm.is_alive():
            break
        compactions.append(compaction_under_watch(s.etcd, k % s.etcd.size))
        s.history.note("compact under a stalled watch", revision=compactions[-1], member=k % s.etcd.size)
        time.sleep(1.0)
    s.join_storm(storm)
    violations = s.finish()
    assert violations == [], summary(violations)
    # State that is not empty across one more round of compactions, with a release in between.
    with Client(s.addresses, timeout=5, retry_deadline=20) as client:
        held = [client.allocate(gpus=g, ttl=60, owner="compaction") for g in (1, 2, 3)]
        for i in range(s.etcd.size):
            compactions.append(compaction_under_watch(s.etcd, i))
            if i == 1:
                held.pop().release()
        for address in s.addresses:
            with Client(address, timeout=5, retry_deadline=10) as one:
                deadline = time.monotonic() + 15
                while (diff := view_matches_etcd(one, s.etcd, s.prefix)) is not None:
                    assert time.monotonic() < deadline, f"{address}: {diff}"
                    time.sleep(0.5)
        for a in held:
            a.release()
    s.figures["compactions"] = len(compactions)
    s.figures["reloads"] = reloads(s.cluster)
    (s.tmp / "figures.json").write_text(json.dumps(s.figures, indent=2, default=str))
    print(f"[{s.name}] compactions {len(compactions)}, view reloads {s.figures['reloads']}")
    assert all(n >= 1 for n in s.figures["reloads"].values()), f"a view never reloaded: {s.figures['reloads']}"
