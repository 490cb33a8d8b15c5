"""Table tests of preemption's pure decision (coordinator/preemption_plan.py): who may be chosen for
which cause, the minimal victim set on one node, the node chosen, the reasons, the GPUs claimed for
the preemptor; and a property test that simulates random sequences and finds no A->B->A cycle."""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import pytest

from gpulease.coordinator.domain import GpuInfo, NodeInfo, NodeView, PendingRequest, ResourceRequest, Snapshot
from gpulease.coordinator.placement import place
from gpulease.coordinator.preemption_plan import (
    Candidate,
    Cause,
    NoPreemption,
    Preemption,
    borrowed_ids,
    claimed_gpus,
    hold_claims,
    plan_preemption,
    tenant_usage,
)
from gpulease.errors import InsufficientResources, Unsatisfiable

NOW = 1_000_000_000


def node(name: str, gpus: int, cpus: int = 64) -> NodeView:
    info = NodeInfo(
        name, "addr", tuple(GpuInfo(i, f"{name}-{i}", "A100", 80 << 30) for i in range(gpus)), cpus, 1 << 40
    )
    return NodeView(info, up=True, record_revision=1)


def alloc(id_: str, node_: str, gpus: Sequence[int], *, tenant: str = "t", priority: int = 0, age: int = 100,
          preemptible: bool = True, min_runtime: int = 0, cpus: int = 1) -> Candidate:  # fmt: skip
    return Candidate(id_, node_, frozenset(gpus), cpus, 1, tenant, priority, preemptible, NOW - age * 1000, min_runtime)


def snap(views: Sequence[NodeView], allocs: Sequence[Candidate]) -> Snapshot:
    """The nodes with what the allocations hold."""
    out = {}
    for v in views:
        mine = [a for a in allocs if a.node == v.name]
        out[v.name] = replace(
            v,
            gpus_held=frozenset(i for a in mine for i in a.gpus),
            cpus_used=sum(a.cpus for a in mine),
            memory_used=sum(a.memory_bytes for a in mine),
        )
    return Snapshot(10, out)


def want(gpus: int, *, priority: int = 0, tenant: str = "t", cpus: int = 1) -> PendingRequest:
    return PendingRequest("req", "p/req", ResourceRequest(gpus=gpus, cpus=cpus, memory_bytes=1), ttl_s=10,
                          tenant=tenant, priority=priority, created_ms=NOW)  # fmt: skip


def decide(views: Sequence[NodeView], allocs: Sequence[Candidate], request: PendingRequest,
           nominal: Mapping[str, int] | None = None, claimed: frozenset[tuple[str, int]] = frozenset(),
           ) -> Preemption | NoPreemption:  # fmt: skip
    return plan_preemption(snap(views, allocs), request, allocs, now_ms=NOW, nominal=nominal, claimed=claimed)


def test_a_lower_priority_allocation_is_preempted_for_priority() -> None:
    allocs = [alloc("low", "n", [0, 1], priority=-1), alloc("same", "n", [2, 3], priority=5)]
    assert decide([node("n", 4)], allocs, want(2, priority=5)) == Preemption("n", ("low",), Cause.PRIORITY, (0, 1))


def test_equal_or_higher_priority_is_never_preempted_for_priority() -> None:
    allocs = [alloc("eq", "n", [0, 1], priority=5), alloc("hi", "n", [2, 3], priority=9)]
    d = decide([node("n", 4)], allocs, want(2, priority=5))
    assert d == NoPreemption("no preemptible allocation of lower priority frees room for 2 GPUs, 1 CPU, "
                             "1 bytes of memory on one node")  # fmt: skip


