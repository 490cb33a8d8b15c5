"""The coordinator's Prometheus metrics (issue 16, part 2), on a registry of its own.

Counters and histograms are updated where things happen (the RPC wrapper, the store, the commit
path, the view's expiry hook). Gauges are computed at scrape time from the view (``ViewCollector``),
so nothing is updated per event and a scrape costs one pass over nodes and allocations.

Cardinality is low on purpose: label values come from small fixed sets (states, outcomes, error
reasons), tenants, or GPU-model pools; never allocation ids, nodes or users. docs/operations.md
lists every metric.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpulease.coordinator.committer import CommitResult, Committer, Item, Rejected
from gpulease.coordinator.domain import Allocation, NodeView, Snapshot
from gpulease.coordinator.liveness import Timing
from gpulease.coordinator.view import ClusterView

GPU_STATES = ("free", "allocated", "unhealthy", "foreign", "cordoned", "down")
NODE_STATES = ("up", "cordoned", "down")
# The label of allocations and pending requests without a tenant.
NO_TENANT = "none"
# The label of the pool of requests that name no GPU model.
ANY_MODEL = "any"
# The RPCs counted by gpulease_allocate_requests_total.
ALLOCATE_RPCS = frozenset({"Allocate", "WaitAllocate"})

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_WAIT_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def gpu_state(view: NodeView, index: int, healthy: bool, foreign: bool) -> str:
    """One state per GPU, so that the states add up to every GPU: held first (a held GPU on a down
    node is still held), then the node's state, then the GPU's own."""
    if index in view.gpus_held:
        return "allocated"
    if not view.up:
        return "down"
    if view.info.cordoned:
        return "cordoned"
    if not healthy:
        return "unhealthy"
    if foreign:
        return "foreign"
    return "free"


class CoordinatorMetrics:
    """Every metric of one coordinator, on its own registry (several coordinators in one test
    process must not share the global one)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.allocate_requests = Counter(
            "gpulease_allocate_requests", "Allocate and WaitAllocate calls by outcome (ok, error, cancelled) and "
            "error reason (the gpulease-reason of the error; empty when ok)", ("outcome", "reason"), registry=r,
        )  # fmt: skip
        self.allocate_seconds = Histogram(
            "gpulease_allocate_seconds", "Time to answer an Allocate call (not WaitAllocate, which waits)",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.etcd_txn_seconds = Histogram(
            "gpulease_etcd_txn_seconds", "Time of one etcd transaction, sent to answered (every transaction)",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.commit_conflicts = Counter(
            "gpulease_commit_conflicts", "Allocation commits etcd refused because a compare failed (the view was "
            "stale, or another replica got there first); each is retried on a newer view", registry=r,
        )  # fmt: skip
        self.commit_batch_size = Histogram(
            "gpulease_commit_batch_size", "Allocations carried by one commit transaction",
            buckets=_BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.lease_expiries = Counter(
            "gpulease_lease_expiries", "Allocations that ended without a release (their lease expired: the "
            "client stopped renewing)", registry=r,
        )  # fmt: skip
        self.queue_wait_seconds = Histogram(
            "gpulease_queue_wait_seconds", "Time from queued to admitted, for requests admitted by this replica",
            buckets=_WAIT_BUCKETS, registry=r,
        )  # fmt: skip

    def observe_rpc(self, rpc: str, outcome: str, reason: str, seconds: float) -> None:
        """Called by the RPC wrapper (coordinator/guard.py) for every RPC: counts the allocating ones."""
        if rpc not in ALLOCATE_RPCS:
            return
        self.allocate_requests.labels(outcome, reason).inc()
        if rpc == "Allocate":
            self.allocate_seconds.observe(seconds)

    def observe_commit(self, batch: int, conflict: bool) -> None:
        self.commit_batch_size.observe(batch)
        if conflict:
            self.commit_conflicts.inc()

    def observe_expired(self, alloc: Allocation) -> None:
        self.lease_expiries.inc()

    def observe_admitted(self, queued_unix_ms: int) -> None:
        self.queue_wait_seconds.observe(max(0.0, time.time() - queued_unix_ms / 1000))


class MeteredCommitter:
    """A Committer that counts its batches and conflicts (the transaction's time is the store's)."""

    def __init__(self, inner: Committer, metrics: CoordinatorMetrics) -> None:
        self._inner = inner
        self._metrics = metrics

    async def commit(self, items: Sequence[Item], snapshot: Snapshot) -> CommitResult:
        out = await self._inner.commit(items, snapshot)
        self._metrics.observe_commit(len(items), isinstance(out, Rejected))
        return out


class ViewCollector(Collector):
    """Gauges read from the view at scrape time. ``etcd_revision`` is etcd's revision as last asked
    (by the HTTP side before the scrape; 0: unknown), for the view's lag."""

    def __init__(self, view: ClusterView, pending: Callable[[], list[str]] | None = None) -> None:
        self._view = view
        # The pool of every pending request (the queue's).
        self._pending = pending
        self.etcd_revision = 0
        # The heartbeat interval and node TTL agents are told now (coordinator/liveness.py).
        self.liveness_timing: Callable[[], Timing] | None = None

    def describe(self) -> Iterator[Metric]:
        return iter(())  # collected at scrape time only

    def collect(self) -> Iterator[Metric]:
        view = self._view
        synced = view.synced.is_set()
        yield _gauge("gpulease_view_synced", "1 when the view is in sync with etcd (/readyz), else 0", [((), synced)])
        lag = max(0, self.etcd_revision - view.revision) if self.etcd_revision else 0
        yield _gauge("gpulease_view_lag_revisions", "etcd's revision minus the view's, asked before the scrape "
                     "(0 when etcd could not be asked)", [((), lag)])  # fmt: skip
        resyncs = CounterMetricFamily(
            "gpulease_view_resyncs",
            "Times the view reloaded everything from etcd after its first load (compaction, or an etcd outage)",
        )
        resyncs.add_metric([], float(max(0, view.loads - 1)))
        yield resyncs
        yield _gauge("gpulease_view_revision", "The etcd revision the view has applied", [((), view.revision)])
        if not synced:
            return  # an unsynced view would report an empty cluster
        if self.liveness_timing is not None:
            t = self.liveness_timing()
            yield _gauge("gpulease_node_heartbeat_interval_seconds", "The heartbeat interval agents are told now "
                         "(grows past max_heartbeats_per_second)", [((), t.heartbeat_interval)])  # fmt: skip
            yield _gauge("gpulease_node_ttl_seconds", "How long a node may be silent before it is down, now",
                         [((), t.node_ttl)])  # fmt: skip
        gpus = dict.fromkeys(GPU_STATES, 0)
        nodes = dict.fromkeys(NODE_STATES, 0)
        for v in view.nodes():
            nodes[v.state.value] += 1
            for g in v.info.gpus:
                gpus[gpu_state(v, g.index, g.healthy, g.foreign)] += 1
        yield _gauge("gpulease_gpus", "GPUs by state (each GPU in one: allocated, down, cordoned, unhealthy, "
                     "foreign, free, in that order of precedence)",
                     [((s,), n) for s, n in gpus.items()], ("state",))  # fmt: skip
        yield _gauge("gpulease_nodes", "Registered nodes by state", [((s,), n) for s, n in nodes.items()], ("state",))
        live = Tally(a.tenant or NO_TENANT for a in view.allocations())
        yield _gauge("gpulease_allocations_live", "Live allocations by tenant",
                     [((t,), n) for t, n in sorted(live.items())], ("tenant",))  # fmt: skip
        if self._pending is not None:
            pools = Tally(p or ANY_MODEL for p in self._pending())
            yield _gauge("gpulease_queue_pending", "Requests waiting in the queue, by pool (GPU model; 'any')",
                         [((p,), n) for p, n in sorted(pools.items())], ("pool",))  # fmt: skip


def _gauge(name: str, doc: str, samples: list[tuple[tuple[str, ...], float]], labels: tuple[str, ...] = ()) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    for values, value in samples:
        family.add_metric(list(values), float(value))
    return family


async def ask_etcd_revision(collector: ViewCollector, current: Callable[[], Awaitable[int]],
                            timeout: float = 1.0) -> None:  # fmt: skip
    """Before a scrape: etcd's current revision, for the lag (0, i.e. unknown, when etcd does not answer)."""
    try:
        async with asyncio.timeout(timeout):
            collector.etcd_revision = await current()
    except Exception:
        collector.etcd_revision = 0
