"""The agent's transport settings (issue 13): clear text only on loopback unless --insecure, TLS files
all three or none, and a certificate that names the node, checked before the agent serves anything.

Certificates come from the development CA (gpulease.common.pki), as `gpuctl certs` makes them, or
are made here by hand where a test needs one the CA would never issue.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gpulease.agent.config import DEFAULT_LISTEN, load_config
from gpulease.agent.main import main
from gpulease.agent.security import check_coordinator, load_tls
from gpulease.common import pki
from gpulease.common.identity import Kind, Role
from gpulease.common.settings import ConfigError
from gpulease.common.transport import is_loopback
from gpulease.errors import PermissionDenied, Unauthenticated

BASE = ["--coordinator", "127.0.0.1:50051", "--node-id", "n1"]
REMOTE = ["--coordinator", "coordinator.internal:50053", "--node-id", "n1"]


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    pki.init_ca(tmp_path)
    return tmp_path


def tls_flags(ca: Path, issued: pki.Issued) -> list[str]:
    return ["--tls-ca", str(ca / pki.CA_CERT), "--tls-cert", str(issued.cert), "--tls-key", str(issued.key)]


def hand_made(
    ca: Path, name: str, *, uris: list[str], dns: list[str], usages: list[x509.ObjectIdentifier]
) -> pki.Issued:
    """A certificate signed by the test CA with exactly these names and usages."""
    ca_key = serialization.load_pem_private_key((ca / pki.CA_KEY).read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((ca / pki.CA_CERT).read_bytes())
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    sans += [x509.DNSName(d) for d in dns]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    out = pki.Issued(ca / f"{name}.pem", ca / f"{name}.key")
    out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return out


BOTH = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]

# -- clear text ----------------------------------------------------------------------------------


def test_the_default_listen_is_loopback_and_clear_text() -> None:
    cfg = load_config(BASE, {})
    assert cfg.listen == DEFAULT_LISTEN and is_loopback(cfg.listen)
    assert not cfg.tls_enabled and not cfg.insecure
    assert load_tls(cfg) is None


def test_clear_text_on_a_wildcard_address_exits_2_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main([*BASE, "--listen", "0.0.0.0:50052"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "refusing to serve clear text on 0.0.0.0:50052" in err
    assert "--tls-ca, --tls-cert and --tls-key" in err and "--insecure" in err


@pytest.mark.parametrize(
    ("argv", "env", "toml"),
    [
        (["--insecure"], {}, None),
        ([], {"GPULEASE_AGENT_INSECURE": "true"}, None),
        ([], {}, "insecure = true\n"),
    ],
    ids=["flag", "env", "file"],
)
def test_insecure_allows_clear_text_anywhere(
    tmp_path: Path, argv: list[str], env: dict[str, str], toml: str | None
) -> None:
    if toml is not None:
        (tmp_path / "a.toml").write_text(toml)
        argv = [*argv, "--config", str(tmp_path / "a.toml")]
    cfg = load_config([*REMOTE, "--listen", "10.0.0.5:50052", *argv], env)
    assert cfg.insecure and not cfg.tls_enabled
    assert load_tls(cfg) is None  # the coordinator off loopback is allowed too


def test_insecure_takes_true_or_false_only() -> None:
    assert not load_config(BASE, {"GPULEASE_AGENT_INSECURE": "no"}).insecure
    with pytest.raises(ConfigError, match="insecure must be true or false, got 'maybe'"):
        load_config(BASE, {"GPULEASE_AGENT_INSECURE": "maybe"})


def test_clear_text_to_a_remote_coordinator_is_refused_without_insecure() -> None:
    cfg = load_config(REMOTE, {})  # the agent itself listens on loopback: that part is allowed
    with pytest.raises(
        ConfigError, match=r"refusing to talk to the coordinator at coordinator\.internal:50053 in clear text"
    ):
        load_tls(cfg)


# -- TLS files -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "missing"),
    [
        (["--tls-ca", "ca.pem"], "tls_cert, tls_key are missing"),
        (["--tls-ca", "a", "--tls-cert", "b"], "tls_key is missing"),
    ],
)
def test_tls_needs_all_three_files(given: list[str], missing: str) -> None:
    with pytest.raises(ConfigError, match=f"TLS needs all three of tls_ca, tls_cert and tls_key .*; {missing}"):
        load_config([*BASE, *given], {})


def test_tls_files_from_every_source(ca: Path) -> None:
    issued = pki.issue(ca, Kind.AGENT, "n1")
    env = {"GPULEASE_AGENT_TLS_CA": str(ca / pki.CA_CERT), "GPULEASE_AGENT_TLS_KEY": str(issued.key)}
    cfg = load_config([*REMOTE, "--listen", "10.0.0.5:50052", "--tls-cert", str(issued.cert)], env)
    assert (cfg.tls_ca, cfg.tls_cert, cfg.tls_key) == (str(ca / pki.CA_CERT), str(issued.cert), str(issued.key))
    files = load_tls(cfg)
    assert files is not None and files.cert == issued.cert.read_bytes()


def test_a_certificate_for_this_node_is_accepted(ca: Path) -> None:
    cfg = load_config([*REMOTE, *tls_flags(ca, pki.issue(ca, Kind.AGENT, "n1"))], {})
    assert load_tls(cfg) is not None


def refusal(ca: Path, issued: pki.Issued) -> str:
    with pytest.raises(ConfigError) as refused:
        load_tls(load_config([*REMOTE, *tls_flags(ca, issued)], {}))
    return refused.value.message


def test_a_certificate_of_another_node_is_refused(ca: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = pki.issue(ca, Kind.AGENT, "n2")
    assert "names agent:n2, but this agent is node 'n1': it must carry the URI SAN spiffe://gpulease/agent/n1" in (
        refusal(ca, other)
    )
    # The entry point stops before serving anything, with status 2 and the same words.
    with pytest.raises(SystemExit) as stopped:
        main([*REMOTE, *tls_flags(ca, other)])
    assert stopped.value.code == 2
    assert "names agent:n2, but this agent is node 'n1'" in capsys.readouterr().err


def test_a_user_or_coordinator_certificate_is_refused(ca: Path) -> None:
    assert "names user:n1, but this agent is node 'n1'" in refusal(ca, pki.issue(ca, Kind.USER, "n1", role=Role.ADMIN))
    assert "names coordinator:n1" in refusal(ca, pki.issue(ca, Kind.COORDINATOR, "n1"))


def test_a_certificate_without_the_node_as_dns_name_is_refused(ca: Path) -> None:
    # What another PKI might issue: the right URI, but not the name a coordinator checks.
    no_dns = hand_made(ca, "no-dns", uris=["spiffe://gpulease/agent/n1"], dns=["gpu.internal"], usages=BOTH)
    assert "lacks the DNS name 'n1': a coordinator dialling node n1 checks that name" in refusal(ca, no_dns)
    nothing = hand_made(ca, "nothing", uris=[], dns=["n1"], usages=BOTH)
    assert "names no gpulease identity" in refusal(ca, nothing)


def test_a_certificate_for_server_use_only_is_refused(ca: Path) -> None:
    server_only = hand_made(
        ca, "server-only", uris=["spiffe://gpulease/agent/n1"], dns=["n1"], usages=[ExtendedKeyUsageOID.SERVER_AUTH]
    )
    assert "does not allow client authentication" in refusal(ca, server_only)


def test_a_key_of_another_certificate_is_refused(ca: Path) -> None:
    mine = pki.issue(ca, Kind.AGENT, "n1")
    other = pki.issue(ca, Kind.AGENT, "n2")
    assert "does not match its key" in refusal(ca, pki.Issued(mine.cert, other.key))


def test_an_unreadable_file_is_refused(ca: Path) -> None:
    mine = pki.issue(ca, Kind.AGENT, "n1")
    message = refusal(ca, pki.Issued(mine.cert, ca / "absent.key"))
    assert f"cannot read the key {ca / 'absent.key'}" in message


# -- who may call --------------------------------------------------------------------------------


class Context:
    """What check_coordinator reads of a gRPC servicer context."""

    def __init__(self, auth: dict[str, list[bytes]]) -> None:
        self._auth = auth

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


def over_tls(issued: pki.Issued) -> Any:
    return cast(Any, Context({"transport_security_type": [b"ssl"], "x509_pem_cert": [issued.cert.read_bytes()]}))


def test_only_a_coordinator_certificate_may_call(ca: Path) -> None:
    check_coordinator(over_tls(pki.issue(ca, Kind.COORDINATOR, "c1")), "M")
    # A clear-text port exists only where the configuration allowed it: every caller is trusted there.
    check_coordinator(cast(Any, Context({"transport_security_type": [b"insecure"]})), "M")
    with pytest.raises(PermissionDenied, match="agent:n2 may not call M: only a coordinator may call an agent"):
        check_coordinator(over_tls(pki.issue(ca, Kind.AGENT, "n2")), "M")
    with pytest.raises(PermissionDenied, match="user:root may not call M"):
        check_coordinator(over_tls(pki.issue(ca, Kind.USER, "root", role=Role.ADMIN)), "M")
    with pytest.raises(Unauthenticated, match="names no gpulease identity"):
        check_coordinator(over_tls(hand_made(ca, "anonymous", uris=[], dns=["c1"], usages=BOTH)), "M")
    with pytest.raises(Unauthenticated, match="with a client certificate only"):
        check_coordinator(cast(Any, Context({"transport_security_type": [b"ssl"]})), "M")
