"""The client's configuration, typed (issue 12, point 8; issue 13): where the coordinators are, how
long one call may take, how long UNAVAILABLE is retried across them, and how the client proves who
it is. `Client(config=...)`, `AsyncClient(config=...)`, gpuctl and the Airflow hook all take it.

Security (issue 13):

- ``tls``: a ``TLSConfig`` (``gpulease.common.tls``, re-exported by ``gpulease.client``). Its CA
  bundle verifies the coordinator; with ``cert`` and ``key`` the client also presents a
  certificate (a coordinator's mutual-TLS port). None: clear text (a coordinator on loopback or
  started with --insecure).
- ``token``: a bearer token, sent as ``authorization: Bearer <token>`` on every call. It needs
  ``tls``: a token is never sent in clear text. It is hidden from the config's repr, and the client
  never writes it into a log line or an exception message.

``ClientConfig.resolve`` reads these the way gpuctl does: each flag beats its environment variable
(GPULEASE_CA, GPULEASE_TOKEN_FILE, GPULEASE_TOKEN, GPULEASE_CERT, GPULEASE_KEY), an empty value
counts as unset. A token file is read at once and stripped of surrounding whitespace; one that
other users may read or change is used, with a warning (a Kubernetes secret volume is 0644 unless
told otherwise, and refusing it would only push people to GPULEASE_TOKEN, which is worse).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gpulease.client._failover import parse_targets
from gpulease.client.retry import check_settings
from gpulease.common.settings import CLIENT_CALL_TIMEOUT_S
from gpulease.common.tls import TLSConfig
from gpulease.errors import InvalidRequest

DEFAULT_TARGET = "127.0.0.1:50051"
ENV_COORDINATOR = "GPULEASE_COORDINATOR"
ENV_CA = "GPULEASE_CA"
ENV_TOKEN_FILE = "GPULEASE_TOKEN_FILE"
ENV_TOKEN = "GPULEASE_TOKEN"
ENV_CERT = "GPULEASE_CERT"
ENV_KEY = "GPULEASE_KEY"

# What an HTTP/2 header value may hold without quoting: printable ASCII, no spaces.
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")

log = logging.getLogger("gpulease.client")

__all__ = [
    "DEFAULT_TARGET",
    "ENV_CA",
    "ENV_CERT",
    "ENV_COORDINATOR",
    "ENV_KEY",
    "ENV_TOKEN",
    "ENV_TOKEN_FILE",
    "ClientConfig",
    "RetryConfig",
    "TLSConfig",
    "read_token_file",
]


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
    # None: clear text. See the module's doc.
    tls: TLSConfig | None = None
    # A bearer token; needs tls. Not in repr: the config may be logged, the token must not be.
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # Checked here, once: a bad value fails where the configuration is made, not at the first call.
        object.__setattr__(self, "targets", parse_targets(self.targets))
        check_settings(self.timeout, self.retry.deadline)
        if self.token is not None:
            object.__setattr__(self, "token", check_token(self.token, has_tls=self.tls is not None))

    @classmethod
    def of(
        cls,
        targets: str | Sequence[str] = DEFAULT_TARGET,
        *,
        timeout: float = CLIENT_CALL_TIMEOUT_S,
        retry_deadline: float | None = None,
        tls: TLSConfig | None = None,
        token: str | None = None,
    ) -> ClientConfig:
        """From the loose arguments Client() has always taken ("h1:1,h2:2" or a list), plus the
        security settings (see the module's doc)."""
        return cls(parse_targets(targets), timeout, RetryConfig(retry_deadline), tls, token)

    @classmethod
    def resolve(
        cls,
        coordinator: str | None,
        environ: Mapping[str, str],
        *,
        timeout: float = CLIENT_CALL_TIMEOUT_S,
        ca: str | None = None,
        token_file: str | None = None,
        token: str | None = None,
        cert: str | None = None,
        key: str | None = None,
    ) -> ClientConfig:
        """gpuctl's rules: each flag (an argument here) beats its environment variable, which beats
        the default; empty counts as unset.

        --coordinator / GPULEASE_COORDINATOR (default: the local one); --ca / GPULEASE_CA (a CA
        bundle: enables TLS); the token: ``token`` or --token-file, else GPULEASE_TOKEN_FILE or
        GPULEASE_TOKEN (two sources at the same level are refused rather than one picked); --cert
        and --key / GPULEASE_CERT and GPULEASE_KEY, taken as a pair from one place (a flag of
        either makes the environment's pair ignored). A token or a certificate without a CA is
        refused: it would travel, or be useless, in clear text.
        """
        text = coordinator or environ.get(ENV_COORDINATOR) or DEFAULT_TARGET
        ca_path = ca or environ.get(ENV_CA) or ""
        # A pair from one place: a flag's certificate with the environment's key would not match.
        flags = (cert or "", key or "")
        pair = flags if any(flags) else (environ.get(ENV_CERT) or "", environ.get(ENV_KEY) or "")
        secret, source = _token_from(token, token_file, environ)
        if not ca_path:
            if secret is not None:
                raise InvalidRequest(
                    f"a token ({source}) needs TLS, so that it never travels in clear text: give --ca or set "
                    f"{ENV_CA} to the coordinator's CA bundle"
                )
            if any(pair):
                raise InvalidRequest(
                    f"a client certificate needs TLS: give --ca or set {ENV_CA} to the coordinator's CA bundle"
                )
        tls = TLSConfig(ca_path, *pair) if ca_path else None
        return cls.of(text, timeout=timeout, tls=tls, token=secret)


def check_token(token: str, *, has_tls: bool) -> str:
    """The token, stripped; InvalidRequest if it cannot be sent (never quoting it)."""
    if not has_tls:
        raise InvalidRequest(
            "a token needs TLS, so that it never travels in clear text: give the coordinator's CA "
            f"(--ca, {ENV_CA}, or ClientConfig(tls=TLSConfig(ca)))"
        )
    stripped = token.strip()
    if not stripped:
        raise InvalidRequest("the token is empty")
    if not _TOKEN_CHARS.fullmatch(stripped):
        raise InvalidRequest(
            "the token holds spaces, line breaks or characters other than printable ASCII: is it the right "
            "value (or file)?"
        )
    return stripped


def read_token_file(path: str) -> str:
    """A token file's text, stripped. Unreadable or empty: InvalidRequest. Readable or writable by
    other users: used, with a warning on the ``gpulease.client`` logger."""
    try:
        mode = os.stat(path).st_mode
        text = Path(path).read_text()
    except OSError as exc:
        raise InvalidRequest(f"cannot read the token file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InvalidRequest(f"the token file {path} is not text") from None
    if mode & 0o077:
        log.warning(
            "the token file %s can be read or changed by other users (mode %03o): chmod 600 it", path, mode & 0o777
        )
    token = text.strip()
    if not token:
        raise InvalidRequest(f"the token file {path} is empty")
    return token


def _token_from(token: str | None, token_file: str | None, environ: Mapping[str, str]) -> tuple[str | None, str]:
    """The token and where it came from (for messages; never the token itself)."""
    if token and token_file:
        raise InvalidRequest("give a token or a token file, not both")
    if token:
        return token, "given"
    if token_file:
        return read_token_file(token_file), f"--token-file {token_file}"
    env_file, env_token = environ.get(ENV_TOKEN_FILE) or "", environ.get(ENV_TOKEN) or ""
    if env_file and env_token:
        raise InvalidRequest(f"both {ENV_TOKEN} and {ENV_TOKEN_FILE} are set: unset one of them")
    if env_file:
        return read_token_file(env_file), f"{ENV_TOKEN_FILE}={env_file}"
    if env_token:
        return env_token, ENV_TOKEN
    return None, ""
