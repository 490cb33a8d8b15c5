"""`gpuctl certs init|issue`: the files it writes, their modes, no overwriting, and that each
certificate names the identity asked for (read back with gpulease.common.pki.principal_of, which
is what the coordinator and agents use). Real files and the real pki code; no server."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509

from gpulease.cli.main import main
from gpulease.common import pki
from gpulease.common.identity import Kind, Principal, Role


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def sans(cert: Path) -> tuple[list[str], list[str]]:
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    names = loaded.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return names.get_values_for_type(x509.DNSName), [str(i) for i in names.get_values_for_type(x509.IPAddress)]


@pytest.fixture
def ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    directory = tmp_path / "pki"
    assert main(["certs", "init", "--dir", str(directory)]) == 0
    out = capsys.readouterr().out
    assert str(directory / "ca.pem") in out
    return directory


def test_init_writes_a_ca_with_a_private_key_and_refuses_to_overwrite(
    ca: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert sorted(p.name for p in ca.iterdir()) == ["ca.key", "ca.pem"]
    assert mode(ca / "ca.key") == 0o600
    cert = x509.load_pem_x509_certificate((ca / "ca.pem").read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    before = {p.name: p.read_bytes() for p in ca.iterdir()}

    assert main(["certs", "init", "--dir", str(ca)]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("gpuctl: error: ") and "already exists" in captured.err
    assert captured.out == ""
    assert {p.name: p.read_bytes() for p in ca.iterdir()} == before


@pytest.mark.parametrize(
    ("argv", "base", "expected"),
    [
        (["user", "alice", "--role", "admin", "--tenant", "ml"], "user-alice",
         Principal(Kind.USER, "alice", Role.ADMIN, "ml")),
        (["user", "bob"], "user-bob", Principal(Kind.USER, "bob", Role.USER, "bob")),
        (["user", "carol", "--role", "viewer"], "user-carol", Principal(Kind.USER, "carol", Role.VIEWER, "carol")),
        (["agent", "gpu-7"], "agent-gpu-7", Principal(Kind.AGENT, "gpu-7")),
        (["coordinator", "c1"], "coordinator-c1", Principal(Kind.COORDINATOR, "c1")),
    ],
)  # fmt: skip
def test_issue_names_the_identity(
    ca: Path, capsys: pytest.CaptureFixture[str], argv: list[str], base: str, expected: Principal
) -> None:
    assert main(["certs", "issue", *argv, "--dir", str(ca)]) == 0
    out = capsys.readouterr().out
    cert, key = ca / f"{base}.pem", ca / f"{base}.key"
    assert mode(key) == 0o600
    assert pki.principal_of(cert.read_bytes()) == expected
    assert str(cert) in out and str(key) in out and expected.id in out
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    ca_cert = x509.load_pem_x509_certificate((ca / "ca.pem").read_bytes())
    loaded.verify_directly_issued_by(ca_cert)


def test_issue_adds_hosts_to_coordinators_and_agents(ca: Path) -> None:
    argv = ["certs", "issue", "coordinator", "c1", "--host", "coord.example", "--host", "10.0.0.5", "--dir", str(ca)]
    assert main(argv) == 0
    dns, ips = sans(ca / "coordinator-c1.pem")
    assert "coord.example" in dns and "10.0.0.5" in ips
    assert "localhost" in dns and "127.0.0.1" in ips

    assert main(["certs", "issue", "agent", "gpu-1", "--host", "gpu-1.dc.example", "--dir", str(ca)]) == 0
    dns, _ = sans(ca / "agent-gpu-1.pem")
    assert {"gpu-1", "gpu-1.dc.example"} <= set(dns)


def test_issue_refuses_to_overwrite(ca: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "issue", "user", "alice", "--dir", str(ca)]) == 0
    before = (ca / "user-alice.pem").read_bytes(), (ca / "user-alice.key").read_bytes()
    capsys.readouterr()
    assert main(["certs", "issue", "user", "alice", "--role", "admin", "--dir", str(ca)]) == 1
    captured = capsys.readouterr()
    assert "already exists" in captured.err and captured.out == ""
    assert ((ca / "user-alice.pem").read_bytes(), (ca / "user-alice.key").read_bytes()) == before


def test_issue_without_a_ca_says_how_to_make_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "issue", "agent", "n1", "--dir", str(tmp_path / "none")]) == 1
    assert "gpuctl certs init --dir" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["certs", "init"], "the following arguments are required: --dir"),
        (["certs", "issue", "user", "alice"], "the following arguments are required: --dir"),
        (["certs", "issue", "user", "alice", "--dir", "d", "--role", "root"], "invalid choice: 'root'"),
        (["certs", "issue", "user", "alice", "--dir", "d", "--host", "h"], "unrecognized arguments: --host h"),
        (["certs", "issue", "agent", "n1", "--dir", "d", "--role", "admin"], "unrecognized arguments: --role"),
        (["certs", "issue", "robot", "r", "--dir", "d"], "invalid choice: 'robot'"),
        (["certs", "issue", "agent", "n1", "--dir", "d", "--days", "0"], "must be between 1 and 36500"),
    ],
)
def test_certs_usage_errors_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_names_are_refused_without_files(ca: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "issue", "agent", "no/slash", "--dir", str(ca)]) == 1
    assert main(["certs", "issue", "user", "alice", "--tenant", "bad tenant", "--dir", str(ca)]) == 1
    assert "not a valid" in capsys.readouterr().err
    assert sorted(p.name for p in ca.iterdir()) == ["ca.key", "ca.pem"]


def test_certs_need_no_coordinator_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Local commands ignore the credential settings (a missing token file must not stop them).
    monkeypatch.setenv("GPULEASE_TOKEN_FILE", str(tmp_path / "missing.token"))
    monkeypatch.setenv("GPULEASE_COORDINATOR", " , ")
    assert main(["certs", "init", "--dir", str(tmp_path / "pki")]) == 0
