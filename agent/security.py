"""The agent's transport security: its TLS files, what its own certificate must name, and who may call it.

An agent runs containers as root on a GPU server, so (issue 13):

- With TLS files (``--tls-ca``, ``--tls-cert``, ``--tls-key``) it serves mutual TLS only, requiring
  a client certificate signed by the CA, and dials its coordinator with the same certificate,
  checking the coordinator's against the CA and its host name.
- Its own certificate must name it: the URI SAN ``spiffe://gpulease/agent/<node>`` and the node
  name as a DNS name, which is what a coordinator checks when it dials the node's agent (so an
  address given in RegisterNode cannot send one node's containers to another host). ``load_tls``
  refuses to start otherwise (exit 2), before anything is served.
- Every AgentService RPC accepts only a coordinator's certificate (``coordinators_only``): a
  user's or another agent's certificate is refused with PERMISSION_DENIED, a certificate naming no
  gpulease identity with UNAUTHENTICATED, before the servicer runs. A certificate from another CA
  never gets that far: the TLS handshake fails. The health service stays open to any certificate
  the CA signed: it says SERVING or not, and nothing else.
- Without TLS the agent serves clear text on loopback only, unless ``--insecure`` (checked in
  gpulease.agent.config), and talks to a coordinator on loopback only, unless ``--insecure``
  (checked here).
"""

from __future__ import annotations

import datetime
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from gpulease.agent.config import TLS_FLAGS, AgentConfig
from gpulease.common.grpc_errors import grpc_errors
from gpulease.common.identity import Kind, Principal, uri_for
from gpulease.common.pki import principal_of
from gpulease.common.settings import ConfigError
from gpulease.common.tls import TLSConfig, TlsFiles
from gpulease.common.transport import is_loopback
from gpulease.errors import InvalidRequest, PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)

C = TypeVar("C", bound=type)

# What a coordinator's certificate names; the rule a refusal quotes.
COORDINATOR_RULE = f"only a coordinator may call an agent (a certificate naming {uri_for(Kind.COORDINATOR, '<name>')})"


def load_tls(cfg: AgentConfig) -> TlsFiles | None:
    """The agent's TLS files, read now and checked to name this node; None without TLS.

    ConfigError (exit 2) when a file cannot be read, the certificate does not name
    ``agent:<node_id>``, or, without TLS and without --insecure, the coordinator is not on loopback.
    """
    if not cfg.tls_enabled:
        # Every replica: heartbeats and fencing checks fail over to each of them.
        remote = next((a for a in cfg.coordinators if not is_loopback(a)), None)
        if not cfg.insecure and remote is not None:
            raise ConfigError(
                f"refusing to talk to the coordinator at {remote} in clear text: heartbeats and fencing "
                f"checks could be read or forged on the way. Give TLS files ({TLS_FLAGS}), or pass --insecure to "
                "accept the risk"
            )
        return None
    assert cfg.tls_ca is not None and cfg.tls_cert is not None and cfg.tls_key is not None
    try:
        files = TlsFiles(TLSConfig(cfg.tls_ca, cfg.tls_cert, cfg.tls_key))
        assert files.cert is not None and files.key is not None
        grpc.ssl_server_certificate_configuration([(files.key, files.cert)], files.ca)  # parses, or raises
    except InvalidRequest as e:
        raise ConfigError(f"TLS: {e.message}") from None
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"TLS: the files {cfg.tls_cert} and {cfg.tls_key} cannot be used: {e}") from None
    problem = certificate_problem(files.cert, files.key, cfg.node_id)
    if problem is not None:
        raise ConfigError(f"TLS: the certificate {cfg.tls_cert} {problem}")
    return files