def test_protected_allocations_are_never_chosen_and_the_reason_counts_them() -> None:
    allocs = [alloc("pinned", "n", [0, 1], preemptible=False), alloc("young", "n", [2, 3], age=10, min_runtime=60)]
    d = decide([node("n", 4)], allocs, want(2, priority=5))
    assert isinstance(d, NoPreemption)
    assert d.reason.endswith("(protected: 1 not preemptible, 1 within their minimum runtime)")
    # Once past its minimum runtime, the young one may go.
    older = [allocs[0], replace(allocs[1], created_ms=NOW - 60_000)]
    assert decide([node("n", 4)], older, want(2, priority=5)) == Preemption("n", ("young",), Cause.PRIORITY, (2, 3))


def test_lowest_priority_then_youngest_first() -> None:
    allocs = [alloc("p1-old", "n", [0], priority=1, age=500), alloc("p1-new", "n", [1], priority=1, age=5),
              alloc("p0", "n", [2], priority=0, age=900), alloc("p2", "n", [3], priority=2)]  # fmt: skip
    d = decide([node("n", 4)], allocs, want(2, priority=5))
    assert isinstance(d, Preemption) and d.victims == ("p0", "p1-new") and d.gpu_indexes == (1, 2)


def test_the_victim_set_is_minimal() -> None:
    # Greedy takes "tiny" (lowest priority) first, then "big"; "big" alone is enough, so "tiny" stays.
    allocs = [alloc("tiny", "n", [0], priority=-10), alloc("big", "n", [1, 2], priority=-5)]
    d = decide([node("n", 3)], allocs, want(2, priority=0))
    assert d == Preemption("n", ("big",), Cause.PRIORITY, (1, 2))


def test_victims_must_free_room_on_one_node() -> None:
    allocs = [alloc("x0", "x", [0], priority=-1), alloc("y0", "y", [0], priority=-1)]
    d = decide([node("x", 1), node("y", 1)], allocs, want(2))
    assert isinstance(d, NoPreemption) and "frees room for 2 GPUs" in d.reason and "on one node" in d.reason


def test_cpus_count_too() -> None:
    # The request needs 8 of the node's 8 CPUs: the GPU-less CPU hog must go as well.
    allocs = [alloc("gpu", "n", [0], priority=-1), alloc("cpu-hog", "n", [], priority=-1, cpus=7)]
    d = decide([node("n", 1, cpus=8)], allocs, want(1, cpus=8))
    assert d == Preemption("n", ("cpu-hog", "gpu"), Cause.PRIORITY, (0,))


def test_the_cheapest_node_wins_with_a_name_tie_break() -> None:
    allocs = [alloc("x-p3", "x", [0, 1], priority=3), alloc("y-p1", "y", [0, 1], priority=1),
              alloc("z-p1a", "z", [0], priority=1), alloc("z-p1b", "z", [1], priority=1)]  # fmt: skip
    views = [node("x", 2), node("y", 2), node("z", 2)]
    # Lowest highest-victim priority (y or z), then fewest victims (y).
    assert decide(views, allocs, want(2, priority=5)) == Preemption("y", ("y-p1",), Cause.PRIORITY, (0, 1))
    twins = [alloc("b", "b", [0]), alloc("a", "a", [0])]
    assert decide([node("b", 1), node("a", 1)], twins, want(1, priority=1)) == Preemption(
        "a", ("a",), Cause.PRIORITY, (0,)
    )


def test_it_fits_without_preemption() -> None:
    d = decide([node("n", 2)], [alloc("a", "n", [0], priority=-9)], want(1, priority=9))
    assert d == NoPreemption("fits without preemption (on n)")


def test_borrowed_is_counted_oldest_first() -> None:
    allocs = [alloc("old", "n", [0, 1], tenant="a", age=300), alloc("mid", "n", [2], tenant="a", age=200),
              alloc("new", "n", [3], tenant="a", age=100), alloc("free", "m", [0, 1, 2], tenant="nq")]  # fmt: skip
    assert borrowed_ids(allocs, {"a": 2}) == {"mid", "new"}
    assert borrowed_ids(allocs, {"a": 3}) == {"new"}
    assert borrowed_ids(allocs, {"a": 4}) == frozenset()
    assert tenant_usage(allocs) == {"a": 4, "nq": 3}


