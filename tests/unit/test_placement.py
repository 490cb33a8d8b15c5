"""Tests for coordinator.placement.place: a pure function, so no etcd and no event loop here."""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Iterable, Mapping, Sequence

import pytest

from gpulease.coordinator.domain import GpuInfo, NodeInfo, NodeView, Placement, ResourceRequest, Snapshot
from gpulease.coordinator.placement import place
from gpulease.errors import GpuLeaseError, InsufficientResources, Unsatisfiable

GIB = 1 << 30
SNAPSHOT_REVISION = 500


# --- helpers -------------------------------------------------------------------------------------------


def gpus(
    count: int = 8,
    *,
    model: str = "A100",
    mem_gib: int = 80,
    unhealthy: Iterable[int] = (),
    start: int = 0,
) -> tuple[GpuInfo, ...]:
    bad = set(unhealthy)
    return tuple(
        GpuInfo(
            index=i,
            uuid=f"GPU-{model}-{i}",
            model=model,
            memory_total_bytes=mem_gib * GIB,
            healthy=i not in bad,
        )
        for i in range(start, start + count)
    )


def node(
    name: str,
    *,
    n_gpus: int = 8,
    model: str = "A100",
    gpu_mem_gib: int = 80,
    gpu_list: tuple[GpuInfo, ...] | None = None,
    unhealthy: Iterable[int] = (),
    held: Iterable[int] = (),
    cpus: int = 64,
    cpus_used: int = 0,
    mem_gib: int = 512,
    mem_used_gib: int = 0,
    labels: Mapping[str, str] | None = None,
    up: bool = True,
    cordoned: bool = False,
    record_revision: int = 7,
) -> NodeView:
    info = NodeInfo(
        name=name,
        address=f"{name}:50052",
        gpus=gpu_list if gpu_list is not None else gpus(n_gpus, model=model, mem_gib=gpu_mem_gib, unhealthy=unhealthy),
        cpus_total=cpus,
        memory_total_bytes=mem_gib * GIB,
        labels=dict(labels or {}),
        cordoned=cordoned,
    )
    return NodeView(
        info=info,
        up=up,
        record_revision=record_revision,
        gpus_held=frozenset(held),
        cpus_used=cpus_used,
        memory_used=mem_used_gib * GIB,
    )


def snap(*views: NodeView, revision: int = SNAPSHOT_REVISION) -> Snapshot:
    return Snapshot(revision=revision, nodes={v.name: v for v in views})


def req(
    n_gpus: int = 1,
    *,
    cpus: int = 1,
    mem_gib: int = 1,
    model: str = "",
    min_gpu_mem_gib: int = 0,
    selector: Mapping[str, str] | None = None,
) -> ResourceRequest:
    return ResourceRequest(
        gpus=n_gpus,
        cpus=cpus,
        memory_bytes=mem_gib * GIB,
        gpu_model=model,
        min_gpu_memory_bytes=min_gpu_mem_gib * GIB,
        node_selector=dict(selector or {}),
    )


def reordered(snapshot: Snapshot, order: Sequence[str]) -> Snapshot:
    return Snapshot(revision=snapshot.revision, nodes={n: snapshot.nodes[n] for n in order})


# --- successful placements -----------------------------------------------------------------------------

