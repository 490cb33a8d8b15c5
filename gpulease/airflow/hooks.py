"""GpuLeaseHook: builds gpulease clients from an Airflow connection of type `gpulease`.

Connection fields: host (a coordinator, or several comma-separated as host1:port1,host2:port2),
port (default 50051), extra JSON: {"timeout": 10, "tls": false, "token": "..."}. tls and token
are read now for the coordinator's coming TLS and auth: until this client speaks TLS, tls=true
is refused rather than silently sent in clear text, and a token is ignored with a warning.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook

from gpulease.airflow._util import DEFAULT_PORT, ConnectionSettings, check_supported, settings_from, targets_from
from gpulease.client import Client

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
            "hidden_fields": ["schema", "login", "password"],
            "relabeling": {"host": "Coordinator(s) (host or host1:port1,host2:port2)"},
            "placeholders": {"port": str(DEFAULT_PORT), "extra": '{"timeout": 10, "tls": false}'},
        }

    def settings(self) -> ConnectionSettings:
        """The connection's coordinator targets, per-call timeout, TLS flag and token."""
        conn = self.get_connection(self.gpulease_conn_id)
        return settings_from(conn.host, conn.port, conn.extra_dejson)

    async def asettings(self) -> ConnectionSettings:
        """settings() for event-loop code (triggers): reads the connection without blocking the loop."""
        aget = getattr(self, "aget_connection", None)  # newer Task SDKs; with older ones a thread reads it
        if aget is not None:
            conn = await aget(self.gpulease_conn_id)
        else:
            conn = await asyncio.to_thread(self.get_connection, self.gpulease_conn_id)
        return settings_from(conn.host, conn.port, conn.extra_dejson)

    def _checked(self, settings: ConnectionSettings) -> ConnectionSettings:
        for warning in check_supported(settings, self.gpulease_conn_id):
            self.log.warning("%s", warning)
        return settings

    def client_for(self, settings: ConnectionSettings) -> Client:
        settings = self._checked(settings)
        # Airflow's task runner handles SIGTERM (it calls on_kill): the client must not take it over.
        return Client(config=settings.client_config(), handle_sigterm=False)

    def get_conn(self) -> Client:
        return self.client_for(self.settings())

    async def get_async_conn(self) -> AsyncClient:
        from gpulease.client.aio import AsyncClient

        settings = self._checked(await self.asettings())
        return AsyncClient(config=settings.client_config())
