"""Coordinator and client faults under an allocate/release storm through 2 coordinators on a
3-member etcd cluster: a coordinator SIGKILLed with batches in flight, a coordinator SIGSTOPped for
longer than the allocations' TTL, clients SIGKILLed while they hold allocations. Every scenario
records a history and checks it (tests/faults/history.py). Scale: tests/faults/conftest.py."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import pytest

from gpulease.dev import procs
from gpulease.dev.cluster import LocalCluster
from tests.faults.conftest import Scale, Scenario
from tests.faults.etcd_cluster import ELECTION_TIMEOUT_MS, EtcdCluster
from tests.faults.history import History, Op, check, summary
from tests.faults.storm import read_allocations, recovery_after, unavailable_spells, wait_quiet

pytestmark = pytest.mark.timeout(900)


def restart_coordinator(cluster: LocalCluster, address: str) -> None:
    """Start the coordinator at address again, in place (same port, same log)."""
    cluster.add_coordinator(int(address.rsplit(":", 1)[1]))


def record(s: Scenario, faults: list[tuple[str, float]]) -> None:
    start = s.history.ops[0].invoked if s.history.ops else 0.0
    s.figures["recovery_s"] = {f"{what}@{at - start:.1f}s": recovery_after(s.history, at) for what, at in faults}
    spells = unavailable_spells(s.history)
    s.figures["longest_unavailable_s"] = max((b - a for a, b in spells), default=0.0)
    s.figures["faults"] = len(faults)


def test_coordinator_crash(scenario: Scenario, scale: Scale) -> None:
    """SIGKILL a coordinator mid-storm (its batcher always has a batch queued or in flight at this
    load), restart it, then the other one. Nobody may be left holding an allocation nobody was told
    of once the quiet period passed (quiet_leaked empty: the settlers' job)."""
    s = scenario
    storm = s.storm_in_background(clients=scale.clients, duration_s=scale.duration_s + 5.0 * scale.kills,
                                  max_ops=scale.max_ops)  # fmt: skip
    faults: list[tuple[str, float]] = []
    time.sleep(2.0)
    for k in range(scale.kills):
        if not storm.is_alive():
            break
        address = s.addresses[k % 2]
        at = time.monotonic()
        s.cluster.coordinator(address).process.kill()
        s.history.note("kill coordinator", address=address)
        faults.append((f"kill {address}", at))
        time.sleep(1.5)
        restart_coordinator(s.cluster, address)
        s.history.note("restart coordinator", address=address)
        time.sleep(2.5)
    s.join_storm(storm)
    record(s, faults)
    violations = s.finish()
    assert len(faults) == scale.kills
    # NOTE: a "leak" here can be the known defect of issue 17 (an allocate that timed out on one
    # coordinator, retried on the other with the same request id, commits after the client
    # released): the test is deliberately not tuned around it.
    assert violations == [], summary(violations)
    assert s.figures["counts"].get("allocate.ok", 0) > 0


def test_coordinator_pause(scenario: Scenario, scale: Scale) -> None:
    """SIGSTOP a coordinator for longer than the allocations' TTL, then SIGCONT: whatever it sends
    late (commits of batches placed before the pause, renewals) must fail its compare or find its
    lease gone. 0 overlaps; allocations whose holders could not renew them in time may expire."""
    s = scenario
    ttl = 5  # the minimum TTL: the pause outlasts it
    pause_s = ttl + 3.0
    storm = s.storm_in_background(clients=scale.clients, duration_s=scale.duration_s + (pause_s + 3) * scale.kills,
                                  max_ops=scale.max_ops, ttl=ttl)  # fmt: skip
    faults: list[tuple[str, float]] = []
    time.sleep(2.0)
    for k in range(scale.kills):
        if not storm.is_alive():
            break
        address = s.addresses[k % 2]
        proc = s.cluster.coordinator(address).process
        at = time.monotonic()
        proc._signal(signal.SIGSTOP)
        s.history.note("pause coordinator", address=address)
        faults.append((f"pause {address}", at))
        try:
            time.sleep(pause_s)
        finally:
            proc._signal(signal.SIGCONT)
        s.history.note("resume coordinator", address=address)
        time.sleep(3.0)
    s.join_storm(storm)
    record(s, faults)
    # Allocations live past the TTL of the storm are not leaks here: the quiet period is a TTL and
    # the settler's bound, after which anything still held is.
    violations = s.finish(quiet_s=ttl + 12.0)
    assert violations == [], summary(violations)
    assert s.figures["counts"].get("allocate.ok", 0) > 0
    for address in s.addresses:
        assert s.cluster.coordinator(address).process.alive(), f"{address} died after SIGCONT"


def _start_client(cluster: LocalCluster, name: str, out: Path, ttl: int) -> procs.ManagedProcess:
    argv = [sys.executable, "-m", "tests.faults.storm_client", "--addresses", ",".join(cluster.coordinator_addresses),
            "--name", name, "--gpus", "2", "--ttl", str(ttl), "--out", str(out), "--hold-s", "120"]  # fmt: skip
    env = procs.python_child_env()
    env["PYTHONPATH"] = f"{Path(__file__).resolve().parents[2]}:{env['PYTHONPATH']}"
    return procs.start_process(name, argv, out.with_suffix(".log"), env=env)


def _acknowledged(path: Path) -> list[Op]:
    if not path.exists():
        return []
    ops = [Op.from_json(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    return [o for o in ops if o.kind == "allocate" and o.outcome == "ok"]


@pytest.mark.parametrize("with_etcd_leader_kill", [False, True], ids=["clients", "clients+etcd-leader"])
def test_client_crash(
    fault_cluster: LocalCluster, etcd3: EtcdCluster, tmp_path: Path, scale: Scale, with_etcd_leader_kill: bool
) -> None:
    """SIGKILL client processes that hold allocations (and, in the second variant, the etcd leader
    at the same moment): every GPU is free within TTL + etcd election timeout + a few seconds, with
    no coordinator action needed."""
    ttl = 5
    n = 8 if scale.long else 4  # 2 GPUs each: half or all of the 16 GPUs
    clients: list[procs.ManagedProcess] = []
    outs = [tmp_path / f"p{i}.jsonl" for i in range(n)]
    try:
        for i in range(n):
            clients.append(_start_client(fault_cluster, f"p{i}", outs[i], ttl))
        deadline = time.monotonic() + 60
        while not all(_acknowledged(o) for o in outs):
            dead = [c for c in clients if not c.alive()]
            assert not dead, f"client died before allocating: {dead[0].log_tail()}"
            assert time.monotonic() < deadline, "clients did not all allocate within 60 s"
            time.sleep(0.2)
        # Let them renew a few times: the leases must have been kept alive past one TTL.
        time.sleep(ttl + 1.0)
        killed_at = time.monotonic()
        for c in clients:
            c.kill()
        held_at_kill = read_allocations(etcd3.urls, fault_cluster.prefix or "")
        if with_etcd_leader_kill:
            leader = etcd3.leader()
            etcd3.kill(leader)
            time.sleep(1.0)
            etcd3.restart(leader)
    finally:
        for c in clients:
            c.kill()
    bound = ttl + ELECTION_TIMEOUT_MS / 1000 + 5.0
    left = wait_quiet(lambda: read_allocations(etcd3.urls, fault_cluster.prefix or ""), bound + 30.0, 0.2)
    freed_after = time.monotonic() - killed_at
    history = History([op for o in outs for op in History.load(o).ops])
    history.dump(tmp_path / "history.jsonl")
    acked = {o.allocation_id for o in history.ops if o.kind == "allocate" and o.outcome == "ok"}
    # Every acknowledged allocation was held when its client died (nobody released it) and then
    # expired as it should: declared expired; anything still held is a leak.
    violations = check(history, final_allocations=held_at_kill, quiet_leaked=left, expired=acked)
    print(f"\n[client crash, etcd leader kill={with_etcd_leader_kill}] {len(acked)} allocations held at the kill; "
          f"all GPUs free {freed_after:.1f}s after it (bound {bound:.1f}s)")  # fmt: skip
    figures = {"freed_after_s": freed_after, "bound_s": bound, "held": len(held_at_kill),
               "violations": [v.detail for v in violations]}  # fmt: skip
    (tmp_path / "figures.json").write_text(json.dumps(figures))
    assert violations == [], summary(violations)
    assert set(held_at_kill) >= acked, "an allocation was gone before its client was killed"
    assert freed_after <= bound, f"GPUs still held {freed_after:.1f}s after the clients died (bound {bound:.1f}s)"
