"""Table tests of the queue's pure decisions (coordinator/queue_plan.py): order, pools, backfill
with a head reservation, strict FIFO, and the reasons."""

from __future__ import annotations

from dataclasses import replace

from gpulease.coordinator.domain import GpuInfo, NodeInfo, NodeView, PendingRequest, ResourceRequest, Snapshot
from gpulease.coordinator.queue_plan import Admit, Holder, Wait, ends_ms, order, plan

NOW = 1_000_000_000
A100, H100 = "A100", "H100"


def node(name: str, gpus: int, held: int = 0, model: str = A100) -> NodeView:
    info = NodeInfo(name, "addr", tuple(GpuInfo(i, f"{name}-{i}", model, 80 << 30) for i in range(gpus)), 64, 1 << 40)
    return NodeView(info, up=True, record_revision=1, gpus_held=frozenset(range(held)))


def snap(*views: NodeView) -> Snapshot:
    return Snapshot(10, {v.name: v for v in views})


def pending(id_: str, gpus: int, *, model: str = "", priority: int = 0, age: int = 0, tenant: str = "t",
            runtime: int = 0) -> PendingRequest:  # fmt: skip
    req = ResourceRequest(gpus=gpus, cpus=1, memory_bytes=1, gpu_model=model)
    return PendingRequest(id_, f"p/{id_}", req, ttl_s=10, tenant=tenant, priority=priority,
                          created_ms=NOW - age * 1000, max_runtime_s=runtime)  # fmt: skip


def test_order_is_priority_then_fair_share_then_age() -> None:
    entries = [pending("old", 1, age=50), pending("new", 1, age=1), pending("vip", 1, priority=10),
               pending("rich-old", 1, age=99, tenant="rich")]  # fmt: skip
    assert [e.id for e in order(entries, {"rich": 8.0, "t": 1.0})] == ["vip", "old", "new", "rich-old"]


def test_admits_in_order_while_things_fit_and_explains_the_rest() -> None:
    decisions = plan(snap(node("n", 4, held=1)), [pending("a", 2, age=3), pending("b", 1, age=2),
                                                  pending("c", 1, age=1)], now_ms=NOW)  # fmt: skip
    assert isinstance(decisions["a"], Admit) and isinstance(decisions["b"], Admit)
    c = decisions["c"]
    assert isinstance(c, Wait) and c.position == 3
    assert c.reason == "behind 2 earlier request(s) admitted ahead of it"


def test_a_blocked_head_reserves_the_node_that_frees_first_and_backfill_must_end_before() -> None:
    views = snap(node("x", 4, held=3), node("y", 4, held=2))
    holders = {"x": [Holder("hx", frozenset({0, 1, 2}), 1, 1, ends_ms(NOW, 100, 10))],
               "y": [Holder("hy", frozenset({0, 1}), 1, 1, ends_ms(NOW, 50, 10))]}  # fmt: skip
    entries = [pending("big", 4, age=10), pending("free-rider", 1, age=5), pending("short", 1, age=4, runtime=20),
               pending("long", 1, age=3, runtime=500)]  # fmt: skip
    d = plan(views, entries, now_ms=NOW, holders=lambda n: holders[n])
    big = d["big"]
    assert isinstance(big, Wait) and big.reserved_node == "y" and big.estimated_start_ms == NOW + 60_000
    assert "y is reserved for it" in big.reason and "an estimate" in big.reason
    # No runtime: only the unreserved node x. A short one may use y; a long one may not.
    assert d["free-rider"] == Admit(frozenset({"y"}), 2)
    assert d["short"] == Admit(frozenset(), 3)  # ends at NOW + 30 s, before the start at NOW + 60 s
    long = d["long"]
    assert isinstance(long, Wait) and long.reason.startswith("held for request big (starvation protection)")


def test_with_an_unknown_start_nothing_backfills_into_the_reservation() -> None:
    views = snap(node("x", 4, held=3))
    holders = [Holder("h", frozenset({0, 1, 2}), 1, 1, None)]
    d = plan(views, [pending("big", 4, age=10), pending("tiny", 1, runtime=1)], now_ms=NOW, holders=lambda n: holders)
    big, tiny = d["big"], d["tiny"]
    assert isinstance(big, Wait) and big.estimated_start_ms is None and "no estimated start" in big.reason
    assert isinstance(tiny, Wait) and "starvation protection" in tiny.reason


def test_pools_do_not_block_each_other() -> None:
    views = snap(node("a", 2, held=2, model=A100), node("h", 2, model=H100))
    d = plan(views, [pending("a-head", 1, model=A100, age=9), pending("h", 1, model=H100, age=1)], now_ms=NOW)
    assert isinstance(d["a-head"], Wait) and d["h"] == Admit(frozenset(), 1)


