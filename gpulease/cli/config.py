"""gpuctl's global settings, resolved once from flags and the environment into the client's own
typed configuration (gpulease.client.ClientConfig): where the coordinators are, the deadline, and
the credentials (CA, token, client certificate). Flags beat the environment; the environment
variables are the client library's own."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass

from gpulease.client import Client, ClientConfig
from gpulease.client.config import ENV_CA, ENV_CERT, ENV_COORDINATOR, ENV_KEY, ENV_TOKEN, ENV_TOKEN_FILE
from gpulease.common.settings import CLIENT_CALL_TIMEOUT_S
from gpulease.errors import InvalidRequest

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "ENV_CA",
    "ENV_CERT",
    "ENV_COORDINATOR",
    "ENV_KEY",
    "ENV_TOKEN",
    "ENV_TOKEN_FILE",
    "CliConfig",
    "resolve",
]

DEFAULT_TIMEOUT_S = CLIENT_CALL_TIMEOUT_S  # gpulease.common.settings: one value for every client
_REDACTED = "<token>"


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

    def redact(self, text: str) -> str:
        """text with the configured token replaced: no message gpuctl prints may carry it."""
        token = self.client_config.token
        return text.replace(token, _REDACTED) if token else text

    def client(self) -> Client:
        return Client(config=self.client_config)


def resolve(args: argparse.Namespace, environ: Mapping[str, str]) -> CliConfig:
    """gpuctl's global flags (--coordinator, --timeout, --ca, --token-file, --cert, --key) over the
    environment (GPULEASE_COORDINATOR, GPULEASE_CA, GPULEASE_TOKEN_FILE, GPULEASE_TOKEN,
    GPULEASE_CERT, GPULEASE_KEY) over the defaults. ValueError: unusable settings (exit 2)."""
    try:
        config = ClientConfig.resolve(
            args.coordinator,
            environ,
            timeout=args.timeout,
            ca=args.ca,
            token_file=args.token_file,
            cert=args.cert,
            key=args.key,
        )
    except InvalidRequest as exc:  # also an unreadable token file, a token without a CA
        raise ValueError(exc.message) from None
    return CliConfig(config)
