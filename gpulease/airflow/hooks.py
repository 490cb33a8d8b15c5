"""GpuLeaseHook: builds gpulease clients from an Airflow connection of type `gpulease`.

Connection fields:

- host: a coordinator, or several comma-separated as host1:port1,host2:port2; port: the default
  port (50051).
- password: a gpulease token (`gpuctl token create`). Airflow masks the password field in task
  logs and the UI; the token is sent only over TLS, and the provider never logs it, puts it in an
  exception message, an XCom or a trigger's serialized arguments (the trigger reads the connection
  again by its id).
- extra JSON: {"timeout": 10, "ca": "/etc/gpulease/ca.pem", "cert": "...", "key": "..."}. "ca",
  the coordinator's CA bundle, enables TLS: a path on the worker, or the PEM text itself. "cert"
  and "key" (paths) present a client certificate, for a coordinator's mutual-TLS port.

Example: AIRFLOW_CONN_GPULEASE_DEFAULT='{"conn_type": "gpulease", "host": "coord:50051",
"password": "gpl_...", "extra": {"ca": "/etc/gpulease/ca.pem"}}'.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook

from gpulease.airflow._util import DEFAULT_PORT, ConnectionSettings, settings_from, targets_from
from gpulease.client import Client
from gpulease.errors import GpuLeaseError

if TYPE_CHECKING:
    from gpulease.client.aio import AsyncClient

__all__ = ["DEFAULT_PORT", "ConnectionSettings", "GpuLeaseHook", "targets_from"]


class GpuLeaseHook(BaseHook):
    conn_name_attr = "gpulease_conn_id"
    default_conn_name = "gpulease_default"
    conn_type = "gpulease"
    hook_name = "gpulease"

    def __init__(self, gpulease_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.gpulease_conn_id = gpulease_conn_id

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {
            "hidden_fields": ["schema", "login"],
            "relabeling": {"host": "Coordinator(s) (host or host1:port1,host2:port2)", "password": "Token"},
            "placeholders": {
                "port": str(DEFAULT_PORT),
                "password": "a gpulease token (gpuctl token create); needs a CA in the extra",
                "extra": '{"timeout": 10, "ca": "/etc/gpulease/ca.pem"}',
            },
        }

    def settings(self) -> ConnectionSettings:
        """The connection's coordinator targets, per-call timeout, TLS files and token."""
        conn = self.get_connection(self.gpulease_conn_id)
        return settings_from(conn.host, conn.port, conn.extra_dejson, conn.password)

    async def asettings(self) -> ConnectionSettings:
        """settings() for event-loop code (triggers): reads the connection without blocking the loop."""
        aget = getattr(self, "aget_connection", None)  # newer Task SDKs; with older ones a thread reads it
        if aget is not None:
            conn = await aget(self.gpulease_conn_id)
        else:
            conn = await asyncio.to_thread(self.get_connection, self.gpulease_conn_id)
        return settings_from(conn.host, conn.port, conn.extra_dejson, conn.password)

    def client_for(self, settings: ConnectionSettings) -> Client:
        # Airflow's task runner handles SIGTERM (it calls on_kill): the client must not take it over.
        return Client(config=settings.client_config(), handle_sigterm=False)

    def get_conn(self) -> Client:
        return self.client_for(self.settings())

    def test_connection(self) -> tuple[bool, str]:
        """The UI's "Test" button: who the coordinator takes this connection for (WhoAmI)."""
        try:
            with self.get_conn() as client:
                me = client.whoami()
        except GpuLeaseError as exc:
            return False, f"{type(exc).__name__}: {exc.message}"
        return True, f"connected as {me.principal} (role {me.role or '-'}, tenant {me.tenant or '-'}, by {me.method})"

    async def get_async_conn(self) -> AsyncClient:
        from gpulease.client.aio import AsyncClient

        settings = await self.asettings()
        return AsyncClient(config=settings.client_config())
