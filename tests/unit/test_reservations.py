"""Table tests of calendar reservations' pure rule (coordinator/reservations.py) and of where it is
applied: batch placement (also through the placement index), the queue plan and its reasons, and
the choice of nodes at creation."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from gpulease.coordinator.batch_placement import place_batch
from gpulease.coordinator.domain import (
    GpuInfo,
    NodeInfo,
    NodeView,
    PendingRequest,
    Placement,
    Reservation,
    ReservationBook,
    ResourceRequest,
    Snapshot,
)
from gpulease.coordinator.placement_index import PlacementIndex
from gpulease.coordinator.queue_plan import Admit, Wait, plan
from gpulease.coordinator.reservations import blocked_gpus, choose_nodes, clock, reason, visible_to
from gpulease.errors import InsufficientResources, InvalidRequest

NOW = 1_800_000_000_000
HOUR = 3_600_000


def node(name: str, gpus: int, held: int = 0, model: str = "A100") -> NodeView:
    info = NodeInfo(name, "addr", tuple(GpuInfo(i, f"{name}-{i}", model, 80 << 30) for i in range(gpus)), 64, 1 << 40)
    return NodeView(info, up=True, record_revision=1, gpus_held=frozenset(range(held)))


def res(name: str, tenant: str, gpus: dict[str, int], *, start: int = NOW - HOUR, end: int = NOW + HOUR,
        model: str = "") -> Reservation:  # fmt: skip
    return Reservation(name, tenant, start, end, gpus, model)


def snap(views: list[NodeView], reservations: list[Reservation], held: dict[str, dict[str, int]] | None = None
         ) -> Snapshot:  # fmt: skip
    return Snapshot(10, MappingProxyType({v.name: v for v in views}), reservations=ReservationBook(
        tuple(reservations), held or {}))  # fmt: skip


@pytest.mark.parametrize(
    ("case", "views", "reservations", "held", "tenant", "now", "blocked"),
    [
        ("another tenant's active reservation withholds its GPUs, highest first",
         [node("n", 8)], [res("r", "b", {"n": 4})], {}, "a", NOW, {"n": {4, 5, 6, 7}}),
        ("the reserving tenant sees the node as it is",
         [node("n", 8)], [res("r", "b", {"n": 4})], {}, "b", NOW, {}),
        ("before the window nothing is withheld",
         [node("n", 8)], [res("r", "b", {"n": 4}, start=NOW + 1)], {}, "a", NOW, {}),
        ("at the end of the window nothing is withheld",
         [node("n", 8)], [res("r", "b", {"n": 4}, end=NOW)], {}, "a", NOW, {}),
        ("what the reserving tenant holds there counts toward its reservation",
         [node("n", 8, held=3)], [res("r", "b", {"n": 4})], {"n": {"b": 3}}, "a", NOW, {"n": {7}}),
        ("holding more than reserved withholds nothing",
         [node("n", 8, held=6)], [res("r", "b", {"n": 4})], {"n": {"b": 6}}, "a", NOW, {}),
        ("another tenant's holdings do not count toward it",
         [node("n", 8, held=3)], [res("r", "b", {"n": 4})], {"n": {"c": 3}}, "a", NOW, {"n": {4, 5, 6, 7}}),
        ("only free GPUs can be withheld",
         [node("n", 4, held=2)], [res("r", "b", {"n": 4})], {"n": {"c": 2}}, "a", NOW, {"n": {2, 3}}),
        ("two tenants' reservations on one node add up, by name",
         [node("n", 8)], [res("r2", "c", {"n": 2}), res("r1", "b", {"n": 3})], {}, "a", NOW, {"n": {3, 4, 5, 6, 7}}),
        ("a model withholds GPUs of that model only",
         [node("n", 2, model="H100"), node("m", 4)], [res("r", "b", {"n": 1, "m": 2}, model="A100")], {}, "a", NOW,
         {"m": {2, 3}}),
        ("a node the snapshot lacks is ignored",
         [node("n", 4)], [res("r", "b", {"gone": 4})], {}, "a", NOW, {}),
    ],
)  # fmt: skip
def test_what_a_reservation_withholds(case: str, views: list[NodeView], reservations: list[Reservation],
                                      held: dict[str, dict[str, int]], tenant: str, now: int,
                                      blocked: dict[str, set[int]]) -> None:  # fmt: skip
    s = snap(views, reservations, held)
    assert blocked_gpus(s, tenant, now) == {n: frozenset(i) for n, i in blocked.items()}, case
    seen = visible_to(s, tenant, now)
    if not blocked:
        assert seen is s, case
    for v in views:
        assert seen.nodes[v.name].gpus_held == v.gpus_held | frozenset(blocked.get(v.name, ())), case
        assert s.nodes[v.name] is v, "the snapshot itself is never changed"


def test_reason_names_tenant_end_and_reservation() -> None:
    s = snap([node("n", 4)], [res("train", "team-b", {"n": 4}, end=NOW + HOUR)])
    assert reason(s, "team-a", NOW) == f"reserved for team-b until {clock(NOW + HOUR)} (reservation train: 4 GPUs on n)"
    assert reason(s, "team-b", NOW) is None
    assert clock(0) == "00:00:00 UTC"


REQ = ResourceRequest(gpus=4, cpus=1, memory_bytes=1)


@pytest.mark.parametrize("use_index", [False, True])
def test_batch_placement_keeps_other_tenants_off_reserved_gpus(use_index: bool) -> None:
    views = [node("a", 4), node("b", 8)]
    s = snap(views, [res("r", "team-b", {"a": 4})])
    index = PlacementIndex() if use_index else None
    for v in views if index is not None else ():
        index.update(v.name, v)
    # Best fit takes node a (4 of 4) for team-b; for team-a it is reserved, so team-a goes to b.
    [for_b, for_a] = place_batch(s, [(REQ, frozenset()), (REQ, frozenset())], index, tenants=["team-b", "team-a"],
                                 now_ms=NOW)  # fmt: skip
    assert isinstance(for_a, Placement) and for_a.node == "b"
    assert isinstance(for_b, Placement) and for_b.node == "a"
    [alone] = place_batch(s, [(REQ, frozenset())], index, tenants=["team-a"], now_ms=NOW)
    assert isinstance(alone, Placement) and alone.node == "b"
    # Outside the window (or at 0, the default) the reservation is not there.
    [later] = place_batch(s, [(REQ, frozenset())], index, tenants=["team-a"], now_ms=NOW + 2 * HOUR)
    assert isinstance(later, Placement) and later.node == "a"
    # With b full, team-a fails naming the reservation.
    s = snap([node("a", 4), node("b", 8, held=8)], [res("r", "team-b", {"a": 4})])
    [refused] = place_batch(s, [(REQ, frozenset())], None, tenants=["team-a"], now_ms=NOW)
    assert isinstance(refused, InsufficientResources)
    assert refused.message.startswith(f"reserved for team-b until {clock(NOW + HOUR)} (reservation r: 4 GPUs on a)")


def test_the_index_path_still_finds_the_best_fit_among_reserved_nodes() -> None:
    # c has 8 GPUs with 6 reserved for team-b: 2 left for team-a, the tightest fit for 2 GPUs.
    views = [node("c", 8), node("d", 4)]
    s = snap(views, [res("r", "team-b", {"c": 6})])
    index = PlacementIndex()
    for v in views:
        index.update(v.name, v)
    small = ResourceRequest(gpus=2, cpus=1, memory_bytes=1)
    [p] = place_batch(s, [(small, frozenset())], index, tenants=["team-a"], now_ms=NOW)
    assert isinstance(p, Placement) and (p.node, p.gpu_indexes) == ("c", (0, 1))
    [q] = place_batch(s, [(small, frozenset())], None, tenants=["team-a"], now_ms=NOW)
    assert q == p, "the index and the scan agree"


def test_the_reserving_tenants_earlier_batch_members_count_as_its_holdings() -> None:
    s = snap([node("n", 8)], [res("r", "team-b", {"n": 4})])
    two = ResourceRequest(gpus=2, cpus=1, memory_bytes=1)
    out = place_batch(s, [(two, frozenset()), (two, frozenset()), (two, frozenset())], None,
                      tenants=["team-b", "team-a", "team-a"], now_ms=NOW)  # fmt: skip
    # team-b took 2 of its 4: 2 stay withheld, so team-a gets 4 of the other 6... and no more.
    assert [p.node if isinstance(p, Placement) else type(p).__name__ for p in out] == ["n", "n", "n"]
    four = ResourceRequest(gpus=4, cpus=1, memory_bytes=1)
    out = place_batch(s, [(two, frozenset()), (four, frozenset())], None, tenants=["team-b", "team-a"], now_ms=NOW)
    assert isinstance(out[1], Placement)
    out = place_batch(s, [(four, frozenset()), (four, frozenset())], None, tenants=["team-a", "team-a"], now_ms=NOW)
    assert isinstance(out[0], Placement) and isinstance(out[1], InsufficientResources)


def pending(id_: str, gpus: int, tenant: str, age: int = 0) -> PendingRequest:
    return PendingRequest(id_, f"p/{id_}", ResourceRequest(gpus=gpus, cpus=1, memory_bytes=1), ttl_s=10, tenant=tenant,
                          created_ms=NOW - age * 1000)  # fmt: skip


def test_the_plan_waits_with_the_reservation_as_reason_without_blocking_the_pool() -> None:
    s = snap([node("n", 4)], [res("r", "team-b", {"n": 4})])
    d = plan(s, [pending("a-big", 4, "team-a", age=9), pending("b", 2, "team-b", age=5), pending("a", 1, "team-a")],
             now_ms=NOW)  # fmt: skip
    assert isinstance(d["a-big"], Wait) and not d["a-big"].head
    assert d["a-big"].reason == f"reserved for team-b until {clock(NOW + HOUR)} (reservation r: 4 GPUs on n)"
    assert isinstance(d["b"], Admit)  # team-b's own request is placed on it
    # team-b's 2 admitted count toward its 4: 2 stay withheld, none free for team-a.
    assert isinstance(d["a"], Wait) and d["a"].reason.startswith("reserved for team-b")
    # Before the window, team-a is placed.
    later = snap([node("n", 4)], [res("r", "team-b", {"n": 4}, start=NOW + HOUR)])
    assert isinstance(plan(later, [pending("a-big", 4, "team-a")], now_ms=NOW)["a-big"], Admit)


@pytest.mark.parametrize(
    ("case", "views", "gpus", "model", "named", "existing", "chosen"),
    [
        ("the smallest node that holds them all", [node("a", 8), node("b", 4), node("c", 2)], 3, "", [], [],
         {"b": 3}),
        ("else the fewest nodes, the last the smallest that covers the rest",
         [node("a", 8), node("b", 4), node("c", 2), node("d", 8)], 10, "", [], [], {"a": 8, "c": 2}),
        ("of the model only", [node("a", 8), node("h", 4, model="H100")], 2, "H100", [], [], {"h": 2}),
        ("named nodes are filled in order", [node("a", 4), node("b", 4)], 6, "", ["b", "a"], [], {"b": 4, "a": 2}),
        ("GPUs reserved in an overlapping window are not offered again", [node("a", 4), node("b", 8)], 4, "", [],
         [res("old", "x", {"a": 2})], {"b": 4}),
        ("a reservation outside the window does not count", [node("a", 4), node("b", 8)], 4, "", [],
         [res("old", "x", {"a": 4}, start=NOW - 3 * HOUR, end=NOW - 2 * HOUR)], {"a": 4}),
    ],
)  # fmt: skip
def test_choose_nodes(case: str, views: list[NodeView], gpus: int, model: str, named: list[str],
                      existing: list[Reservation], chosen: dict[str, int]) -> None:  # fmt: skip
    nodes = {v.name: v for v in views}
    assert choose_nodes(nodes, gpus, model, named, existing, NOW, NOW + HOUR) == chosen, case


def test_choose_nodes_refuses_more_than_there_is() -> None:
    nodes = {v.name: v for v in (node("a", 4), node("b", 4))}
    with pytest.raises(InvalidRequest, match=r"the named node\(s\) a have 4 GPUs; a reservation of 5 does not fit"):
        choose_nodes(nodes, 5, "", ["a"], [], NOW, NOW + HOUR)
    with pytest.raises(InvalidRequest, match="the cluster has 8 GPUs not reserved in that window"):
        choose_nodes(nodes, 9, "", [], [], NOW, NOW + HOUR)
    with pytest.raises(InvalidRequest, match="no registered node 'zz'"):
        choose_nodes(nodes, 1, "", ["zz"], [], NOW, NOW + HOUR)
