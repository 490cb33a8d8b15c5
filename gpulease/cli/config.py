"""gpuctl's global settings, resolved once from flags and the environment into the client's own
typed configuration (gpulease.client.ClientConfig)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gpulease.client import Client, ClientConfig
from gpulease.client.config import ENV_COORDINATOR
from gpulease.common.settings import CLIENT_CALL_TIMEOUT_S
from gpulease.errors import InvalidRequest

__all__ = ["DEFAULT_TIMEOUT_S", "ENV_COORDINATOR", "CliConfig", "resolve"]

DEFAULT_TIMEOUT_S = CLIENT_CALL_TIMEOUT_S  # gpulease.common.settings: one value for every client


@dataclass(frozen=True)
class CliConfig:
    client_config: ClientConfig

    @property
    def targets(self) -> tuple[str, ...]:
        """Coordinator addresses in the order to try them."""
        return self.client_config.targets

    @property
    def timeout(self) -> float:
        return self.client_config.timeout

    def client(self) -> Client:
        return Client(config=self.client_config)


def resolve(coordinator: str | None, timeout: float, environ: Mapping[str, str]) -> CliConfig:
    """--coordinator beats $GPULEASE_COORDINATOR beats the local default."""
    try:
        return CliConfig(ClientConfig.resolve(coordinator, environ, timeout=timeout))
    except InvalidRequest as exc:
        raise ValueError(exc.message) from None
