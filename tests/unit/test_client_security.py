"""The client's security settings without a coordinator (issue 13): ClientConfig.resolve's flags
over environment variables, token files, what is refused before anything is sent, and what goes
on the wire, against a tiny in-process TLS server that records each call's metadata.

The token must never show in a repr, a log line or an exception message: every test that handles
one checks the messages it sees.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from gpulease import errors
from gpulease.client import Client, ClientConfig, TLSConfig
from gpulease.client.aio import AsyncClient
from gpulease.client.rpc_errors import connection_hint
from gpulease.common import pki
from gpulease.common.identity import Kind
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import coordinator_pb2_grpc

SECRET = "gpl_s3cret-Token_value"


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    pki.init_ca(d)
    return d


@pytest.fixture
def ca(ca_dir: Path) -> str:
    return str(ca_dir / pki.CA_CERT)


def token_file(tmp_path: Path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "token"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


# --------------------------------------------------------------------------------------------
# ClientConfig.resolve: flags beat the environment, which beats the defaults


def test_without_security_settings_the_config_is_clear_text() -> None:
    cfg = ClientConfig.resolve(None, {})
    assert cfg.tls is None and cfg.token is None


def test_the_ca_flag_beats_the_environment_and_enables_tls(ca: str) -> None:
    assert ClientConfig.resolve(None, {"GPULEASE_CA": ca}).tls == TLSConfig(ca)
    assert ClientConfig.resolve(None, {"GPULEASE_CA": "/elsewhere.pem"}, ca=ca).tls == TLSConfig(ca)
    assert ClientConfig.resolve(None, {"GPULEASE_CA": ""}).tls is None  # empty counts as unset


def test_token_sources_in_order(tmp_path: Path, ca: str) -> None:
    path = token_file(tmp_path, f"  {SECRET}\n")
    env = {"GPULEASE_CA": ca}
    assert ClientConfig.resolve(None, {**env, "GPULEASE_TOKEN": SECRET}).token == SECRET
    assert ClientConfig.resolve(None, {**env, "GPULEASE_TOKEN_FILE": path}).token == SECRET  # stripped
    # A flag beats both variables (even both set at once).
    both = {**env, "GPULEASE_TOKEN": "gpl_other", "GPULEASE_TOKEN_FILE": "/nonexistent"}
    assert ClientConfig.resolve(None, both, token_file=path).token == SECRET
    assert ClientConfig.resolve(None, both, token=SECRET).token == SECRET


def test_two_token_sources_at_one_level_are_refused(tmp_path: Path, ca: str) -> None:
    path = token_file(tmp_path, SECRET)
    with pytest.raises(errors.InvalidRequest, match="GPULEASE_TOKEN and GPULEASE_TOKEN_FILE"):
        ClientConfig.resolve(None, {"GPULEASE_CA": ca, "GPULEASE_TOKEN": "gpl_x", "GPULEASE_TOKEN_FILE": path})
    with pytest.raises(errors.InvalidRequest, match="not both") as info:
        ClientConfig.resolve(None, {}, ca=ca, token=SECRET, token_file=path)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "env"),
    [
        ({"token": SECRET}, {}),
        ({}, {"GPULEASE_TOKEN": SECRET}),
        ({}, {"GPULEASE_TOKEN": SECRET, "GPULEASE_CA": ""}),
    ],
)
def test_a_token_without_a_ca_is_refused(kwargs: dict[str, str], env: dict[str, str]) -> None:
    with pytest.raises(errors.InvalidRequest, match=r"a token .*needs TLS.*--ca") as info:
        ClientConfig.resolve(None, env, **kwargs)
    assert SECRET not in str(info.value)


def test_a_token_file_without_a_ca_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = token_file(tmp_path, SECRET)
    with pytest.raises(errors.InvalidRequest, match="needs TLS") as info:
        ClientConfig.resolve(None, {"GPULEASE_TOKEN_FILE": path})
    assert path in str(info.value) and SECRET not in str(info.value)


def test_a_certificate_without_a_ca_is_refused() -> None:
    with pytest.raises(errors.InvalidRequest, match="client certificate needs TLS"):
        ClientConfig.resolve(None, {}, cert="/c.pem", key="/c.key")
    with pytest.raises(errors.InvalidRequest, match="client certificate needs TLS"):
        ClientConfig.resolve(None, {"GPULEASE_CERT": "/c.pem", "GPULEASE_KEY": "/c.key"})


def test_certificate_and_key_come_as_a_pair_from_one_place(ca: str) -> None:
    env = {"GPULEASE_CA": ca, "GPULEASE_CERT": "/env.pem", "GPULEASE_KEY": "/env.key"}
    assert ClientConfig.resolve(None, env).tls == TLSConfig(ca, "/env.pem", "/env.key")
    assert ClientConfig.resolve(None, env, cert="/f.pem", key="/f.key").tls == TLSConfig(ca, "/f.pem", "/f.key")
    # A flag's certificate is never paired with the environment's key.
    with pytest.raises(errors.InvalidRequest, match="--cert and --key"):
        ClientConfig.resolve(None, env, cert="/f.pem")


def test_token_file_problems_name_the_file(tmp_path: Path, ca: str) -> None:
    missing = str(tmp_path / "missing")
    with pytest.raises(errors.InvalidRequest, match=f"cannot read the token file {missing}"):
        ClientConfig.resolve(None, {}, ca=ca, token_file=missing)
    empty = token_file(tmp_path, " \n")
    with pytest.raises(errors.InvalidRequest, match="is empty"):
        ClientConfig.resolve(None, {"GPULEASE_TOKEN_FILE": empty}, ca=ca)
    two_lines = token_file(tmp_path, f"{SECRET}\n{SECRET}\n")
    with pytest.raises(errors.InvalidRequest, match="line breaks") as info:
        ClientConfig.resolve(None, {}, ca=ca, token_file=two_lines)
    assert SECRET not in str(info.value)


def test_a_token_file_others_can_read_is_used_with_a_warning(
    tmp_path: Path, ca: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gpulease.client")
    private = token_file(tmp_path, SECRET, 0o600)
    assert ClientConfig.resolve(None, {}, ca=ca, token_file=private).token == SECRET
    assert not caplog.records
    shared = token_file(tmp_path, SECRET, 0o644)
    assert ClientConfig.resolve(None, {}, ca=ca, token_file=shared).token == SECRET
    [record] = caplog.records
    assert "chmod 600" in record.getMessage() and "644" in record.getMessage()
    assert SECRET not in caplog.text


# --------------------------------------------------------------------------------------------
# ClientConfig itself


def test_the_token_is_hidden_from_repr_and_str(ca: str) -> None:
    cfg = ClientConfig.of("a:1", tls=TLSConfig(ca), token=SECRET)
    assert cfg.token == SECRET
    assert SECRET not in repr(cfg) and SECRET not in str(cfg) and SECRET not in f"{cfg!r} {cfg}"
    with Client(config=cfg) as client:  # nothing is sent: channels connect lazily
        assert SECRET not in repr(client.config)


def test_a_token_needs_tls_in_the_config_too() -> None:
    with pytest.raises(errors.InvalidRequest, match="needs TLS") as info:
        ClientConfig.of("a:1", token=SECRET)
    assert SECRET not in str(info.value)
    with pytest.raises(errors.InvalidRequest, match="needs TLS"):
        Client("a:1", config=ClientConfig(token=SECRET))


@pytest.mark.parametrize("bad", ["", "  ", "gpl_a b", "gpl_ü", "gpl_a\nb"])
def test_a_token_that_cannot_be_sent_is_refused_without_quoting_it(bad: str, ca: str) -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        ClientConfig.of("a:1", tls=TLSConfig(ca), token=bad)
    assert bad.strip() == "" or bad not in str(info.value)


def test_unreadable_or_wrong_tls_files_fail_when_the_client_is_made(tmp_path: Path, ca: str) -> None:
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(errors.InvalidRequest, match=f"cannot read the CA bundle {missing}"):
        Client(config=ClientConfig.of("a:1", tls=TLSConfig(missing)))
    not_pem = tmp_path / "token-by-mistake"
    not_pem.write_text(SECRET)
    with pytest.raises(errors.InvalidRequest, match="holds no PEM certificate") as info:
        Client(config=ClientConfig.of("a:1", tls=TLSConfig(str(not_pem))))
    assert SECRET not in str(info.value)
    with pytest.raises(errors.InvalidRequest, match="holds no PEM private key"):
        Client(config=ClientConfig.of("a:1", tls=TLSConfig(ca, ca, ca)))


# --------------------------------------------------------------------------------------------
# On the wire: a TLS server that records what reaches it


@dataclass
class Seen:
    rpc: str
    metadata: dict[str, str]


class Recorder(coordinator_pb2_grpc.CoordinatorServiceServicer):
    """WhoAmI answers with the bearer token's length; ``fail`` aborts every call with that code."""

    def __init__(self) -> None:
        self.calls: list[Seen] = []
        self.fail: tuple[grpc.StatusCode, str, str] | None = None

    def WhoAmI(self, request: pb.WhoAmIRequest, context: grpc.ServicerContext) -> pb.WhoAmIResponse:
        md = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.calls.append(Seen("WhoAmI", md))
        if self.fail is not None:
            code, reason, details = self.fail
            context.set_trailing_metadata(((errors.REASON_METADATA_KEY, reason),))
            context.abort(code, details)
        auth = md.get("authorization", "")
        return pb.WhoAmIResponse(principal="user:test", role="user", tenant="t", method="token" if auth else "none")


