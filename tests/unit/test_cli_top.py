"""`gpuctl top`'s frame (gpulease/cli/top.py): totals, one row per GPU with state, telemetry and
holder; '-' where the coordinator has no telemetry; redrawn in place until Ctrl-C."""

from __future__ import annotations

import io

from gpulease.cli import top
from gpulease.client.models import AllocatedGpu, AllocationInfo, Gpu, Node

GiB = 2**30


def gpu(i: int, **kw: object) -> Gpu:
    fields: dict[str, object] = {"healthy": True, **kw}
    return Gpu(index=i, uuid=f"GPU-{i}", model="NVIDIA H100 80GB HBM3", memory_total_bytes=80 * GiB,
               simulated=False, health_detail="", **fields)  # type: ignore[arg-type]  # fmt: skip


def node(name: str, gpus: tuple[Gpu, ...], state: str = "up", held: tuple[int, ...] = ()) -> Node:
    return Node(name=name, state=state, address="a:1", gpus=gpus, cpus_total=8, memory_total_bytes=GiB, labels={},
                hostname=name, cordoned=False, allocated_gpu_indexes=held, cpus_allocated=0,
                memory_allocated_bytes=0)  # fmt: skip


ALLOC = AllocationInfo(id="0123456789abcdef", node="n1", gpus=(AllocatedGpu(1, "GPU-1", "H100"),), cpus=1,
                       memory_bytes=GiB, ttl_seconds=60, revision=5, owner="alice", request_id="r",
                       created_unix_ms=0, node_address="a:1", tenant="team-a")  # fmt: skip


def test_frame_totals_rows_telemetry_and_holder() -> None:
    nodes = [
        node("n2", (gpu(0),), state="down"),
        node("n1", (gpu(0, utilization_percent=37, memory_used_bytes=8 * GiB, temperature_c=61, power_draw_mw=250_400),
                    gpu(1, utilization_percent=100), gpu(2, healthy=False)), held=(1,)),
    ]  # fmt: skip
    text = top.frame(nodes, [ALLOC], title="T")
    lines = text.splitlines()
    assert lines[0] == "T"
    assert lines[1] == "nodes 2: up 1, down 1, cordoned 0   allocations 1"
    assert lines[2] == "GPUs 4: free 1, allocated 1, unhealthy 1, foreign 0, cordoned 0, down 1"
    header, *rows = lines[4:]
    assert header.split() == top.HEADERS
    assert [r.split()[:4] for r in rows] == [["n1", "0", "H100", "80GB"], ["n1", "1", "H100", "80GB"],
                                             ["n1", "2", "H100", "80GB"], ["n2", "0", "H100", "80GB"]]  # fmt: skip
    r0, r1, r2, r3 = rows
    assert " free " in r0 and " 37% ████······ " in r0 and "8.0GiB/80.0GiB" in r0 and "61C" in r0 and "250W" in r0
    assert " allocated " in r1 and "100% ██████████" in r1 and r1.endswith("01234567    alice  team-a")
    assert " unhealthy " in r2 and " down " in r3 and r3.split()[5:] == ["down", "-", "-", "-", "-"]
    assert top.frame([], []).endswith("no nodes registered\n")


def test_run_redraws_in_place_until_ctrl_c() -> None:
    out = io.StringIO()
    ticks: list[float] = []

    def sleep(s: float) -> None:
        ticks.append(s)
        if len(ticks) == 2:
            raise KeyboardInterrupt

    rc = top.run(lambda: ([node("n1", (gpu(0),))], []), interval=0.5, once=False, source="c:1", out=out, sleep=sleep)
    assert rc == 0 and ticks == [0.5, 0.5]
    assert out.getvalue().count(top.CLEAR) == 2 and "gpuctl top — c:1" in out.getvalue()
    once = io.StringIO()
    assert top.run(lambda: ([node("n1", (gpu(0),))], []), interval=2, once=True, source="", out=once) == 0
    assert "\x1b" not in once.getvalue() and "n1" in once.getvalue()
