"""The daemons' HTTP side (issue 16): /metrics, /healthz and /readyz on aiohttp, in the daemon's
own event loop. Shared by the coordinator (coordinator/http_api.py adds its routes) and the agent.

Daemon-only: the client library never imports this module (aiohttp and prometheus-client are
installed with the coordinator and agent extras only; tests/unit/test_module_boundaries.py).

Auth: /metrics is open on a loopback address. On any other address a bearer token is required
(``metrics_token_file``); without one the daemon refuses to start (``check_listen``), so a
metrics port is never exposed to the network by accident. /healthz and /readyz say nothing but
"alive" and "synced or not" and stay open: load balancers and systemd probes have no token.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from gpulease.common.settings import ConfigError, split_host_port
from gpulease.common.transport import is_loopback

log = logging.getLogger(__name__)

# Called before each scrape (e.g. to ask etcd for its revision); must not take long.
BeforeScrape = Callable[[], Awaitable[None]]
# None when ready, else why not.
Readiness = Callable[[], str | None]

REGISTRY_KEY = web.AppKey("registry", CollectorRegistry)


def check_listen(listen: str, token_file: str, *, flag: str = "--http-listen") -> None:
    """ConfigError unless ``listen`` is empty (off), a HOST:PORT on loopback, or has a token file."""
    if not listen:
        return
    try:
        split_host_port(listen)
    except ValueError as exc:
        raise ConfigError(f"bad {flag} address: {exc}") from None
    if not is_loopback(listen) and not token_file:
        raise ConfigError(
            f"{flag} {listen} is not a loopback address, and /metrics there would be open to the network: "
            "set metrics_token_file (--metrics-token-file) to a file holding the bearer token scrapers must send, "
            f"or listen on 127.0.0.1 (or set {flag} to '' to turn the HTTP side off)"
        )


def read_token(path: str) -> str:
    """The bearer token from ``path`` (surrounding whitespace dropped); ConfigError if unreadable or empty."""
    if not path:
        return ""
    try:
        with open(path, encoding="utf-8") as fh:
            token = fh.read().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read metrics_token_file {path}: {exc.strerror or exc}") from exc
    if not token:
        raise ConfigError(f"metrics_token_file {path} is empty")
    return token


def new_app(
    registry: CollectorRegistry,
    *,
    token: str = "",
    ready: Readiness = lambda: None,
    before_scrape: BeforeScrape | None = None,
) -> web.Application:
    """An application serving /metrics (``registry``, behind ``token`` when set), /healthz and
    /readyz. Callers add their own routes to it before starting it."""
    app = web.Application()
    app[REGISTRY_KEY] = registry

    async def metrics(request: web.Request) -> web.Response:
        if token and not _bearer_ok(request, token):
            return web.Response(status=401, text="a bearer token is required\n",
                                headers={"WWW-Authenticate": 'Bearer realm="gpulease metrics"'})  # fmt: skip
        if before_scrape is not None:
            await before_scrape()
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        why = ready()
        if why is None:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=f"not ready: {why}\n")

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


def _bearer_ok(request: web.Request, token: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


class HttpServer:
    """An aiohttp application on one HOST:PORT, in the running event loop."""

    def __init__(self, app: web.Application, listen: str) -> None:
        self._app = app
        self.listen = listen
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        host, port = split_host_port(self.listen)
        runner = web.AppRunner(self._app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(exc.errno, f"cannot listen for HTTP on {self.listen}: {exc.strerror or exc} "
                                     "(is the port in use? set --http-listen)") from exc  # fmt: skip
        self._runner = runner
        server = site._server
        sockets = getattr(server, "sockets", None) or ()
        self.port = sockets[0].getsockname()[1] if sockets else port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