@pytest.fixture(scope="module")
def server_cert(ca_dir: Path) -> pki.Issued:
    return pki.issue(ca_dir, Kind.COORDINATOR, "fake")  # names 127.0.0.1 and localhost


@pytest.fixture
def tls_server(server_cert: pki.Issued) -> Iterator[tuple[str, Recorder]]:
    creds = grpc.ssl_server_credentials([(server_cert.key.read_bytes(), server_cert.cert.read_bytes())])
    recorder = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(recorder, server)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        yield f"127.0.0.1:{port}", recorder
    finally:
        server.stop(grace=None)


def test_the_token_goes_as_bearer_metadata_over_tls(tls_server: tuple[str, Recorder], ca: str) -> None:
    address, recorder = tls_server
    with Client(config=ClientConfig.of(address, tls=TLSConfig(ca), token=SECRET, timeout=5)) as client:
        assert client.whoami().method == "token"
    assert recorder.calls[-1].metadata["authorization"] == f"Bearer {SECRET}"
    with Client(config=ClientConfig.of(address, tls=TLSConfig(ca), timeout=5)) as client:
        assert client.whoami().method == "none"
    assert "authorization" not in recorder.calls[-1].metadata


async def test_the_async_client_sends_the_token_too(tls_server: tuple[str, Recorder], ca: str) -> None:
    address, recorder = tls_server
    async with AsyncClient(config=ClientConfig.of(address, tls=TLSConfig(ca), token=SECRET, timeout=5)) as client:
        assert (await client.whoami()).method == "token"
    assert recorder.calls[-1].metadata["authorization"] == f"Bearer {SECRET}"


