"""Gang placement (coordinator/gang_placement.py): N distinct nodes x M GPUs, a pure function of a
snapshot, by placement's own per-node rule. Table tests, no etcd."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import pytest

from gpulease.coordinator.domain import GpuInfo, NodeInfo, NodeView, ResourceRequest, Snapshot
from gpulease.coordinator.gang_placement import place_gang, place_request
from gpulease.coordinator.placement import place
from gpulease.errors import InsufficientResources, Unsatisfiable

GIB = 1 << 30


def node(
    name: str,
    n_gpus: int = 4,
    *,
    held: Iterable[int] = (),
    labels: Mapping[str, str] | None = None,
    cpus: int = 32,
    cpus_used: int = 0,
    up: bool = True,
    cordoned: bool = False,
    model: str = "A100",
    unhealthy: Iterable[int] = (),
) -> NodeView:
    bad = set(unhealthy)
    gpus = tuple(GpuInfo(i, f"GPU-{name}-{i}", model, 80 * GIB, healthy=i not in bad) for i in range(n_gpus))
    info = NodeInfo(name, f"{name}:50052", gpus, cpus, 256 * GIB, dict(labels or {}), cordoned=cordoned)
    return NodeView(info, up, record_revision=3, gpus_held=frozenset(held), cpus_used=cpus_used)


def snap(*views: NodeView) -> Snapshot:
    return Snapshot(100, {v.name: v for v in views})


def gang(nodes: int, gpus: int, *, cpus: int = 1, same: str = "", model: str = "", **kw: object) -> ResourceRequest:
    return ResourceRequest(gpus=gpus, cpus=cpus, memory_bytes=GIB, gpu_model=model, nodes=nodes, same_label=same,
                           **kw)  # type: ignore[arg-type]  # fmt: skip


@dataclass
class Case:
    name: str
    nodes: list[NodeView]
    request: ResourceRequest
    # expected: {node: gpu indexes} of the members (first member first), or an error type and words
    members: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    error: type[Exception] | None = None
    words: tuple[str, ...] = ()


CASES = [
    Case("two empty nodes", [node("n1"), node("n2")], gang(2, 4),
         members=[("n1", (0, 1, 2, 3)), ("n2", (0, 1, 2, 3))]),
    Case("best fit: the tightest nodes, whole nodes stay free",
         [node("big1", 8), node("n1", 4, held=[0, 1]), node("n2", 4, held=[3]), node("n3", 4)], gang(2, 2),
         members=[("n1", (2, 3)), ("n2", (0, 1))]),
    Case("distinct nodes even when one node could hold two members", [node("big", 8), node("n1", 4)], gang(2, 4),
         members=[("n1", (0, 1, 2, 3)), ("big", (0, 1, 2, 3))]),
    Case("enough GPUs in total but not on 2 nodes waits",
         [node("n1", 4, held=[0]), node("n2", 4, held=[0])], gang(2, 4),
         error=InsufficientResources, words=("no 2 nodes have 4 GPUs free each", "3 on n1, 3 on n2")),
    Case("the most free GPUs named", [node("n1", 4), node("n2", 4, held=[0, 1])], gang(2, 4),
         error=InsufficientResources, words=("4 on n1, 2 on n2",)),
    Case("fewer nodes than asked for can ever fit", [node("n1"), node("n2"), node("small", 2)], gang(3, 4),
         error=Unsatisfiable, words=("no 3 nodes can ever hold 4 GPUs each", "only 2", "n1, n2")),
    Case("no node can ever hold one member: placement's reason", [node("n1"), node("n2")], gang(2, 16),
         error=Unsatisfiable, words=("a gang of 2 nodes x 16 GPUs", "ask for at most 4")),
    Case("down and cordoned nodes are not members",
         [node("n1"), node("n2", up=False), node("n3", cordoned=True), node("n4")], gang(2, 4),
         members=[("n1", (0, 1, 2, 3)), ("n4", (0, 1, 2, 3))]),
    Case("a down node counts as able but busy",
         [node("n1"), node("n2", up=False)], gang(2, 4),
         error=InsufficientResources, words=("1 node(s) that could are down",)),
    Case("per-node CPUs: a node short of CPUs is not a member",
         [node("n1", cpus=8), node("n2", cpus=8, cpus_used=6), node("n3", cpus=8)], gang(2, 2, cpus=4),
         members=[("n1", (0, 1)), ("n3", (0, 1))]),
    Case("CPUs short everywhere but GPUs free",
         [node("n1", cpus=8, cpus_used=6), node("n2", cpus=8, cpus_used=6)], gang(2, 2, cpus=4),
         error=InsufficientResources, words=("not the CPUs or memory",)),
    Case("unhealthy GPUs are not free", [node("n1", unhealthy=[0]), node("n2"), node("n3")], gang(2, 4),
         members=[("n2", (0, 1, 2, 3)), ("n3", (0, 1, 2, 3))]),
    Case("model filter per node",
         [node("a1", model="A100"), node("h1", model="H100"), node("h2", model="H100")], gang(2, 4, model="H100"),
         members=[("h1", (0, 1, 2, 3)), ("h2", (0, 1, 2, 3))]),
    Case("same label: all members share the rack",
         [node("a1", labels={"rack": "a"}), node("b1", labels={"rack": "b"}), node("b2", labels={"rack": "b"})],
         gang(2, 4, same="rack"), members=[("b1", (0, 1, 2, 3)), ("b2", (0, 1, 2, 3))]),
    Case("same label: the group that fits best wins",
         [node("a1", 8, labels={"rack": "a"}), node("a2", 8, labels={"rack": "a"}),
          node("b1", 4, labels={"rack": "b"}), node("b2", 4, labels={"rack": "b"})],
         gang(2, 4, same="rack"), members=[("b1", (0, 1, 2, 3)), ("b2", (0, 1, 2, 3))]),
    Case("same label: nodes without the label take no part",
         [node("x1"), node("x2"), node("a1", labels={"rack": "a"})], gang(2, 4, same="rack"),
         error=Unsatisfiable, words=("no value of label 'rack' has 2 nodes", "rack=a")),
    Case("same label: no node has it", [node("x1"), node("x2")], gang(2, 4, same="rack"),
         error=Unsatisfiable, words=("no registered node has label 'rack'",)),
    Case("same label: enough in total, not in one rack",
         [node("a1", labels={"rack": "a"}), node("a2", labels={"rack": "a"}, held=[0]),
          node("b1", labels={"rack": "b"})], gang(2, 4, same="rack"),
         error=InsufficientResources, words=("sharing one value of label 'rack'",)),
    Case("node selector applies to every member",
         [node("n1", labels={"zone": "z"}), node("n2"), node("n3", labels={"zone": "z"})],
         gang(2, 4, node_selector={"zone": "z"}), members=[("n1", (0, 1, 2, 3)), ("n3", (0, 1, 2, 3))]),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gang_placement(case: Case) -> None:
    snapshot = snap(*case.nodes)
    if case.error is not None:
        with pytest.raises(case.error) as err:
            place_gang(snapshot, case.request)
        for w in case.words:
            assert w in str(err.value.message), err.value.message  # type: ignore[attr-defined]
        return
    p = place_gang(snapshot, case.request)
    assert [(m.node, m.gpu_indexes) for m in p.members] == case.members
    assert p.node == case.members[0][0] and len(p.more) == case.request.nodes - 1
    assert all(m.snapshot_revision == 100 and m.node_record_revision == 3 for m in p.members)


def test_each_member_is_what_placement_would_choose_on_its_node() -> None:
    """The per-node rule is placement's own: each member's GPUs are those place() picks on that node."""
    views = [node("n1", held=[1]), node("n2", held=[0, 2]), node("n3", 8, held=[0, 1, 2, 3, 4]), node("n4")]
    p = place_gang(snap(*views), gang(3, 2))
    by_name = {v.name: v for v in views}
    for m in p.members:
        alone = place(snap(by_name[m.node]), gang(3, 2).per_node())
        assert alone.gpu_indexes == m.gpu_indexes


def test_one_node_request_goes_to_place() -> None:
    s = snap(node("n1"), node("n2", held=[0]))
    r = ResourceRequest(gpus=2, cpus=1, memory_bytes=GIB)
    assert place_request(s, r) == place(s, r)
    assert place_gang(s, r) == place(s, r)
