"""GpuLeaseHook: builds gpulease clients from an Airflow connection of type `gpulease`.

Connection fields: host (a coordinator, or several comma-separated as host1:port1,host2:port2),
port (default 50051), extra JSON: {"timeout": 10, "tls": false, "token": "..."} (tls and token
are accepted now and used once the coordinator serves TLS and auth).
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook

from typing import TYPE_CHECKING

from gpulease.client import Client
from gpulease.errors import InvalidRequest

if TYPE_CHECKING:
    from gpulease.client.aio import AsyncClient

DEFAULT_PORT = 50051


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

    def settings(self) -> tuple[list[str], float]:
        """(coordinator targets, per-call timeout) from the connection."""
        conn = self.get_connection(self.gpulease_conn_id)
        return targets_from(conn.host or "", conn.port), float(conn.extra_dejson.get("timeout", 10))

    def get_conn(self) -> Client:
        targets, timeout = self.settings()
        return Client(targets, timeout=timeout)

    def get_async_conn(self) -> AsyncClient:
        from gpulease.client.aio import AsyncClient

        targets, timeout = self.settings()
        return AsyncClient(targets, timeout=timeout)


def targets_from(host: str, port: int | None) -> list[str]:
    hosts = [h.strip() for h in host.split(",") if h.strip()]
    if not hosts:
        raise InvalidRequest("the gpulease connection has no host: set it to the coordinator's address")
    return [h if ":" in h else f"{h}:{port or DEFAULT_PORT}" for h in hosts]
