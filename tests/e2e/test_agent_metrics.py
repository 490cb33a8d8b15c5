"""The agent's /metrics (issue 16, part 2): a real agent with simulated GPUs behind a real
coordinator, scraped over HTTP; and the idle-but-held clock on real inventory messages."""

from __future__ import annotations

from gpulease.agent.metrics import IdleTracker
from gpulease.dev.cluster import LocalCluster
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import types_pb2 as tpb
from tests.support import harness
from tests.support.scrape import get, scrape

GiB = 2**30


def test_agent_exports_per_gpu_series_and_the_holding_allocation(local_cluster: LocalCluster,
                                                                 coordinator: harness.Coordinator) -> None:  # fmt: skip
    agent = local_cluster.add_agent("node-a", 4)
    url = agent.http_url
    assert url and get(f"{url}/healthz")[0] == 200
    first = scrape(url)
    healthy = {dict(labels)["gpu"]: v for (n, labels), v in first.items() if n == "gpulease_gpu_healthy"}
    assert healthy == {str(i): 1 for i in range(4)}, first
    assert sum(1 for n, _ in first if n == "gpulease_gpu_memory_total_bytes") == 4
    assert not any(n == "gpulease_gpu_allocation" for n, _ in first)

    alloc = coordinator.stub.Allocate(pb.AllocateRequest(gpus=2, cpus=1, memory_bytes=GiB)).allocation

    def holders() -> set[str]:
        return {dict(labels)["allocation"] for (n, labels) in scrape(url) if n == "gpulease_gpu_allocation"}

    harness.wait_until(lambda: holders() == {alloc.id}, 20, "the agent to export the holding allocation")
    gpus = {dict(labels)["gpu"] for (n, labels) in scrape(url) if n == "gpulease_gpu_allocation"}
    assert gpus == {str(g.index) for g in alloc.gpus}
    # Simulated GPUs report no utilization: never called idle.
    assert all(v == 0 for (n, _), v in scrape(url).items() if n == "gpulease_gpu_idle_held")
    coordinator.stub.Release(pb.ReleaseRequest(allocation_id=alloc.id))
    harness.wait_until(lambda: not holders(), 20, "the allocation label to go")


def inventory(*utilization: int | None) -> tpb.NodeInventory:
    inv = tpb.NodeInventory()
    for i, u in enumerate(utilization):
        g = inv.gpus.add(index=i, uuid=f"GPU-{i}", healthy=True)
        if u is not None:
            g.utilization_percent = u
    return inv


def test_idle_but_held_needs_the_whole_window_allocated_and_under_five_percent() -> None:
    now = [0.0]
    idle = IdleTracker(10, clock=lambda: now[0])
    allocated = frozenset({0, 1, 2})
    for t in range(0, 12, 2):
        now[0] = float(t)
        # GPU 0 idle throughout; GPU 1 busy at t=6; GPU 2 reports no utilization; GPU 3 not allocated.
        idle.observe(inventory(1, 50 if t == 6 else 0, None, 0), allocated)
    now[0] = 10.0
    assert idle.idle_held("GPU-0")
    assert not idle.idle_held("GPU-1"), "a busy moment restarts the clock"
    assert not idle.idle_held("GPU-2"), "unknown utilization is not idle"
    assert not idle.idle_held("GPU-3"), "a free GPU is not held"
    now[0] = 18.0  # idle again since t=8
    idle.observe(inventory(1, 0, None, 0), allocated)
    assert idle.idle_held("GPU-1")
    idle.observe(inventory(1, 0, None, 0), frozenset({1}))
    assert not idle.idle_held("GPU-0"), "released: no longer held"