def test_strict_fifo_stops_a_pool_at_its_blocked_head() -> None:
    views = snap(node("x", 4, held=3))
    entries = [pending("big", 4, age=10), pending("small", 1, age=1, runtime=1)]
    relaxed = plan(views, entries, now_ms=NOW)
    strict = plan(views, entries, now_ms=NOW, strict_fifo=True)
    assert isinstance(relaxed["big"], Wait) and isinstance(strict["small"], Wait)
    assert strict["small"].reason == "behind request big (strict FIFO in pool 'any model')"  # type: ignore[union-attr]


def test_a_request_larger_than_any_node_says_so() -> None:
    d = plan(snap(node("x", 2)), [pending("huge", 3)], now_ms=NOW)
    huge = d["huge"]
    assert isinstance(huge, Wait) and "can ever fit 3 GPUs" in huge.reason


def test_a_request_over_its_quota_waits_with_the_quota_and_does_not_block_its_pool() -> None:
    from gpulease.coordinator.quota import Quota, QuotaBook, Usage

    book = QuotaBook({"capped": (Quota(gpus=2), 5)}, {"capped": Usage(2, {A100: 2})})
    views = Snapshot(10, snap(node("n", 4, held=2)).nodes, book)
    entries = [pending("capped-head", 1, age=9, tenant="capped"), pending("other", 2, age=1, tenant="free")]
    d = plan(views, entries, now_ms=NOW)
    head = d["capped-head"]
    assert isinstance(head, Wait) and head.reason == "quota: capped uses 2 of 2 GPUs (asks for 1)"
    assert head.reserved_node == ""  # no reservation: it could not start on an empty cluster either
    assert d["other"] == Admit(frozenset(), 2)


def test_requests_admitted_in_one_pass_count_against_their_tenants_quota() -> None:
    from gpulease.coordinator.quota import Quota, QuotaBook

    book = QuotaBook({"t": (Quota(gpus=3, models={A100: 2}), 5)})
    views = Snapshot(10, snap(node("n", 8)).nodes, book)
    d = plan(views, [pending("a", 2, age=3), pending("b", 1, age=2), pending("c", 1, age=1)], now_ms=NOW)
    assert isinstance(d["a"], Admit)
    # "b" names no model: it is checked against the A100 quota with the GPUs placement chose.
    b, c = d["b"], d["c"]
    assert isinstance(b, Wait) and b.reason == "quota: t uses 2 of 2 A100 (asks for 1)"
    assert isinstance(c, Wait) and c.reason == "quota: t uses 2 of 2 A100 (asks for 1)"


def test_fair_share_orders_tenants_by_usage_per_weight() -> None:
    # Equal priority: the tenant with less decayed usage per unit of weight goes first, whatever the age.
    entries = [pending("heavy", 1, age=90, tenant="heavy"), pending("light", 1, age=1, tenant="light")]
    assert [e.id for e in order(entries, {"heavy": 300.0, "light": 100.0})] == ["light", "heavy"]
    # Weighted 1:3, 300 GPU-s for the weight-3 tenant is 100 per unit: it ties, and age decides.
    assert [e.id for e in order(entries, {"heavy": 300.0 / 3, "light": 100.0})] == ["heavy", "light"]


def test_gpus_freed_at_once_are_shared_by_fair_share_within_one_pass() -> None:
    # Equal standing, 4 free GPUs, each tenant with 4 requests: 2 each, not 4 to whoever was first.
    entries = [pending(f"{t}{i}", 1, age=10 - i, tenant=t) for t in ("a", "b") for i in range(4)]
    d = plan(snap(node("n", 4)), entries, now_ms=NOW, shares={"a": 0.0, "b": 0.0})
    admitted = sorted(i for i, x in d.items() if isinstance(x, Admit))
    assert admitted == ["a0", "a1", "b0", "b1"]
    # Weighted 1:3 and equal usage so far: b gets 3 of the 4 (each admission adds 1/weight).
    d = plan(snap(node("n", 4)), entries, now_ms=NOW, shares={"a": 0.0, "b": 0.0}, weights={"a": 1.0, "b": 3.0})
    assert sorted(i for i, x in d.items() if isinstance(x, Admit)) == ["a0", "b0", "b1", "b2"]


def test_reasons_name_higher_priority_requests_ahead_and_nodes_down_or_cordoned() -> None:
    # Two free GPUs, taken by the higher-priority request: the next one says what is ahead of it.
    d = plan(snap(node("n", 4, held=2)), [pending("vip", 2, priority=100, age=1), pending("me", 2, age=9)], now_ms=NOW)
    me = d["me"]
    assert isinstance(d["vip"], Admit) and isinstance(me, Wait)
    assert me.reason == "behind 1 request(s) admitted ahead of it (1 of higher priority)"
    # The only nodes that could hold it are down or cordoned: the reason says so, not "busy".
    down = NodeView(node("d", 8).info, up=False, record_revision=1)
    cordoned = NodeView(replace(node("c", 8).info, cordoned=True), up=True, record_revision=1)
    d = plan(snap(down, cordoned, node("small", 2)), [pending("big", 4)], now_ms=NOW)
    big = d["big"]
    assert isinstance(big, Wait)
    assert "every node that could fit it is down, cordoned or restarting" in big.reason, big.reason
