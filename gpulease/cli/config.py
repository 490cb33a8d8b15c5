"""gpuctl's global settings, resolved once from flags and the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gpulease.client import DEFAULT_TARGET, Client
from gpulease.settings import CLIENT_CALL_TIMEOUT_S

ENV_COORDINATOR = "GPULEASE_COORDINATOR"
DEFAULT_TIMEOUT_S = CLIENT_CALL_TIMEOUT_S  # gpulease.settings: one value for every client


@dataclass(frozen=True)
class CliConfig:
    # Coordinator addresses in the order to try them.
    targets: tuple[str, ...]
    timeout: float

    def client(self) -> Client:
        return Client(self.targets, timeout=self.timeout)


def split_targets(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def resolve(coordinator: str | None, timeout: float, environ: Mapping[str, str]) -> CliConfig:
    """--coordinator beats $GPULEASE_COORDINATOR beats the local default."""
    text = coordinator if coordinator is not None else environ.get(ENV_COORDINATOR) or DEFAULT_TARGET
    targets = split_targets(text)
    if not targets:
        raise ValueError(f"no coordinator address in {text!r}: expected HOST:PORT[,HOST:PORT...]")
    return CliConfig(targets=targets, timeout=timeout)
