"""The coordinator's HTTP side (issue 16): on ``http_listen``, in the same event loop as gRPC.

Served now:
  /metrics   Prometheus text (coordinator/metrics.py); a bearer token off loopback
  /healthz   200 while the process runs
  /readyz    200 once the view is in sync with etcd, else 503 with the reason

  /          the dashboard; /api/v1/ the JSON it reads; /api/v1/stream server-sent events
             (coordinator/dashboard.py: a viewer token when the coordinator has TLS)
"""

from __future__ import annotations

from aiohttp import web

from gpulease.common import httpserve
from gpulease.coordinator.dashboard import Dashboard
from gpulease.coordinator.metrics import CoordinatorMetrics, ViewCollector, ask_etcd_revision
from gpulease.coordinator.store import Store
from gpulease.coordinator.view import ClusterView


def build_app(
    metrics: CoordinatorMetrics,
    collector: ViewCollector,
    view: ClusterView,
    store: Store,
    *,
    token: str = "",
    dashboard: Dashboard | None = None,
) -> web.Application:
    def ready() -> str | None:
        if view.synced.is_set():
            return None
        return view.last_error or "the view has not loaded the cluster from etcd yet"

    async def before_scrape() -> None:
        await ask_etcd_revision(collector, lambda: _etcd_revision(store))

    app = httpserve.new_app(metrics.registry, token=token, ready=ready, before_scrape=before_scrape)
    # The dashboard at /, its JSON under /api/v1/ and the event stream (coordinator/dashboard.py),
    # with the coordinator's own credential rules (main.py builds it with the token store and TLS).
    if dashboard is not None:
        dashboard.add_routes(app)
    return app


async def _etcd_revision(store: Store) -> int:
    """etcd's current revision: an empty transaction (reads and writes nothing) answers it."""
    return (await store.txn([], [])).revision