def test_a_tenant_under_quota_reclaims_borrowed_gpus_whatever_their_priority() -> None:
    # Tenant a: nominal 2, uses 4; its younger allocation is borrowed. b: nominal 4, uses 0.
    allocs = [alloc("a-old", "n", [0, 1], tenant="a", priority=9, age=300),
              alloc("a-new", "n", [2, 3], tenant="a", priority=9, age=100)]  # fmt: skip
    d = decide([node("n", 4)], allocs, want(2, tenant="b"), nominal={"a": 2, "b": 4})
    assert d == Preemption("n", ("a-new",), Cause.RECLAIM, (2, 3))


def test_no_reclaim_past_the_reclaimer_quota_nor_from_a_tenant_within_its_own() -> None:
    allocs = [alloc("a-old", "n", [0, 1], tenant="a", priority=9, age=300),
              alloc("a-new", "n", [2, 3], tenant="a", priority=9, age=100)]  # fmt: skip
    # b would exceed its nominal quota (1 + 2 > 2) with it.
    mine = [*allocs, alloc("b", "m", [0], tenant="b")]
    over = decide([node("n", 4), node("m", 1)], mine, want(2, tenant="b"), nominal={"a": 2, "b": 2})
    assert isinstance(over, NoPreemption) and "borrowed" not in over.reason
    # a holds no more than its nominal quota: nothing is borrowed.
    within = decide([node("n", 4)], allocs, want(2, tenant="b"), nominal={"a": 4, "b": 4})
    assert isinstance(within, NoPreemption)
    assert within.reason.startswith("no preemptible allocation of lower priority and none borrowed by another tenant")
    # A tenant without quota never reclaims.
    assert isinstance(decide([node("n", 4)], allocs, want(2, tenant="c"), nominal={"a": 2}), NoPreemption)


def test_another_tenant_guaranteed_gpus_are_not_taken_by_priority() -> None:
    allocs = [alloc("a", "n", [0, 1], tenant="a", priority=0)]
    d = decide([node("n", 2)], allocs, want(2, tenant="b", priority=9), nominal={"a": 2, "b": 4})
    assert isinstance(d, NoPreemption) and d.reason.endswith("(protected: 1 within their tenant's nominal quota)")
    # Without quotas, priority alone decides.
    assert decide([node("n", 2)], allocs, want(2, tenant="b", priority=9)) == Preemption(
        "n", ("a",), Cause.PRIORITY, (0, 1)
    )


def test_a_borrowing_tenant_takes_no_other_tenant_work_by_priority_but_may_take_its_own() -> None:
    allocs = [alloc("a-borrowed", "n", [0, 1], tenant="a", priority=0), alloc("b-own", "m", [0, 1], tenant="b")]
    views = [node("n", 2), node("m", 2)]
    # b has quota 3 and uses 2: with 2 more it would borrow, so a's borrowed GPUs are off limits...
    d = decide(views, allocs, want(2, tenant="b", priority=9), nominal={"a": 0, "b": 3})
    assert d == Preemption("m", ("b-own",), Cause.PRIORITY, (0, 1))
    alone = decide(views[:1], allocs[:1], want(2, tenant="b", priority=9), nominal={"a": 0, "b": 1})
    assert isinstance(alone, NoPreemption)
    assert "1 of other tenants, while tenant 'b' would exceed its nominal quota (0 + 2 > 1 GPUs)" in alone.reason
    # ...while within its quota it may take them: by reclaim (reclaim ranks first on a tie).
    ok = decide(views[:1], allocs[:1], want(2, tenant="b", priority=9), nominal={"a": 0, "b": 2})
    assert ok == Preemption("n", ("a-borrowed",), Cause.RECLAIM, (0, 1))


