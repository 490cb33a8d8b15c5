"""The client's configuration, typed (issue 12, point 8): where the coordinators are, how long one
call may take, and how long UNAVAILABLE is retried across them. TLS joins it with the security
issue. `Client(config=...)`, `AsyncClient(config=...)`, gpuctl and the Airflow hook all take it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from gpulease.client._failover import parse_targets
from gpulease.client.retry import check_settings
from gpulease.common.settings import CLIENT_CALL_TIMEOUT_S

DEFAULT_TARGET = "127.0.0.1:50051"
ENV_COORDINATOR = "GPULEASE_COORDINATOR"


@dataclass(frozen=True)
class RetryConfig:
    """After UNAVAILABLE a call tries every coordinator in turn, then in rounds with backoff, for up
    to `deadline` seconds (None: the call's timeout; 0: one round only)."""

    deadline: float | None = None


@dataclass(frozen=True)
class ClientConfig:
    targets: tuple[str, ...] = (DEFAULT_TARGET,)
    # The deadline of one attempt at one coordinator, in seconds.
    timeout: float = CLIENT_CALL_TIMEOUT_S
    retry: RetryConfig = field(default_factory=RetryConfig)

    def __post_init__(self) -> None:
        # Checked here, once: a bad value fails where the configuration is made, not at the first call.
        object.__setattr__(self, "targets", parse_targets(self.targets))
        check_settings(self.timeout, self.retry.deadline)

    @classmethod
    def of(cls, targets: str | Sequence[str] = DEFAULT_TARGET, *, timeout: float = CLIENT_CALL_TIMEOUT_S,
           retry_deadline: float | None = None) -> ClientConfig:  # fmt: skip
        """From the loose arguments Client() has always taken ("h1:1,h2:2" or a list)."""
        return cls(parse_targets(targets), timeout, RetryConfig(retry_deadline))

    @classmethod
    def resolve(
        cls, coordinator: str | None, environ: Mapping[str, str], *, timeout: float = CLIENT_CALL_TIMEOUT_S
    ) -> ClientConfig:
        """--coordinator beats $GPULEASE_COORDINATOR beats the local default."""
        text = coordinator if coordinator is not None else environ.get(ENV_COORDINATOR) or DEFAULT_TARGET
        return cls.of(text, timeout=timeout)
