"""The placement index is a cache: it must choose exactly what the pure scan chooses."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpulease.coordinator.batch_placement import place_batch
from gpulease.coordinator.domain import GpuInfo, NodeInfo, NodeView, Placement, ResourceRequest, Snapshot
from gpulease.coordinator.placement import place
from gpulease.coordinator.placement_index import PlacementIndex, placement_on
from gpulease.errors import InsufficientResources, Unsatisfiable


@st.composite
def node_views(draw: st.DrawFn, name: str) -> NodeView:
    n = draw(st.integers(0, 8))
    gpus = tuple(
        GpuInfo(
            i, f"{name}-{i}", "M", 80, healthy=draw(st.booleans()) or i % 2 == 0, foreign=draw(st.integers(0, 9)) == 0
        )
        for i in range(n)
    )
    info = NodeInfo(name, "h:1", gpus, draw(st.integers(0, 16)), draw(st.integers(0, 64)),
                    cordoned=draw(st.integers(0, 9)) == 0, reconciling=draw(st.integers(0, 19)) == 0)  # fmt: skip
    held = frozenset(draw(st.sets(st.integers(0, max(0, n - 1)), max_size=n))) if n else frozenset()
    return NodeView(info, up=draw(st.integers(0, 9)) > 0, record_revision=1, gpus_held=held,
                    cpus_used=draw(st.integers(0, 16)), memory_used=draw(st.integers(0, 64)))  # fmt: skip


@st.composite
def clusters(draw: st.DrawFn) -> dict[str, NodeView]:
    names = draw(st.lists(st.sampled_from([f"n{i}" for i in range(12)]), min_size=1, max_size=12, unique=True))
    return {name: draw(node_views(name)) for name in names}


requests = st.builds(ResourceRequest, gpus=st.integers(1, 8), cpus=st.integers(1, 16), memory_bytes=st.integers(1, 64))


def indexed(nodes: dict[str, NodeView]) -> PlacementIndex:
    index = PlacementIndex()
    for name, view in nodes.items():
        index.update(name, view)
    return index


@settings(max_examples=600, deadline=None)
@given(clusters(), requests)
def test_index_agrees_with_the_scan(nodes: dict[str, NodeView], req: ResourceRequest) -> None:
    snapshot = Snapshot(5, MappingProxyType(nodes))
    name = indexed(nodes).find(req)
    try:
        expected = place(snapshot, req)
    except (InsufficientResources, Unsatisfiable):
        assert name is None
        return
    assert name is not None
    assert placement_on(nodes[name], req, 5) == expected


@settings(max_examples=200, deadline=None)
@given(clusters(), st.lists(requests, min_size=1, max_size=6))
def test_batch_with_index_agrees_with_batch_without(nodes: dict[str, NodeView], reqs: list[ResourceRequest]) -> None:
    snapshot = Snapshot(5, MappingProxyType(nodes))
    index = indexed(nodes)
    with_index = place_batch(snapshot, [(r, frozenset()) for r in reqs], index)
    without = place_batch(snapshot, [(r, frozenset()) for r in reqs])
    assert [type(x) if isinstance(x, Exception) else x for x in with_index] == [
        type(x) if isinstance(x, Exception) else x for x in without
    ]
    # The tentative updates are undone: the index matches the snapshot again.
    assert index._where == indexed(nodes)._where


@settings(max_examples=200, deadline=None)
@given(clusters(), st.lists(st.tuples(requests, st.sets(st.sampled_from([f"n{i}" for i in range(12)]))),
                            min_size=1, max_size=6))  # fmt: skip
def test_excluded_nodes_the_same_with_or_without_index(
    nodes: dict[str, NodeView], reqs: list[tuple[ResourceRequest, set[str]]]
) -> None:
    snapshot = Snapshot(5, MappingProxyType(nodes))
    batch = [(r, frozenset(ex)) for r, ex in reqs]
    with_index = place_batch(snapshot, batch, indexed(nodes))
    without = place_batch(snapshot, batch)
    assert [type(x) if isinstance(x, Exception) else x for x in with_index] == [
        type(x) if isinstance(x, Exception) else x for x in without
    ]
    assert all(isinstance(x, Exception) or x.node not in ex for x, (_, ex) in zip(with_index, batch, strict=True))


def _gpu_node(name: str, gpus: int, held: int = 0) -> NodeView:
    info = NodeInfo(name, "h:1", tuple(GpuInfo(i, f"{name}-{i}", "M", 80) for i in range(gpus)), 64, 2**40)
    return NodeView(info, up=True, record_revision=1, gpus_held=frozenset(range(held)))


@pytest.mark.parametrize("use_index", [True, False])
@pytest.mark.parametrize(
    ("b_held", "expected"),
    [(0, "b"), (8, "a")],  # avoid "a" while "b" has room; take "a" when nothing else fits
    ids=["other-node-fits", "only-the-avoided-node-fits"],
)
def test_avoided_nodes_are_used_only_when_nothing_else_fits(use_index: bool, b_held: int, expected: str) -> None:
    nodes = {"a": _gpu_node("a", 2), "b": _gpu_node("b", 8, held=b_held)}
    snapshot = Snapshot(5, MappingProxyType(nodes))
    req = ResourceRequest(gpus=1, cpus=1, memory_bytes=1)
    [plain] = place_batch(snapshot, [(req, frozenset())], indexed(nodes) if use_index else None)
    [avoiding] = place_batch(snapshot, [(req, frozenset())], indexed(nodes) if use_index else None, [frozenset({"a"})])
    assert isinstance(plain, Placement) and plain.node == "a"  # best fit
    assert isinstance(avoiding, Placement) and avoiding.node == expected


def test_filtered_requests_are_left_to_the_scan() -> None:
    view = NodeView(NodeInfo("a", "h:1", (GpuInfo(0, "u", "M", 80),), 4, 4), up=True, record_revision=1)
    index = indexed({"a": view})
    assert index.find(ResourceRequest(1, 1, 1)) == "a"
    for filtered in (ResourceRequest(1, 1, 1, gpu_model="M"), ResourceRequest(1, 1, 1, min_gpu_memory_bytes=1),
                     ResourceRequest(1, 1, 1, node_selector={"k": "v"})):  # fmt: skip
        assert index.find(filtered) is None


@pytest.mark.parametrize("change", ["down", "cordoned", "removed"])
def test_unschedulable_nodes_leave_the_index(change: str) -> None:
    view = NodeView(NodeInfo("a", "h:1", (GpuInfo(0, "u", "M", 80),), 4, 4), up=True, record_revision=1)
    index = indexed({"a": view})
    if change == "down":
        index.update("a", replace(view, up=False))
    elif change == "cordoned":
        index.update("a", replace(view, info=replace(view.info, cordoned=True)))
    else:
        index.update("a", None)
    assert index.find(ResourceRequest(1, 1, 1)) is None and len(index) == 0