PLACE_CASES = [
    pytest.param(
        [node("node-a"), node("node-b", held=range(4)), node("node-c", held=range(7))],
        req(2),
        "node-b",
        (4, 5),
        id="best-fit-picks-fullest-feasible-node",
    ),
    pytest.param(
        [node("node-a"), node("node-b", n_gpus=4), node("node-c", n_gpus=2)],
        req(2),
        "node-c",
        (0, 1),
        id="best-fit-exact-fit-wins",
    ),
    pytest.param(
        [node("node-a", n_gpus=4), node("node-b", held=range(6))],
        req(4),
        "node-a",
        (0, 1, 2, 3),
        id="held-gpus-not-free",
    ),
    pytest.param(
        [node("node-a", cpus_used=8), node("node-b", cpus_used=16)],
        req(2),
        "node-b",
        (0, 1),
        id="tie-break-fewest-cpus-left",
    ),
    pytest.param(
        [node("node-a", mem_used_gib=300), node("node-b", mem_used_gib=100)],
        req(2),
        "node-a",
        (0, 1),
        id="tie-break-least-memory-left",
    ),
    pytest.param(
        [node("node-c"), node("node-b"), node("node-a")],
        req(2),
        "node-a",
        (0, 1),
        id="tie-break-node-name",
    ),
    pytest.param(
        [node("node-a", cpus_used=48), node("node-b", held=range(6))],
        req(1, cpus=8),
        "node-b",
        (6,),
        id="gpus-outrank-cpus-in-best-fit",
    ),
    pytest.param(
        [node("node-a", held={0, 2, 5})],
        req(3),
        "node-a",
        (1, 3, 4),
        id="lowest-free-indexes",
    ),
    pytest.param(
        [node("node-a", gpu_list=tuple(reversed(gpus(8))), held={1})],
        req(3),
        "node-a",
        (0, 2, 3),
        id="indexes-sorted-when-gpu-list-unordered",
    ),
    pytest.param(
        [node("node-a", unhealthy={0, 1})],
        req(2),
        "node-a",
        (2, 3),
        id="unhealthy-gpu-skipped",
    ),
    pytest.param(
        [node("node-a", n_gpus=4, unhealthy={3}), node("node-b")],
        req(4),
        "node-b",
        (0, 1, 2, 3),
        id="unhealthy-gpu-not-counted",
    ),
    pytest.param(
        [node("node-a", n_gpus=2, up=False), node("node-b")],
        req(2),
        "node-b",
        (0, 1),
        id="down-node-skipped",
    ),
    pytest.param(
        [node("node-a", n_gpus=2, cordoned=True), node("node-b")],
        req(2),
        "node-b",
        (0, 1),
        id="cordoned-node-skipped",
    ),
    pytest.param(
        [node("node-a", n_gpus=2, model="V100"), node("node-b", model="A100")],
        req(2, model="A100"),
        "node-b",
        (0, 1),
        id="model-filter-match",
    ),
    pytest.param(
        [node("node-a", n_gpus=2, model="V100"), node("node-b", model="A100")],
        req(2, model="a100"),
        "node-b",
        (0, 1),
        id="model-filter-case-insensitive",
    ),
    pytest.param(
        [node("node-a", gpu_list=gpus(4, model="V100") + gpus(4, model="A100", start=4))],
        req(2, model="A100"),
        "node-a",
        (4, 5),
        id="model-filter-within-mixed-node",
    ),
    pytest.param(
        [node("node-a", n_gpus=2, gpu_mem_gib=40), node("node-b", gpu_mem_gib=80)],
        req(2, min_gpu_mem_gib=80),
        "node-b",
        (0, 1),
        id="min-gpu-memory",
    ),
    pytest.param(
        [node("node-a", n_gpus=2, labels={"zone": "x"}), node("node-b", labels={"zone": "y", "rack": "1"})],
        req(2, selector={"zone": "y"}),
        "node-b",
        (0, 1),
        id="node-selector-match",
    ),
    pytest.param(
        [node("node-a", n_gpus=2, cpus=64, cpus_used=60), node("node-b")],
        req(2, cpus=8),
        "node-b",
        (0, 1),
        id="free-cpus-too-few-on-best-fit",
    ),
    pytest.param(
        [node("node-a", n_gpus=2, mem_gib=64, mem_used_gib=60), node("node-b")],
        req(2, mem_gib=8),
        "node-b",
        (0, 1),
        id="free-memory-too-little-on-best-fit",
    ),
    pytest.param(
        [node("node-a", n_gpus=0, cpus=4), node("node-b", n_gpus=0, cpus=8)],
        req(0, cpus=4),
        "node-a",
        (),
        id="zero-gpus-cpu-only",
    ),
]


@pytest.mark.parametrize(("views", "request_", "want_node", "want_gpus"), PLACE_CASES)
def test_place(views: list[NodeView], request_: ResourceRequest, want_node: str, want_gpus: tuple[int, ...]) -> None:
    got = place(snap(*views), request_)
    assert (got.node, got.gpu_indexes) == (want_node, want_gpus)


def test_placement_carries_revisions() -> None:
    got = place(snap(node("node-a", record_revision=41), revision=99), req(1))
    assert got == Placement(node="node-a", gpu_indexes=(0,), node_record_revision=41, snapshot_revision=99)


# --- errors --------------------------------------------------------------------------------------------