def test_borrowed_allocations_go_first_then_lowest_priority() -> None:
    # t's nominal quota is 1: the older allocation is guaranteed, the younger one borrowed. The
    # borrowed one goes first although its priority is higher.
    allocs = [alloc("guaranteed", "n", [0], priority=-5, age=900), alloc("borrowed", "n", [1], priority=0, age=800)]
    d = decide([node("n", 2)], allocs, want(1, priority=1), nominal={"t": 1})
    assert d == Preemption("n", ("borrowed",), Cause.PRIORITY, (1,))
    # Without a quota nothing is borrowed: the lowest priority goes.
    assert decide([node("n", 2)], allocs, want(1, priority=1)) == Preemption("n", ("guaranteed",), Cause.PRIORITY, (0,))


def test_claimed_gpus_stay_held_for_their_preemptor() -> None:
    allocs = [alloc("low", "n", [0, 1], priority=-2), alloc("other", "n", [2, 3], priority=-1)]
    first = decide([node("n", 4)], allocs, want(2, priority=5))
    assert first == Preemption("n", ("low",), Cause.PRIORITY, (0, 1))
    assert claimed_gpus(first) == {("n", 0), ("n", 1)}
    # While "low" stops, another preemptor neither counts on its GPUs nor takes them.
    second = decide([node("n", 4)], allocs, want(2, priority=5), claimed=claimed_gpus(first))
    assert second == Preemption("n", ("other",), Cause.PRIORITY, (2, 3))
    assert isinstance(decide([node("n", 4)], allocs, want(3, priority=5), claimed=claimed_gpus(first)), NoPreemption)
    # Once "low" is gone its GPUs look free; with the claim held, nobody else gets them.
    gone = snap([node("n", 4)], allocs[1:])
    held = hold_claims(gone, claimed_gpus(first))
    assert held.nodes["n"].gpus_held == {0, 1, 2, 3} and gone.nodes["n"].gpus_held == {2, 3}
    with pytest.raises(InsufficientResources):
        place(held, ResourceRequest(1, 1, 1))
    assert place(gone, ResourceRequest(2, 1, 1)).gpu_indexes == (0, 1)  # the preemptor's own view


def test_fair_share_is_a_cause_name_only() -> None:
    assert [c.value for c in Cause] == ["priority", "reclaim", "fair-share"]


@dataclass(frozen=True)
class Job:
    """A piece of work; re-queued after preemption with the same priority and tenant."""

    id: str
    tenant: str
    priority: int
    gpus: int
    cpus: int
    preemptible: bool
    min_runtime_s: int