@pytest.mark.parametrize(
    ("code", "reason", "cls"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", errors.Unauthenticated),
        (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED", errors.PermissionDenied),
    ],
)
def test_refusals_are_typed_and_never_retried(
    tls_server: tuple[str, Recorder],
    ca: str,
    caplog: pytest.LogCaptureFixture,
    code: grpc.StatusCode,
    reason: str,
    cls: type[errors.GpuLeaseError],
) -> None:
    address, recorder = tls_server
    recorder.fail = (code, reason, "rule 'use': no")
    caplog.set_level(logging.DEBUG)
    config = ClientConfig.of([address, address.replace("127.0.0.1", "localhost")], tls=TLSConfig(ca),
                             token=SECRET, timeout=5, retry_deadline=10)  # fmt: skip
    with Client(config=config) as client, pytest.raises(cls) as info:
        client.whoami()
    assert len(recorder.calls) == 1, "a refusal was sent again"
    assert info.value.message == "rule 'use': no"
    assert SECRET not in str(info.value) and SECRET not in caplog.text


def test_tls_mismatches_say_so_rather_than_not_running() -> None:
    wrong_version = "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: ... WRONG_VERSION_NUMBER"
    assert "does not speak TLS" in connection_hint(wrong_version, tls=True)
    assert "not signed by the CA" in connection_hint("Tls handshake failed ... CERTIFICATE_VERIFY_FAILED", tls=True)
    assert "give --ca" in connection_hint("ipv4:127.0.0.1:1: Socket closed", tls=False)
    assert "--cert and --key" in connection_hint("ipv4:127.0.0.1:1: Socket closed", tls=True)
    assert "is gpulease-coordinator running" in connection_hint("Connection refused")


def test_a_client_without_tls_against_a_tls_server_is_told_to_give_a_ca(tls_server: tuple[str, Recorder]) -> None:
    address, _ = tls_server
    with Client(address, timeout=3, retry_deadline=0) as client, pytest.raises(errors.Unavailable) as info:
        client.whoami()
    assert "--ca" in info.value.message
