"""TLS material from files, re-read when the files change, for gRPC servers and channels.

Rotation without a restart: a server's credentials are fetched again on every new handshake
(gRPC's dynamic SSL credentials), and the fetch re-reads the files when their size or mtime
changed, or after SIGHUP (``request_reload``). Connections already open keep the certificate
they were made with. Channel owners ask ``TlsFiles.generation`` and build a new channel for new
calls when it moved (gpulease.coordinator.agents, the agent's coordinator channel).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from gpulease.errors import InvalidRequest

log = logging.getLogger("gpulease.tls")


@dataclass(frozen=True)
class TLSConfig:
    """Where a process's TLS material lives. ``ca`` alone: verify the server (a token client).
    With ``cert`` and ``key`` too: present a certificate (mutual TLS)."""

    ca: str
    cert: str = ""
    key: str = ""

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise InvalidRequest("a certificate needs its key and a key its certificate (give both --cert and --key)")

    @property
    def mutual(self) -> bool:
        return bool(self.cert)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidRequest(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


def _stamp(paths: tuple[str, ...]) -> tuple[tuple[int, int, int], ...]:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((0, 0, 0))
    return tuple(out)


class TlsFiles:
    """One process's CA, certificate and key, loaded now and again whenever they change."""

    def __init__(self, config: TLSConfig) -> None:
        self.config = config
        self._paths = tuple(p for p in (config.ca, config.cert, config.key) if p)
        self._lock = threading.Lock()
        self._forced = False
        self.generation = 0
        self._stamp = _stamp(self._paths)
        self.ca, self.cert, self.key = self._load()

    def _load(self) -> tuple[bytes, bytes | None, bytes | None]:
        ca = _read(self.config.ca, "CA bundle")
        cert = _read(self.config.cert, "certificate") if self.config.cert else None
        key = _read(self.config.key, "key") if self.config.key else None
        return ca, cert, key

    def request_reload(self) -> None:
        """SIGHUP: re-read on the next check even if the files look unchanged."""
        with self._lock:
            self._forced = True

    def refresh(self) -> bool:
        """Re-read the files if they changed (or a reload was asked for); True when they were.

        A half-written rotation (unreadable or mismatched files) keeps the old material and logs.
        """
        stamp = _stamp(self._paths)
        with self._lock:
            if stamp == self._stamp and not self._forced:
                return False
            self._forced = False
            self._stamp = stamp
        try:
            ca, cert, key = self._load()
            if cert is not None and key is not None:
                _check_pair(cert, key)
        except (InvalidRequest, ValueError, RuntimeError) as exc:
            log.error("TLS files changed but cannot be loaded; keeping the previous ones: %s", exc)
            return False
        with self._lock:
            self.ca, self.cert, self.key = ca, cert, key
            self.generation += 1
        log.info("TLS files reloaded (generation %d)", self.generation)
        return True

    def server_credentials(self, *, require_client_cert: bool) -> grpc.ServerCredentials:
        if self.cert is None or self.key is None:
            raise InvalidRequest("a TLS server needs a certificate and a key")

        def config() -> grpc.ServerCertificateConfiguration:
            assert self.cert is not None and self.key is not None
            return grpc.ssl_server_certificate_configuration([(self.key, self.cert)], self.ca)

        seen = [self.generation]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # Called by gRPC on each new handshake: a stat() per connection, a read only on change.
            self.refresh()
            if self.generation == seen[0]:
                return None
            seen[0] = self.generation
            return config()

        return grpc.dynamic_ssl_server_credentials(config(), fetch, require_client_authentication=require_client_cert)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca, self.key, self.cert)


def _check_pair(cert: bytes, key: bytes) -> None:
    """ValueError unless ``key`` is the private key of ``cert``: a rotation caught between its two
    renames must keep the old pair, not serve a mismatched one (gRPC would accept it)."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
    except ImportError:  # the light client install: nothing to compare with; gRPC will complain
        return
    public = x509.load_pem_x509_certificate(cert).public_key()
    private = serialization.load_pem_private_key(key, None)
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if public.public_bytes(*fmt) != private.public_key().public_bytes(*fmt):
        raise ValueError("the key does not belong to the certificate (a rotation half done?)")