@dataclass
class Sim:
    views: list[NodeView]
    nominal: dict[str, int]
    now_ms: int = NOW
    seq: int = 0
    running: dict[str, tuple[Candidate, Job]] = field(default_factory=dict)
    pending: list[Job] = field(default_factory=list)
    # (preemptor allocation id, victim job id)
    preempted: set[tuple[str, str]] = field(default_factory=set)
    preemptions: int = 0
    log: list[tuple[str, tuple[str, ...], Cause]] = field(default_factory=list)
    jobs: int = 0

    def arrive(self, tenant: str, priority: int, gpus: int, cpus: int, preemptible: bool, min_runtime: int) -> None:
        self.pending.append(Job(f"j{self.jobs:02d}", tenant, priority, gpus, cpus, preemptible, min_runtime))
        self.jobs += 1

    def allocs(self) -> list[Candidate]:
        return [c for c, _ in self.running.values()]

    def admit(self, job: Job, node_: str, gpus: Sequence[int]) -> str:
        self.seq += 1
        self.now_ms += 1  # every allocation is younger than those before it
        alloc_id = f"{job.id}#{self.seq}"
        c = Candidate(alloc_id, node_, frozenset(gpus), job.cpus, 1, job.tenant, job.priority, job.preemptible,
                      self.now_ms, job.min_runtime_s)  # fmt: skip
        self.running[alloc_id] = (c, job)
        return alloc_id

    def step(self) -> None:
        queue, self.pending = sorted(self.pending, key=lambda j: (-j.priority, j.id)), []
        for job in queue:
            allocs = self.allocs()
            snapshot = snap(self.views, allocs)
            req = PendingRequest(job.id, f"p/{job.id}", ResourceRequest(job.gpus, job.cpus, 1), ttl_s=10,
                                 tenant=job.tenant, priority=job.priority)  # fmt: skip
            try:
                p = place(snapshot, req.req)
            except (InsufficientResources, Unsatisfiable):
                pass
            else:
                self.admit(job, p.node, p.gpu_indexes)
                continue
            d = plan_preemption(snapshot, req, allocs, now_ms=self.now_ms, nominal=self.nominal)
            if isinstance(d, NoPreemption):
                assert not d.reason.startswith("fits")
                self.pending.append(job)
                continue
            self.check(snapshot, req, allocs, d)
            for v in d.victims:
                _, victim_job = self.running.pop(v)
                # No cycle: the victim allocation never preempted this job before.
                assert (v, job.id) not in self.preempted, f"{v} preempted {job.id}, now {job.id} preempts it"
                self.pending.append(victim_job)
            free_now = snap(self.views, self.allocs()).nodes[d.node]
            assert set(d.gpu_indexes) <= free_now.free_indexes
            new_id = self.admit(job, d.node, d.gpu_indexes)
            self.preempted |= {(new_id, v.partition("#")[0]) for v in d.victims}
            self.preemptions += 1
            self.log.append((job.id, tuple(v.partition("#")[0] for v in d.victims), d.cause))

    def check(self, snapshot: Snapshot, req: PendingRequest, allocs: list[Candidate], d: Preemption) -> None:
        by_id = {c.alloc_id: c for c in allocs}
        victims = [by_id[v] for v in d.victims]
        borrowed = borrowed_ids(allocs, self.nominal)
        used = tenant_usage(allocs).get(req.tenant, 0)
        within = req.tenant not in self.nominal or used + req.req.gpus <= self.nominal[req.tenant]
        for v in victims:
            assert v.node == d.node and v.preemptible
            assert self.now_ms - v.created_ms >= v.min_runtime_s * 1000
            if d.cause is Cause.PRIORITY:
                assert v.priority < req.priority
                if v.tenant != req.tenant:
                    assert within and (v.alloc_id in borrowed or v.tenant not in self.nominal)
            else:
                assert d.cause is Cause.RECLAIM
                assert req.tenant in self.nominal and used + req.req.gpus <= self.nominal[req.tenant]
                assert v.tenant != req.tenant and v.alloc_id in borrowed
                assert tenant_usage(allocs)[v.tenant] > self.nominal[v.tenant]
        # Minimal: without any one victim, the request does not fit on the node.
        view = snapshot.nodes[d.node]
        for left_out in victims:
            rest = [v for v in victims if v is not left_out]
            trial = replace(
                view,
                gpus_held=view.gpus_held - {i for v in rest for i in v.gpus},
                cpus_used=view.cpus_used - sum(v.cpus for v in rest),
                memory_used=view.memory_used - sum(v.memory_bytes for v in rest),
            )
            with pytest.raises((InsufficientResources, Unsatisfiable)):
                place(Snapshot(snapshot.revision, {d.node: trial}), req.req)


def run(sim: Sim, events: Sequence[tuple[str, int, int, int, bool, int] | int | str]) -> None:
    """Each event (a job arriving, an int picking a running allocation that ends, or the id of
    one that ends), then a step of the queue."""
    for ev in events:
        if isinstance(ev, str):
            del sim.running[ev]
        elif isinstance(ev, int):
            if sim.running:
                del sim.running[sorted(sim.running)[ev % len(sim.running)]]
        else:
            sim.arrive(*ev)
        sim.now_ms += 1000
        sim.step()


