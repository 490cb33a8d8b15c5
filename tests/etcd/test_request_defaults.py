"""Defaults that don't surprise (issue 15, section 7): a request naming only GPUs gets the configured
per-GPU CPU and memory capped by the node's share per GPU; explicit figures are not touched, and one
larger than any node is still refused with placement's message."""

from __future__ import annotations

import pytest

from gpulease.coordinator.allocations import AllocateInput
from gpulease.coordinator.domain import ResourceRequest
from gpulease.coordinator.request_defaults import node_share
from gpulease.errors import InvalidRequest, Unsatisfiable
from tests.support import harness
from tests.support.inproc import core, node_info

GiB = 2**30


async def test_gpus_alone_fit_a_small_host_and_explicit_figures_stay_as_asked(etcd: harness.Etcd,
                                                                              prefix: str) -> None:  # fmt: skip
    async with core([etcd.url], prefix) as c:
        # A simulated 4-GPU agent on a 2-CPU, 8 GiB host: a fixed 1 CPU / 4 GiB per GPU asked for 3 CPUs.
        await c.nodes.register(node_info("small", gpus=4, cpus=2, memory=8 * GiB))
        alloc, _ = await c.allocations.allocate(AllocateInput(gpus=3))
        assert (alloc.cpus, alloc.memory_bytes) == (1, 6 * GiB)  # the node's share of 3 of its 4 GPUs
        assert "cpus=auto;memory=auto" in alloc.shape
        await c.allocations.release(alloc.id)
        # A retry of the same request id is the same request, whatever the share computes to.
        first, _ = await c.allocations.allocate(AllocateInput(gpus=1, request_id="same"))
        again, reused = await c.allocations.allocate(AllocateInput(gpus=1, request_id="same"))
        assert reused and again.id == first.id
        await c.allocations.release(first.id)
        with pytest.raises(Unsatisfiable, match="no node can ever fit 3 CPUs"):
            await c.allocations.allocate(AllocateInput(gpus=1, cpus=3))
        explicit, _ = await c.allocations.allocate(AllocateInput(gpus=1, cpus=2, memory_bytes=GiB))
        assert (explicit.cpus, explicit.memory_bytes) == (2, GiB)


async def test_a_large_host_keeps_the_configured_default(etcd: harness.Etcd, prefix: str) -> None:
    async with core([etcd.url], prefix) as c:
        await c.nodes.register(node_info("big", gpus=8, cpus=64, memory=512 * GiB))
        alloc, _ = await c.allocations.allocate(AllocateInput(gpus=2))
        assert (alloc.cpus, alloc.memory_bytes) == (2, 8 * GiB)  # 1 CPU and 4 GiB per GPU, as configured


def test_the_share_comes_from_the_most_generous_node_that_could_hold_the_request() -> None:
    from gpulease.coordinator.domain import NodeView

    views = [NodeView(node_info("tiny", gpus=2, cpus=1, memory=2 * GiB), True, 1),
             NodeView(node_info("mid", gpus=4, cpus=8, memory=32 * GiB), True, 1)]  # fmt: skip
    req = ResourceRequest(gpus=2, cpus=2, memory_bytes=8 * GiB, cpus_auto=True, memory_auto=True)
    assert node_share(views, req) == (4, 16 * GiB)
    assert node_share(views, ResourceRequest(gpus=3, cpus=3, memory_bytes=1)) == (6, 24 * GiB)
    assert node_share(views, ResourceRequest(gpus=5, cpus=5, memory_bytes=1)) is None


def test_an_explicit_zero_ttl_is_refused() -> None:
    from gpulease.coordinator import validation

    with pytest.raises(InvalidRequest):
        validation.ttl(-1, 60)
