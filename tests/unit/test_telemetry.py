"""The coordinator's in-memory telemetry (coordinator/telemetry.py) and the agent's heartbeat
summary (gpulease/agent/registration.py: built from the inventory it collected, no second read)."""

from __future__ import annotations

from gpulease.agent.registration import telemetry_summary
from gpulease.coordinator.telemetry import GpuSample, Telemetry, samples
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import types_pb2 as tpb


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_latest_summary_per_node_dropped_when_stale_down_or_empty() -> None:
    clock = Clock()
    t = Telemetry(15, clock)
    t.record("n1", {0: GpuSample(0, 10)})
    t.record("n1", {0: GpuSample(0, 55)})
    assert t.of("n1") == {0: GpuSample(0, 55)}
    assert t.of("n2") == {}
    clock.now += 15
    assert t.of("n1")[0].utilization_percent == 55
    assert t.of("n1", up=False) == {} and len(t) == 0, "a down node's summary is dropped"
    t.record("n1", {0: GpuSample(0, 1)})
    clock.now += 15.1
    assert t.of("n1") == {} and len(t) == 0, "older than the max age"
    t.record("n1", {0: GpuSample(0, 1)})
    t.record("n1", {})
    assert len(t) == 0
    t.record("gone", {0: GpuSample(0, 1)})
    clock.now += 16
    t.record("n1", {0: GpuSample(0, 2)})
    assert len(t) == 1, "nodes nobody asks about are pruned"


def test_agent_summary_from_the_inventory_leaves_unknown_out() -> None:
    inv = tpb.NodeInventory(gpus=[
        tpb.Gpu(index=0, utilization_percent=0, memory_used_bytes=5, temperature_c=40, power_draw_mw=7,
                power_limit_mw=9),
        tpb.Gpu(index=1, simulated=True),
        tpb.Gpu(index=2, temperature_c=30),
    ])  # fmt: skip
    out = telemetry_summary(inv)
    assert [m.index for m in out] == [0, 2]
    assert out[0] == pb.GpuTelemetry(index=0, utilization_percent=0, memory_used_bytes=5, temperature_c=40,
                                     power_draw_mw=7)  # fmt: skip
    assert samples(out) == {0: GpuSample(0, 0, 5, 40, 7), 2: GpuSample(2, None, None, 30, None)}