def test_a_borrower_may_not_preempt_by_priority_what_would_reclaim_it_back() -> None:
    # b (nominal 1) runs j00 (guaranteed) and j01 (borrowed); a (nominal 0) asks with priority 5.
    # Were a, borrowing, allowed to take j01 by priority, then once j00 ended (and c, waiting with
    # priority 1, took its GPU), j01's re-queued request (b back within its quota) would reclaim
    # a's job: a -> b -> a.
    sim = Sim([node("n", 2)], {"a": 0, "b": 1})
    run(sim, [("b", 0, 1, 1, True, 0), ("b", 0, 1, 1, True, 0), ("a", 5, 1, 1, True, 0), ("c", 1, 1, 1, True, 0)])
    # c (no quota) took the borrowed j01 instead; a waits.
    assert sim.log == [("j03", ("j01",), Cause.PRIORITY)] and [j.id for j in sim.pending] == ["j02", "j01"]
    # j00 ends: j02 starts there, borrowing; j01 (b now within its quota) reclaims it, which is no
    # cycle: j02 never preempted j01.
    run(sim, ["j00#1"])
    assert sim.log[1:] == [("j01", ("j02",), Cause.RECLAIM)]


HAVE_HYPOTHESIS = importlib.util.find_spec("hypothesis") is not None

if HAVE_HYPOTHESIS:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    TENANTS = ("a", "b", "c")

    # Small clusters and few values, so that the cluster is full, quotas are passed and priorities
    # differ often: (tenant, priority, GPUs, CPUs, preemptible, min runtime).
    jobs = st.tuples(
        st.sampled_from(TENANTS),
        st.integers(0, 2),
        st.integers(1, 2) | st.integers(1, 3),
        st.integers(1, 2),
        st.sampled_from((True, True, True, False)),
        st.sampled_from((0, 0, 0, 2)),
    )
    # Mostly arrivals (a job), sometimes an allocation ends (an int picks which).
    events = st.lists(st.one_of(jobs, jobs, st.integers(0, 50)), min_size=5, max_size=60)

    @settings(max_examples=400, deadline=None, database=None)
    @given(
        gpus_per_node=st.lists(st.integers(1, 3), min_size=1, max_size=3),
        quotas=st.tuples(*(st.none() | st.integers(0, 3) for _ in TENANTS)),
        steps=events,
    )
    def test_random_sequences_never_preempt_back(
        gpus_per_node: list[int],
        quotas: tuple[int | None, ...],
        steps: list[tuple[str, int, int, int, bool, int] | int],
    ) -> None:
        nominal = {t: q for t, q in zip(TENANTS, quotas, strict=True) if q is not None}
        sim = Sim([node(f"n{i}", g, cpus=6) for i, g in enumerate(gpus_per_node)], nominal)
        run(sim, steps)  # Sim.step asserts the rules, minimality and that no preemption goes back

    @settings(max_examples=50, deadline=None, database=None)
    @given(seed=st.integers(0, 2**32 - 1))
    def test_long_random_runs_never_preempt_back(seed: int) -> None:
        """50 runs of 200 steps: random nodes, quotas, arrivals and endings (10,000 steps)."""
        rnd = random.Random(seed)
        tenants = TENANTS[: rnd.randint(2, 3)]
        nominal = {t: rnd.randint(0, 4) for t in tenants if rnd.random() < 0.8}
        sim = Sim([node(f"n{i}", rnd.randint(1, 4), cpus=6) for i in range(rnd.randint(1, 3))], nominal)
        for _ in range(200):
            if sim.running and rnd.random() < 0.3:
                del sim.running[rnd.choice(sorted(sim.running))]
            if rnd.random() < 0.7:
                sim.arrive(rnd.choice(tenants), rnd.randint(0, 3), rnd.randint(1, 3), rnd.randint(1, 2),
                           rnd.random() < 0.85, rnd.choice((0, 0, 2)))  # fmt: skip
            sim.now_ms += 1000
            sim.step()
            # Requests beyond the 8 newest give up (their wait ran out), as clients do.
            sim.pending = sorted(sim.pending, key=lambda j: int(j.id[1:]))[-8:]
else:

    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_random_sequences_never_preempt_back() -> None:
        pass

    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_long_random_runs_never_preempt_back() -> None:
        pass
