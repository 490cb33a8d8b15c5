"""GPU telemetry from the agents' heartbeats, kept in memory only.

Each heartbeat may carry a compact per-GPU summary (utilization, memory used, temperature, power
draw). This replica keeps the latest one per node in a dict, never in etcd: a heartbeat must not
rewrite etcd (a write bumps the revision and makes in-flight commits on the node retry). A
summary is dropped when its node is down, or when it is older than ``max_age_s`` (three heartbeat
intervals: the agent stopped sending it, or heartbeats another replica now). Each replica only
knows the nodes that heartbeat to it; the others show no telemetry there.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gpulease.v1 import coordinator_pb2 as cpb


@dataclass(frozen=True)
class GpuSample:
    index: int
    utilization_percent: int | None = None
    memory_used_bytes: int | None = None
    temperature_c: int | None = None
    power_draw_mw: int | None = None


def _opt(msg: cpb.GpuTelemetry, name: str) -> int | None:
    return int(getattr(msg, name)) if msg.HasField(name) else None  # type: ignore[arg-type]


def samples(msgs: Iterable[cpb.GpuTelemetry]) -> dict[int, GpuSample]:
    return {
        m.index: GpuSample(m.index, _opt(m, "utilization_percent"), _opt(m, "memory_used_bytes"),
                           _opt(m, "temperature_c"), _opt(m, "power_draw_mw"))
        for m in msgs
    }  # fmt: skip


class Telemetry:
    """node -> (received at, per-GPU samples); the latest heartbeat's only."""

    def __init__(self, max_age_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age_s = max_age_s
        self._clock = clock
        self._latest: dict[str, tuple[float, dict[int, GpuSample]]] = {}
        self._pruned = self._clock()

    def record(self, node: str, gpus: dict[int, GpuSample]) -> None:
        now = self._clock()
        if now - self._pruned > self.max_age_s:  # nodes nobody asks about (deleted ones) go too
            self._pruned = now
            for name in [n for n, (at, _) in self._latest.items() if now - at > self.max_age_s]:
                del self._latest[name]
        if gpus:
            self._latest[node] = (self._clock(), gpus)
        else:
            self._latest.pop(node, None)

    def drop(self, node: str) -> None:
        self._latest.pop(node, None)

    def of(self, node: str, up: bool = True) -> dict[int, GpuSample]:
        """The node's latest samples by GPU index; empty when none, stale, or the node is down."""
        entry = self._latest.get(node)
        if entry is None:
            return {}
        if not up or self._clock() - entry[0] > self.max_age_s:
            del self._latest[node]
            return {}
        return entry[1]

    def __len__(self) -> int:
        return len(self._latest)