ERROR_CASES = [
    pytest.param([], req(1), Unsatisfiable, ["no nodes are registered"], id="empty-cluster"),
    pytest.param(
        [node("node-b", n_gpus=4), node("node-a", n_gpus=8)],
        req(16, model="A100"),
        Unsatisfiable,
        ["no node can ever fit 16 GPUs of model 'A100'", "largest matching node (node-a) has 8", "at most 8"],
        id="more-gpus-than-any-node",
    ),
    pytest.param(
        [node("node-a", unhealthy={7})],
        req(8),
        Unsatisfiable,
        ["can ever fit 8 GPUs", "(node-a) has 7", "at most 7"],
        id="unhealthy-gpus-not-counted-toward-capacity",
    ),
    pytest.param(
        [node("node-a", model="A100"), node("node-b", model="V100")],
        req(1, model="H100"),
        Unsatisfiable,
        ["model 'H100'", "models available: A100, V100", "fix gpu_model"],
        id="model-filter-no-match",
    ),
    pytest.param(
        [node("node-a", gpu_mem_gib=40), node("node-b", gpu_mem_gib=80)],
        req(1, min_gpu_mem_gib=100),
        Unsatisfiable,
        ["at least 100 GiB of memory", "the largest has 80 GiB (node-b)", "min_gpu_memory_bytes to at most"],
        id="min-gpu-memory-too-large",
    ),
    pytest.param(
        [node("node-a", labels={"zone": "x"})],
        req(1, selector={"zone": "z"}),
        Unsatisfiable,
        ["node_selector {zone=z}", "no node has label zone=z"],
        id="node-selector-mismatch",
    ),
    pytest.param(
        [node("node-a", labels={"zone": "x"}), node("node-b", labels={"rack": "1"})],
        req(1, selector={"zone": "x", "rack": "1"}),
        Unsatisfiable,
        ["node_selector {rack=1, zone=x}", "no node has all of them"],
        id="node-selector-no-node-has-all-labels",
    ),
    pytest.param(
        [node("node-a", cpus=32), node("node-b", cpus=64)],
        req(1, cpus=128),
        Unsatisfiable,
        ["128 CPUs", "(node-b) has 64", "at most 64"],
        id="cpus-larger-than-any-node",
    ),
    pytest.param(
        [node("node-a", mem_gib=256), node("node-b", mem_gib=512)],
        req(1, mem_gib=1024),
        Unsatisfiable,
        ["1024 GiB of memory", "(node-b) has 512 GiB", f"at most {512 * GIB} memory_bytes"],
        id="memory-larger-than-any-node",
    ),
    pytest.param(
        [node("node-a", unhealthy=range(8))],
        req(1),
        Unsatisfiable,
        ["no registered node has any healthy GPU"],
        id="no-healthy-gpus",
    ),
    pytest.param(
        [node("node-a", held=range(6)), node("node-b", held=range(5))],
        req(4),
        InsufficientResources,
        ["2 matching nodes: 2 up but busy", "free GPUs on 2 (most: 3 on node-b)", "retry later"],
        id="busy-cluster",
    ),
    pytest.param(
        [node("node-a", held=range(6)), node("node-b", held=range(6)), node("node-c", up=False)],
        req(4),
        InsufficientResources,
        ["room for 4 GPUs", "3 matching nodes: 2 up but busy, 1 down", "retry later or release allocations"],
        id="busy-and-down",
    ),
    pytest.param(
        [node("node-a", cpus=16, cpus_used=12)],
        req(1, cpus=8),
        InsufficientResources,
        ["free CPUs on 1 (most: 4 on node-a)"],
        id="busy-cpus",
    ),
    pytest.param(
        [node("node-a", mem_gib=64, mem_used_gib=60)],
        req(1, mem_gib=8),
        InsufficientResources,
        ["free memory on 1 (most: 4 GiB on node-a)"],
        id="busy-memory",
    ),
    pytest.param(
        [node("node-a", n_gpus=8, up=False), node("node-b", n_gpus=2)],
        req(8),
        InsufficientResources,
        ["1 matching node: 1 down", "down, cordoned or restarting"],
        id="only-matching-node-down",
    ),
    pytest.param(
        [node("node-a", model="A100", cordoned=True), node("node-b", model="V100")],
        req(1, model="A100"),
        InsufficientResources,
        ["1 matching node: 1 cordoned", "uncordon"],
        id="only-matching-node-cordoned",
    ),
    pytest.param(
        [node("node-a", up=False, labels={"zone": "x"}), node("node-b", labels={"zone": "y"})],
        req(1, selector={"zone": "x"}),
        InsufficientResources,
        ["1 down"],
        id="only-selected-node-down",
    ),
]