def certificate_problem(cert_pem: bytes, key_pem: bytes, node: str) -> str | None:
    """Why this certificate (and key) cannot be node ``node``'s agent certificate, or None when it can.

    It must name ``spiffe://gpulease/agent/<node>`` (and nothing else of ours), carry ``node`` as a
    DNS name (what a coordinator checks when it dials the agent), match the key, be valid now, and,
    if it limits its use, allow both server and client authentication (the agent serves the
    coordinator and dials it).
    """
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.x509.oid import ExtendedKeyUsageOID
    except ImportError:
        return "cannot be checked: the agent needs the 'cryptography' package (pip install cryptography)"
    expected = Principal(Kind.AGENT, node)
    try:
        found = principal_of(cert_pem)
        cert = x509.load_pem_x509_certificate(cert_pem)
    except (ValueError, InvalidRequest) as e:
        return f"cannot be read: {e}"
    if found != expected:
        named = f"names {found}" if found is not None else "names no gpulease identity"
        return (
            f"{named}, but this agent is node {node!r}: it must carry the URI SAN {uri_for(Kind.AGENT, node)} "
            f"(issue one with `gpuctl certs issue agent {node} --dir DIR`)"
        )
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns = []
    if node not in dns:
        return (
            f"names {expected} but lacks the DNS name {node!r}: a coordinator dialling node {node} checks that name "
            "(TLS host name check), so it could not reach this agent"
        )
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        key = serialization.load_pem_private_key(key_pem, None)
    except (ValueError, TypeError) as e:
        return f"has a key that cannot be read (a PEM key without a passphrase is needed): {e}"
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        return "does not match its key (they come from different issues): give the key issued with it"
    now = datetime.datetime.now(datetime.UTC)
    if now < cert.not_valid_before_utc:
        return f"is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC"
    if now > cert.not_valid_after_utc:
        return f"expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
    try:
        usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return None  # no limit on its use
    missing = [
        name
        for name, oid in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH))
        if oid not in usages
    ]
    if missing:
        return (
            f"does not allow {' and '.join(missing)} authentication (extended key usage): the agent serves "
            "its coordinator and dials it with the same certificate"
        )
    return None


def caller(context: grpc.aio.ServicerContext[Any, Any]) -> Principal | None:
    """The principal a mutual-TLS caller's verified certificate names; None on a clear-text port.

    A clear-text port exists only where the configuration allowed it (loopback, or --insecure),
    and there every caller is trusted. On a TLS port the handshake has already verified the
    certificate against the CA; a certificate naming none of ours is Unauthenticated.
    """
    auth = context.auth_context()
    if auth.get("transport_security_type") != [b"ssl"]:
        return None
    pems = auth.get("x509_pem_cert")
    if not pems:
        raise Unauthenticated(f"the agent takes calls with a client certificate only: {COORDINATOR_RULE}")
    principal = principal_of(pems[0])
    if principal is None:
        raise Unauthenticated(
            f"the caller's certificate names no gpulease identity (a URI SAN spiffe://gpulease/<kind>/<name>): "
            f"{COORDINATOR_RULE}"
        )
    return principal


def check_coordinator(context: grpc.aio.ServicerContext[Any, Any], method: str) -> None:
    """Refuse anything but a coordinator's certificate (on a TLS port); log each refusal."""
    try:
        principal = caller(context)
        if principal is None or principal.kind is Kind.COORDINATOR:
            return
        raise PermissionDenied(f"{principal} may not call {method}: {COORDINATOR_RULE}")
    except (PermissionDenied, Unauthenticated) as e:
        log.warning("refused a call from %s: %s", context.peer(), e.message)
        raise


def coordinators_only(cls: C) -> C:
    """Class decorator for the AgentService servicer: every RPC of the service first checks that the
    caller is a coordinator (``check_coordinator``), through the error catalog.

    It wraps every method the service declares, so an RPC added later is guarded without anyone
    remembering to; ``guarded_methods`` lists them for tests.
    """
    service = getattr(cls, "SERVICE_DESCRIPTOR", None)
    if service is None:
        raise TypeError(f"{cls.__name__} needs a SERVICE_DESCRIPTOR naming the service to guard")
    names = tuple(m.name for m in service.methods)
    for name in names:
        setattr(cls, name, _guard(getattr(cls, name), f"{service.full_name}.{name}"))
    cls.guarded_methods = names  # type: ignore[attr-defined]
    return cls


def _guard(method: Callable[..., Awaitable[Any]], full_name: str) -> Callable[..., Awaitable[Any]]:
    @grpc_errors
    @functools.wraps(method)
    async def guarded(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        check_coordinator(context, full_name)
        return await method(self, request, context)

    return guarded
