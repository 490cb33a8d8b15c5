"""What the client's channels carry, built in one place for the sync and the asyncio channels:
TLS credentials from a ``TLSConfig`` (none: clear text) and the token, sent as
``authorization: Bearer <token>`` metadata on every call.

The token goes as per-call metadata rather than as gRPC call credentials: the same tuple serves
unary calls and streams, sync and asyncio, and no plugin thread runs per call. It is only ever sent
over TLS (``ClientConfig`` refuses a token without it), and nothing here puts it in a repr, a log
line or an error message.
"""

from __future__ import annotations

import grpc
import grpc.aio

from gpulease.client.retry import CHANNEL_OPTIONS
from gpulease.common.tls import TLSConfig, TlsFiles
from gpulease.errors import InvalidRequest

Metadata = tuple[tuple[str, str], ...]

# What each file must hold, so that a wrong file fails here with its name rather than at the first
# handshake with an OpenSSL error.
# File -> (a line its PEM holds, what that is).
_PEM = {
    "CA bundle": (b"-----BEGIN CERTIFICATE-----", "certificate"),
    "certificate": (b"-----BEGIN CERTIFICATE-----", "certificate"),
    "key": (b"PRIVATE KEY-----", "private key"),
}


class ChannelSecurity:
    """A client's TLS credentials (None: clear text) and per-call metadata (the token)."""

    def __init__(self, tls: TLSConfig | None = None, token: str | None = None) -> None:
        if token and tls is None:
            raise InvalidRequest("a token needs TLS, so that it never travels in clear text")
        self.tls = tls
        self.credentials = None if tls is None else _credentials(tls)
        self._metadata: Metadata = (("authorization", f"Bearer {token}"),) if token else ()

    @property
    def metadata(self) -> Metadata:
        """Sent with every call."""
        return self._metadata

    def __repr__(self) -> str:
        tls = (
            "clear text"
            if self.tls is None
            else f"TLS (CA {self.tls.ca}{', client certificate' if self.tls.mutual else ''})"
        )
        return f"ChannelSecurity({tls}, {'a token' if self._metadata else 'no token'})"

    def channel(self, target: str) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        return grpc.secure_channel(target, self.credentials, options=CHANNEL_OPTIONS)

    def aio_channel(self, target: str) -> grpc.aio.Channel:
        if self.credentials is None:
            return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        return grpc.aio.secure_channel(target, self.credentials, options=CHANNEL_OPTIONS)


def _credentials(tls: TLSConfig) -> grpc.ChannelCredentials:
    files = TlsFiles(tls)  # reads the files (InvalidRequest naming the one it cannot read)
    for what, path, data in (("CA bundle", tls.ca, files.ca), ("certificate", tls.cert, files.cert),
                             ("key", tls.key, files.key)):  # fmt: skip
        marker, holds = _PEM[what]
        if data is not None and marker not in data:
            raise InvalidRequest(f"the {what} {path} holds no PEM {holds}")
    return files.channel_credentials()