@pytest.mark.parametrize(("views", "request_", "error", "fragments"), ERROR_CASES)
def test_place_errors(
    views: list[NodeView], request_: ResourceRequest, error: type[GpuLeaseError], fragments: list[str]
) -> None:
    with pytest.raises(error) as info:
        place(snap(*views), request_)
    assert type(info.value) is error
    for fragment in fragments:
        assert fragment in info.value.message


# --- determinism ---------------------------------------------------------------------------------------


def _outcome(snapshot: Snapshot, request: ResourceRequest) -> Placement | tuple[str, str]:
    try:
        return place(snapshot, request)
    except GpuLeaseError as e:
        return (type(e).__name__, e.message)


DETERMINISM_CASES = [
    pytest.param([node(f"node-{i:02d}") for i in range(12)], req(2), id="all-tied"),
    pytest.param(
        [node(f"node-{i:02d}", held=range(i % 4), cpus_used=i % 3) for i in range(12)],
        req(3),
        id="mixed-load",
    ),
    pytest.param([node(f"node-{i:02d}", n_gpus=4 + i % 3) for i in range(12)], req(16), id="unsatisfiable-message"),
    pytest.param([node(f"node-{i:02d}", held=range(6 + i % 2)) for i in range(12)], req(4), id="insufficient-message"),
]


@pytest.mark.parametrize(("views", "request_"), DETERMINISM_CASES)
def test_deterministic(views: list[NodeView], request_: ResourceRequest) -> None:
    snapshot = snap(*views)
    first = _outcome(snapshot, request_)
    assert _outcome(snapshot, request_) == first
    names = list(snapshot.nodes)
    rng = random.Random(1234)
    for _ in range(10):
        rng.shuffle(names)
        assert _outcome(reordered(snapshot, names), request_) == first


# --- property test -------------------------------------------------------------------------------------
# Brute-force oracle: the same rules as place(), written the obvious way.


def _eligible(g: GpuInfo, r: ResourceRequest) -> bool:
    return (
        g.healthy
        and (not r.gpu_model or g.model.lower() == r.gpu_model.lower())
        and g.memory_total_bytes >= r.min_gpu_memory_bytes
    )


def _could_ever_fit(v: NodeView, r: ResourceRequest) -> bool:
    return (
        all(v.info.labels.get(k) == val for k, val in r.node_selector.items())
        and sum(_eligible(g, r) for g in v.info.gpus) >= r.gpus
        and v.info.cpus_total >= r.cpus
        and v.info.memory_total_bytes >= r.memory_bytes
    )


def _free_eligible(v: NodeView, r: ResourceRequest) -> list[int]:
    return sorted(g.index for g in v.info.gpus if _eligible(g, r) and g.index not in v.gpus_held)


def _fits_now(v: NodeView, r: ResourceRequest) -> bool:
    return (
        _could_ever_fit(v, r)
        and v.up
        and not v.info.cordoned
        and len(_free_eligible(v, r)) >= r.gpus
        and v.cpus_free >= r.cpus
        and v.memory_free >= r.memory_bytes
    )


def _fit_key(v: NodeView, r: ResourceRequest) -> tuple[int, int, int, str]:
    return (len(_free_eligible(v, r)) - r.gpus, v.cpus_free - r.cpus, v.memory_free - r.memory_bytes, v.name)


HAVE_HYPOTHESIS = importlib.util.find_spec("hypothesis") is not None

