"""The agent's Prometheus metrics (issue 16, part 2): per GPU, read at scrape time from the last
inventory the agent collected (NVML telemetry; unset fields are left out), plus its containers.

Labels are bounded by the GPU count: ``gpu`` (index) and ``uuid``, and on
``gpulease_gpu_allocation`` the allocation holding the GPU (one series per GPU at a time).

Idle but held (``gpulease_gpu_idle_held``): an allocated GPU whose utilization stayed under
IDLE_PERCENT for ``window`` seconds. ``IdleTracker.observe`` runs on every inventory collect
(each heartbeat), so a busy moment between two scrapes still resets the clock. A GPU whose
utilization NVML does not report (simulated ones) is never called idle.
"""

from __future__ import annotations

import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpulease.v1.types_pb2 import NodeInventory

IDLE_PERCENT = 5
CONTAINER_STATES = ("created", "running", "exited", "paused", "restarting", "removing", "dead")


class IdleTracker:
    """Per GPU (by UUID): since when it has been allocated and under IDLE_PERCENT without a break."""

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._idle_since: dict[str, float] = {}

    def observe(self, inventory: NodeInventory, allocated: frozenset[int]) -> None:
        now = self._clock()
        with self._lock:
            seen: dict[str, float] = {}
            for g in inventory.gpus:
                idle = g.index in allocated and g.HasField("utilization_percent") and (
                    g.utilization_percent < IDLE_PERCENT
                )  # fmt: skip
                if idle:
                    seen[g.uuid] = self._idle_since.get(g.uuid, now)
            self._idle_since = seen

    def idle_held(self, uuid: str) -> bool:
        with self._lock:
            since = self._idle_since.get(uuid)
        return since is not None and self._clock() - since >= self.window


class AgentCollector(Collector):
    def __init__(
        self,
        latest: Callable[[], NodeInventory | None],
        holders: Callable[[], Mapping[int, str]],
        containers: Callable[[], Mapping[str, int] | None],
        idle: IdleTracker,
    ) -> None:
        self._latest = latest
        self._holders = holders
        self._containers = containers
        self._idle = idle

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        inv = self._latest()
        holders = self._holders()
        labels = ["gpu", "uuid"]
        g_util = GaugeMetricFamily("gpulease_gpu_utilization_percent", "GPU utilization (NVML), percent", labels=labels)
        g_mem = GaugeMetricFamily("gpulease_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=labels)
        g_total = GaugeMetricFamily("gpulease_gpu_memory_total_bytes", "GPU memory in all", labels=labels)
        g_temp = GaugeMetricFamily("gpulease_gpu_temperature_celsius", "GPU temperature (NVML)", labels=labels)
        g_power = GaugeMetricFamily("gpulease_gpu_power_watts", "GPU power draw (NVML)", labels=labels)
        c_ecc = CounterMetricFamily("gpulease_gpu_ecc_errors", "ECC errors since the driver loaded (NVML's "
                                    "aggregate count), by type", labels=[*labels, "type"])  # fmt: skip
        c_xid = CounterMetricFamily("gpulease_gpu_xid_errors", "XID errors NVML reported since the agent started",
                                    labels=labels)  # fmt: skip
        g_last_xid = GaugeMetricFamily("gpulease_gpu_last_xid", "Code of the last XID error NVML reported",
                                       labels=labels)  # fmt: skip
        g_healthy = GaugeMetricFamily("gpulease_gpu_healthy", "1 when the GPU is healthy, else 0", labels=labels)
        g_foreign = GaugeMetricFamily("gpulease_gpu_foreign_processes", "Processes on the GPU that gpulease did not "
                                      "start", labels=labels)  # fmt: skip
        g_foreign_use = GaugeMetricFamily("gpulease_gpu_foreign", "1 when something gpulease did not start uses the "
                                          "GPU (not handed out meanwhile)", labels=labels)  # fmt: skip
        g_alloc = GaugeMetricFamily("gpulease_gpu_allocation", "1 for the allocation holding the GPU (one series "
                                    "per allocated GPU)", labels=[*labels, "allocation"])  # fmt: skip
        g_idle = GaugeMetricFamily("gpulease_gpu_idle_held", f"1 for an allocated GPU under {IDLE_PERCENT}% "
                                   f"utilization for {self._idle.window:g}s or more", labels=labels)  # fmt: skip
        for g in inv.gpus if inv is not None else ():
            key = [str(g.index), g.uuid]
            if g.HasField("utilization_percent"):
                g_util.add_metric(key, g.utilization_percent)
            if g.HasField("memory_used_bytes"):
                g_mem.add_metric(key, g.memory_used_bytes)
            g_total.add_metric(key, g.memory_total_bytes)
            if g.HasField("temperature_c"):
                g_temp.add_metric(key, g.temperature_c)
            if g.HasField("power_draw_mw"):
                g_power.add_metric(key, g.power_draw_mw / 1000)
            if g.HasField("ecc_errors_corrected"):
                c_ecc.add_metric([*key, "corrected"], g.ecc_errors_corrected)
            if g.HasField("ecc_errors_uncorrected"):
                c_ecc.add_metric([*key, "uncorrected"], g.ecc_errors_uncorrected)
            if g.HasField("xid_errors"):
                c_xid.add_metric(key, g.xid_errors)
            if g.HasField("last_xid"):
                g_last_xid.add_metric(key, g.last_xid)
            g_healthy.add_metric(key, 1 if g.healthy else 0)
            g_foreign.add_metric(key, sum(1 for p in g.processes if not p.gpulease_managed))
            g_foreign_use.add_metric(key, 1 if g.foreign_processes else 0)
            if g.index in holders:
                g_alloc.add_metric([*key, holders[g.index]], 1)
            g_idle.add_metric(key, 1 if self._idle.idle_held(g.uuid) else 0)
        yield from (g_util, g_mem, g_total, g_temp, g_power, c_ecc, c_xid, g_last_xid, g_healthy, g_foreign,
                    g_foreign_use, g_alloc, g_idle)  # fmt: skip
        counts = self._containers()
        if counts is not None:
            states = Tally(dict.fromkeys(CONTAINER_STATES, 0))
            states.update(counts)
            g_cont = GaugeMetricFamily("gpulease_containers", "This node's gpulease containers by state",
                                       labels=["state"])  # fmt: skip
            for state, n in sorted(states.items()):
                g_cont.add_metric([state], n)
            yield g_cont


def new_registry(collector: AgentCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    return registry
