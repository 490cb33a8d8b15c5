"""GPU telemetry carried by heartbeats (issue 16, section 4), on a real coordinator and etcd:

- ListNodes and /api/v1/nodes show the latest heartbeat's per-GPU values; GPUs without any stay unset;
- telemetry-only heartbeats never write etcd: the store's revision is the same before and after
  many heartbeats whose values all change;
- a summary older than three heartbeat intervals is dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp

from gpulease.client import Client
from gpulease.coordinator.keys import range_end
from gpulease.coordinator.store import Store
from gpulease.dev.cluster import LocalCluster
from gpulease.v1 import coordinator_pb2 as pb
from tests.support import gpuctl, harness

GiB = 2**30


def sample(index: int, util: int) -> pb.GpuTelemetry:
    return pb.GpuTelemetry(index=index, utilization_percent=util, memory_used_bytes=(util + 1) * GiB,
                           temperature_c=40 + util % 30, power_draw_mw=100_000 + util)  # fmt: skip


def beat(c: harness.Coordinator, node: str, lease: int, telemetry: list[pb.GpuTelemetry]) -> None:
    c.stub.Heartbeat(pb.HeartbeatRequest(node=node, lease_id=lease, telemetry=telemetry), timeout=10)


async def etcd_revision(url: str, prefix: str) -> int:
    store = Store([url])
    await store.start()
    try:
        return (await store.get_prefix(prefix, range_end(prefix)))[0]
    finally:
        await store.close()


async def api_gpus(url: str) -> dict[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/api/v1/nodes/n1") as r:
        assert r.status == 200
        return {g["index"]: g for g in (await r.json())["node"]["gpus"]}


async def test_heartbeat_telemetry_is_shown_kept_in_memory_and_expires(
    local_cluster: LocalCluster, start_coordinator: Callable[..., harness.Coordinator], prefix: str
) -> None:
    c = start_coordinator(heartbeat=1)  # telemetry is dropped after 3 s without a heartbeat
    lease = harness.register(c.stub, "n1", gpus=2)
    harness.wait_nodes_up(c.stub, {"n1"})
    beat(c, "n1", lease, [sample(0, 37)])

    with Client(c.address, timeout=5) as client:
        (node,) = client.list_nodes()
        g0, g1 = node.gpus
        assert (g0.utilization_percent, g0.memory_used_bytes, g0.temperature_c, g0.power_draw_mw) == (
            37, 38 * GiB, 47, 100_037
        )  # fmt: skip
        assert (g1.utilization_percent, g1.memory_used_bytes, g1.temperature_c) == (None, None, None)

        url = local_cluster.coordinator(c.address).http_url
        gpus = await api_gpus(url)
        assert gpus[0]["utilization_percent"] == 37 and gpus[0]["memory_used_bytes"] == 38 * GiB
        assert gpus[0]["temperature_c"] == 47 and gpus[0]["power_draw_mw"] == 100_037
        assert gpus[1]["utilization_percent"] is None and gpus[1]["temperature_c"] is None

        # Heartbeats carrying ever-changing telemetry write nothing to etcd.
        etcd_url = local_cluster.etcd_url
        before = await etcd_revision(etcd_url, prefix)
        for i in range(20):
            beat(c, "n1", lease, [sample(0, i), sample(1, 90 - i)])
        assert await etcd_revision(etcd_url, prefix) == before, "telemetry-only heartbeats wrote etcd"
        g0, g1 = client.list_nodes()[0].gpus
        assert (g0.utilization_percent, g1.utilization_percent) == (19, 71)

        # No heartbeat for more than three intervals: the summary is gone (the node is still up).
        await asyncio.sleep(3.5)
        (node,) = client.list_nodes()
        assert node.state == "up"
        assert [g.utilization_percent for g in node.gpus] == [None, None]
        assert [g["utilization_percent"] for g in (await api_gpus(url)).values()] == [None, None]


def test_gpuctl_top_once_shows_nodes_utilization_and_holder(
    start_coordinator: Callable[..., harness.Coordinator],
) -> None:
    c = start_coordinator()
    lease = harness.register(c.stub, "n1", gpus=2)
    harness.wait_nodes_up(c.stub, {"n1"})
    beat(c, "n1", lease, [sample(0, 42), sample(1, 7)])
    base = ["--coordinator", c.address]
    made = gpuctl.run([*base, "allocate", "--gpus", "1", "--cpus", "1", "--memory", "1MiB", "--owner", "bob",
                       "--json"])  # fmt: skip
    assert made.rc == 0, made
    alloc_id = made.json()["id"]

    run = gpuctl.run([*base, "top", "--once"])
    assert run.rc == 0, run
    assert "\x1b" not in run.stdout
    lines = run.stdout.splitlines()
    assert lines[0] == "nodes 1: up 1, down 0, cordoned 0   allocations 1"
    assert lines[1] == "GPUs 2: free 1, allocated 1, unhealthy 0, foreign 0, cordoned 0, down 0"
    rows = {r.split()[1]: r for r in lines[4:] if r.startswith("n1 ")}
    assert " 42% " in rows["0"] and " 7% " in rows["1"], run.stdout
    held = next(r for r in rows.values() if " allocated " in r)
    assert alloc_id[:8] in held and "bob" in held