if HAVE_HYPOTHESIS:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    MODELS = ("A100", "V100")
    # Skewed so that a good share of examples place something instead of raising.
    MOSTLY_TRUE = st.sampled_from((True, True, True, False))

    @st.composite
    def node_views(draw: st.DrawFn, name: str) -> NodeView:
        n = draw(st.integers(0, 6))
        gpu_list = tuple(
            GpuInfo(
                index=i,
                uuid=f"{name}-{i}",
                model=draw(st.sampled_from(MODELS)),
                memory_total_bytes=draw(st.sampled_from((40, 80))),
                healthy=draw(MOSTLY_TRUE),
            )
            for i in draw(st.permutations(range(n)))
        )
        cpus = draw(st.integers(1, 8))
        memory = draw(st.integers(1, 8))
        return NodeView(
            info=NodeInfo(
                name=name,
                address="",
                gpus=gpu_list,
                cpus_total=cpus,
                memory_total_bytes=memory,
                labels=draw(st.sampled_from(({}, {"zone": "a"}, {"zone": "b"}))),
                cordoned=not draw(MOSTLY_TRUE),
            ),
            up=draw(MOSTLY_TRUE),
            record_revision=draw(st.integers(1, 100)),
            gpus_held=frozenset(draw(st.sets(st.integers(0, max(n - 1, 0)), max_size=n))),
            cpus_used=draw(st.integers(0, cpus + 1) | st.just(0)),
            memory_used=draw(st.integers(0, memory + 1) | st.just(0)),
        )

    @st.composite
    def snapshots(draw: st.DrawFn) -> Snapshot:
        names = draw(st.lists(st.sampled_from([f"n{i}" for i in range(10)]), unique=True, min_size=1, max_size=8))
        return Snapshot(revision=draw(st.integers(1, 1000)), nodes={n: draw(node_views(n)) for n in names})

    requests = st.builds(
        ResourceRequest,
        gpus=st.integers(1, 2) | st.integers(1, 5),
        cpus=st.integers(1, 6),
        memory_bytes=st.integers(1, 6),
        gpu_model=st.sampled_from(("", "", "A100", "v100", "H100")),
        min_gpu_memory_bytes=st.sampled_from((0, 0, 40, 80, 100)),
        node_selector=st.sampled_from(({}, {}, {"zone": "a"})),
    )

    @settings(max_examples=400, deadline=None, database=None)
    @given(snapshot=snapshots(), request_=requests)
    def test_place_matches_brute_force(snapshot: Snapshot, request_: ResourceRequest) -> None:
        views = list(snapshot.nodes.values())
        fitting = [v for v in views if _fits_now(v, request_)]
        try:
            got = place(snapshot, request_)
        except Unsatisfiable:
            assert not any(_could_ever_fit(v, request_) for v in views)
            return
        except InsufficientResources:
            assert not fitting
            assert any(_could_ever_fit(v, request_) for v in views)
            return

        chosen = snapshot.nodes[got.node]
        # Never a down/cordoned node, a held or unhealthy or non-matching GPU, or more CPU/memory than free.
        assert chosen.up and not chosen.info.cordoned
        by_index = {g.index: g for g in chosen.info.gpus}
        for i in got.gpu_indexes:
            assert i not in chosen.gpus_held
            assert _eligible(by_index[i], request_)
        assert chosen.cpus_free >= request_.cpus
        assert chosen.memory_free >= request_.memory_bytes
        assert all(k in chosen.info.labels and chosen.info.labels[k] == v for k, v in request_.node_selector.items())
        # Exactly the lowest free eligible indexes, sorted, on the best-fit node.
        assert list(got.gpu_indexes) == _free_eligible(chosen, request_)[: request_.gpus]
        assert _fit_key(chosen, request_) == min(_fit_key(v, request_) for v in fitting)
        assert got.node_record_revision == chosen.record_revision
        assert got.snapshot_revision == snapshot.revision
else:

    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_place_matches_brute_force() -> None:
        pass


def test_gpus_in_foreign_use_are_never_handed_out() -> None:
    from dataclasses import replace

    busy = node("a", n_gpus=2)
    busy = replace(busy, info=replace(busy.info, gpus=(replace(busy.info.gpus[0], foreign=True), busy.info.gpus[1])))
    assert place(snap(busy), req(1)).gpu_indexes == (1,)
    # Foreign use is temporary: the request is not impossible, only not possible now.
    with pytest.raises(InsufficientResources):
        place(snap(busy), req(2))


def test_a_reconciling_node_offers_no_gpus() -> None:
    from dataclasses import replace

    restarting = node("a", n_gpus=2)
    restarting = replace(restarting, info=replace(restarting.info, reconciling=True))
    assert place(snap(restarting, node("b", n_gpus=8)), req(1)).node == "b"
    with pytest.raises(InsufficientResources, match="restarting"):
        place(snap(restarting), req(1))
