"""The coordinator's HTTP side (issue 16): on ``http_listen``, in the same event loop as gRPC.

Served now:
  /metrics   Prometheus text (coordinator/metrics.py); a bearer token off loopback
  /healthz   200 while the process runs
  /readyz    200 once the view is in sync with etcd, else 503 with the reason

Later parts add their routes in ``build_app`` below, each behind its own credential check:
the dashboard at ``/``, the JSON it reads under ``/api/v1/``, and the server-sent event stream.
"""

from __future__ import annotations

from aiohttp import web

from gpulease.common import httpserve
from gpulease.coordinator.metrics import CoordinatorMetrics, ViewCollector, ask_etcd_revision
from gpulease.coordinator.store import Store
from gpulease.coordinator.view import ClusterView


def build_app(
    metrics: CoordinatorMetrics, collector: ViewCollector, view: ClusterView, store: Store, *, token: str = ""
) -> web.Application:
    def ready() -> str | None:
        if view.synced.is_set():
            return None
        return view.last_error or "the view has not loaded the cluster from etcd yet"

    async def before_scrape() -> None:
        await ask_etcd_revision(collector, lambda: _etcd_revision(store))

    app = httpserve.new_app(metrics.registry, token=token, ready=ready, before_scrape=before_scrape)
    # Later: app.router.add_get("/", ...) (the dashboard), the /api/v1/ JSON and the SSE stream.
    return app


async def _etcd_revision(store: Store) -> int:
    """etcd's current revision: an empty transaction (reads and writes nothing) answers it."""
    return (await store.txn([], [])).revision
