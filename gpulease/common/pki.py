"""A development certificate authority, and reading who a peer certificate names.

`gpuctl certs init` and `gpuctl certs issue` use it; so do `gpuctl dev --auth` and the tests. It
uses the `cryptography` package (never a shell-out to openssl). Production fleets may use their
own PKI instead: what a certificate must carry is described in gpulease.common.identity and
deploy/README.md.

Keys are ECDSA P-256, written with mode 0600 and never overwritten.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from gpulease.common.identity import NAME_RE, Kind, Principal, Role, parse_uri, uri_for
from gpulease.errors import InvalidRequest

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
_LOOPBACK_NAMES = ("localhost",)
_LOOPBACK_IPS = ("127.0.0.1", "::1")


def _crypto() -> Any:
    try:
        import cryptography  # noqa: F401
    except ImportError as exc:  # the light client install may lack it; say what to install
        raise InvalidRequest("certificates need the 'cryptography' package: pip install cryptography") from exc
    from cryptography import x509

    return x509


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: an existing key or certificate is never replaced behind an operator's back.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise InvalidRequest(f"{path} already exists; remove it first to replace it") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def init_ca(directory: Path, *, days: int = 3650, name: str = "gpulease development CA") -> Path:
    """Create directory/ca.pem and directory/ca.key (0600). Refuses to overwrite either."""
    x509 = _crypto()
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    for f in (CA_CERT, CA_KEY):
        if (directory / f).exists():
            raise InvalidRequest(f"{directory / f} already exists: this directory has a CA")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_new(directory / CA_KEY, key_pem, 0o600)
    _write_new(directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return directory / CA_CERT


def issue(
    directory: Path,
    kind: Kind,
    name: str,
    *,
    hosts: tuple[str, ...] = (),
    role: Role | None = None,
    tenant: str = "",
    days: int = 365,
    not_before: datetime.datetime | None = None,
    basename: str | None = None,
) -> Issued:
    """Issue a certificate for a coordinator, an agent (node ``name``) or a user, signed by the CA
    in ``directory``; writes <basename>.pem and <basename>.key (0600) there.

    Coordinators and agents get server and client use (each dials the other) with DNS/IP names:
    ``hosts`` plus loopback; an agent also gets its node name as a DNS name, which is what the
    coordinator checks when it dials the node's agent.
    """
    x509 = _crypto()
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not NAME_RE.match(name):
        raise InvalidRequest(f"{name!r} is not a valid name: use 1-63 letters, digits, '.', '_' or '-'")
    if tenant and not NAME_RE.match(tenant):
        raise InvalidRequest(f"{tenant!r} is not a valid tenant name")
    if kind is not Kind.USER and (role or tenant):
        raise InvalidRequest("only user certificates carry a role and a tenant")
    try:
        ca_key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
    except FileNotFoundError:
        raise InvalidRequest(f"no CA in {directory}: run `gpuctl certs init --dir {directory}` first") from None
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
    if kind is Kind.USER:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, (role or Role.USER).value))
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, tenant or name))
    sans: list[Any] = [x509.UniformResourceIdentifier(uri_for(kind, name))]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if kind is not Kind.USER:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        dns = [*((name,) if kind is Kind.AGENT else ()), *hosts, *_LOOPBACK_NAMES]
        ips = list(_LOOPBACK_IPS)
        for h in hosts:
            try:
                ips.append(str(ipaddress.ip_address(h)))
                dns.remove(h)
            except ValueError:
                pass
        sans += [x509.DNSName(d) for d in dict.fromkeys(dns)]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in dict.fromkeys(ips)]
    start = not_before or (_now() - datetime.timedelta(minutes=5))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    base = basename or f"{kind.value}-{name}"
    paths = Issued(directory / f"{base}.pem", directory / f"{base}.key")
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_new(paths.key, key_pem, 0o600)
    _write_new(paths.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return paths


@lru_cache(maxsize=4096)
def principal_of(cert_pem: bytes) -> Principal | None:
    """The principal a (TLS-verified) peer certificate names, or None when it names none of ours.

    Cached by the certificate's bytes: a connection's certificate is parsed once, not per call.
    """
    x509 = _crypto()
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    found = [p for u in san.get_values_for_type(x509.UniformResourceIdentifier) if (p := parse_uri(u))]
    if len(found) != 1:  # none of ours, or ambiguous: refuse rather than guess
        return None
    kind, name = found[0]
    if kind is not Kind.USER:
        return Principal(kind, name)

    def attr(oid: Any) -> str:
        values = cert.subject.get_attributes_for_oid(oid)
        return str(values[0].value) if values else ""

    try:
        role = Role(attr(NameOID.ORGANIZATIONAL_UNIT_NAME) or Role.USER.value)
    except ValueError:
        return None
    tenant = attr(NameOID.ORGANIZATION_NAME) or name
    if not NAME_RE.match(tenant):
        return None
    return Principal(kind, name, role, tenant)
