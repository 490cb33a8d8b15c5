"""Fixtures of the fault suite: a real 3-member etcd cluster per test module, a LocalCluster of 2
coordinators on it (a fresh prefix per test) with agents of simulated GPUs, the scale of the run,
and `Scenario`, which runs a storm, finishes it (final read, release, quiet period), checks the
history and dumps it (and its figures) into the test's tmp dir.

Scale: bounded by default (every scenario in a few minutes in all on 2 cores);
GPULEASE_FAULTS_LONG=1 selects the long version (more clients, operations, faults, time).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gpulease.dev.cluster import LocalCluster
from tests.faults.etcd_cluster import EtcdCluster
from tests.faults.history import History, Violation, check, summary
from tests.faults.storm import StormResult, read_allocations, release_all, run_storm, wait_quiet
from tests.support import harness

LONG = os.environ.get("GPULEASE_FAULTS_LONG", "") not in ("", "0")

AGENTS = 2
GPUS_PER_AGENT = 8
# Longer than any fault here, so nodes stay up while their coordinator or etcd is down: the
# scenarios are about allocations, not node liveness.
NODE_TTL = 60
# Allocation TTL of the storms: longer than the quiet period, so an allocation nobody was told
# of and nobody settled is still there to be reported as a leak when the quiet period ends.
STORM_TTL = 30
# After release-all: settle_timeout (5 s) + a settler sweep (every 10 s) + slack.
QUIET_S = 18.0


@dataclass(frozen=True)
class Scale:
    clients: int
    duration_s: float
    max_ops: int
    kills: int
    long: bool


@pytest.fixture(scope="session")
def scale() -> Scale:
    if LONG:
        return Scale(clients=48, duration_s=90.0, max_ops=20000, kills=6, long=True)
    return Scale(clients=16, duration_s=14.0, max_ops=5000, kills=2, long=False)


@pytest.fixture(scope="module")
def etcd_members(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with EtcdCluster(tmp_path_factory.mktemp("etcd3")) as cluster:
        yield cluster


@pytest.fixture
def etcd3(etcd_members: EtcdCluster) -> EtcdCluster:
    """The module's etcd cluster, whole again: members an earlier test killed or paused are back."""
    for i in range(etcd_members.size):
        if i in etcd_members.paused:
            etcd_members.resume(i)
        proc = etcd_members.procs[i]
        if proc is None or not proc.alive():
            etcd_members.restart(i)
    etcd_members.wait_healthy(30)
    return etcd_members


@pytest.fixture
def fault_cluster(etcd3: EtcdCluster, tmp_path: Path) -> Iterator[LocalCluster]:
    """2 coordinators on the 3-member etcd, a fresh prefix, and AGENTS agents of GPUS_PER_AGENT
    simulated GPUs each (agent i reports to coordinator i % 2)."""
    cluster = LocalCluster(
        tmp_path / "cluster",
        etcd_url=etcd3.url_list,
        prefix=harness.new_prefix(),
        node_ttl=NODE_TTL,
        heartbeat_interval=2,
        startup_timeout=harness.STARTUP_TIMEOUT_S,
    )
    try:
        cluster.add_coordinator()
        cluster.add_coordinator()
        addresses = cluster.coordinator_addresses
        for i in range(AGENTS):
            cluster.add_agent(f"n{i}", GPUS_PER_AGENT, cpus=64, memory="512GiB", coordinator=addresses[i % 2])
        cluster.wait_nodes_up([f"n{i}" for i in range(AGENTS)])
        yield cluster
    finally:
        cluster.stop()


@dataclass
class Scenario:
    """One scenario's history, its storm and its ending. `finish()` does the ending every scenario
    shares and returns the violations (also written, with the history, into tmp)."""

    name: str
    tmp: Path
    cluster: LocalCluster
    etcd: EtcdCluster
    history: History = field(default_factory=History)
    stop: threading.Event = field(default_factory=threading.Event)
    figures: dict[str, Any] = field(default_factory=dict)
    result: StormResult | None = None

    @property
    def addresses(self) -> list[str]:
        return list(self.cluster.coordinator_addresses)

    @property
    def prefix(self) -> str:
        assert self.cluster.prefix is not None
        return self.cluster.prefix

    def read(self) -> dict[str, frozenset[str]]:
        return read_allocations(self.etcd.urls, self.prefix)

    def storm(self, **kw: Any) -> StormResult:
        kw.setdefault("ttl", STORM_TTL)
        self.result = run_storm(self.addresses, self.history, stop=self.stop, **kw)
        return self.result

    def storm_in_background(self, **kw: Any) -> threading.Thread:
        """The storm in a thread (join it, or set .stop); its result lands in .result."""
        errors: list[BaseException] = []

        def go() -> None:
            try:
                self.storm(**kw)
            except BaseException as e:
                errors.append(e)

        thread = threading.Thread(target=go, name=f"storm-{self.name}", daemon=True)
        thread.errors = errors  # type: ignore[attr-defined]
        thread.start()
        return thread

    def join_storm(self, thread: threading.Thread, timeout: float = 240.0) -> StormResult:
        thread.join(timeout)
        if thread.is_alive():
            self.stop.set()
            thread.join(60)
            raise AssertionError(f"the storm of {self.name} did not end within {timeout}s")
        errors: list[BaseException] = thread.errors  # type: ignore[attr-defined]
        if errors:
            raise errors[0]
        assert self.result is not None
        return self.result

    def finish(self, *, quiet_s: float = QUIET_S, expired: set[str] | None = None) -> list[Violation]:
        """Final read of etcd, release of what clients knew of and could not release, the quiet
        period, then the check. Needs every coordinator address to be serving (restart what the
        scenario stopped first). Dumps history.jsonl and figures.json into tmp."""
        result = self.result or StormResult()
        final_read_at = time.monotonic()
        final = self.read()
        release_all(self.addresses, sorted(result.unreleased), self.history)
        leaked = wait_quiet(self.read, quiet_s)
        expired_ids = set(result.expired) | (expired or set())
        violations = check(self.history, final_allocations=final, quiet_leaked=leaked, expired=expired_ids,
                           final_read_at=final_read_at)  # fmt: skip
        self.figures.update(
            ops=len(self.history),
            counts=self.history.counts(),
            allocate_attempts=result.allocate_attempts,
            cycles=result.cycles,
            expired=len(expired_ids),
            final_allocations=len(final),
            leaked=sorted(leaked),
            violations=[{"kind": v.kind, "detail": v.detail} for v in violations],
        )
        self.history.dump(self.tmp / "history.jsonl")
        (self.tmp / "figures.json").write_text(json.dumps(self.figures, indent=2, default=str))
        shown = {k: v for k, v in self.figures.items() if k != "violations"}
        print(f"\n[{self.name}] figures: {json.dumps(shown, default=str)}")
        if violations:
            print(f"[{self.name}] {summary(violations)}; history in {self.tmp / 'history.jsonl'}")
        return violations


@pytest.fixture
def scenario(request: pytest.FixtureRequest, fault_cluster: LocalCluster, etcd3: EtcdCluster,
             tmp_path: Path) -> Iterator[Scenario]:  # fmt: skip
    s = Scenario(request.node.name, tmp_path, fault_cluster, etcd3)
    try:
        yield s
    finally:
        s.stop.set()
        # Keep the evidence even when the test failed before finish().
        if not (tmp_path / "history.jsonl").exists():
            s.history.dump(tmp_path / "history.jsonl")
