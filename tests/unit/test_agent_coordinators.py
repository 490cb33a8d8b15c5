"""An agent takes several coordinator addresses (issue 17): parsing and checks at start, and the
channel that fails over between them.

The configuration is read by the real loader and the `gpulease-agent` entry point (exit status 2
and the message on stderr). Failover runs over real gRPC on loopback: NodeService servers in this
process stand in for coordinator replicas, one of which answers UNAVAILABLE (as a replica that
lost etcd does) or has no server at all (a replica that died).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from gpulease.agent import main as agent_main
from gpulease.agent.address import advertised_address, parse_coordinators
from gpulease.agent.channel import CoordinatorChannel
from gpulease.agent.config import AgentConfig, load_config
from gpulease.agent.fencing import CoordinatorClient
from gpulease.agent.inventory import InventoryContext
from gpulease.agent.registration import Registrar
from gpulease.common import pki
from gpulease.common.identity import Kind
from gpulease.common.settings import ConfigError
from gpulease.common.tls import TLSConfig, TlsFiles
from gpulease.dev import procs
from gpulease.errors import Unavailable
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import coordinator_pb2_grpc
from gpulease.v1 import types_pb2 as tpb

NODE = "n1"
ALLOC_ID = "0123456789abcdef"
INVENTORY = tpb.NodeInventory(cpus_total=8, memory_total_bytes=16 * 2**30)


def config(*argv: str, env: dict[str, str] | None = None) -> AgentConfig:
    return load_config([*argv, "--node-id", NODE], env or {})


def start_agent(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """The entry point as `gpulease-agent` runs it: (exit status, stderr) of a start that fails."""
    with pytest.raises(SystemExit) as exit_info:
        agent_main.main([*argv, "--node-id", NODE])
    return int(exit_info.value.code or 0), capsys.readouterr().err


# -- configuration --------------------------------------------------------------------------------


def test_one_address_is_kept_as_it_was() -> None:
    cfg = config("--coordinator", "127.0.0.1:50051")
    assert (cfg.coordinator, cfg.coordinators) == ("127.0.0.1:50051", ("127.0.0.1:50051",))


def test_a_comma_separated_list_from_flag_or_environment_with_spaces() -> None:
    cfg = config("--coordinator", " 127.0.0.1:50051 , localhost:50061,[::1]:50071 ")
    assert cfg.coordinators == ("127.0.0.1:50051", "localhost:50061", "[::1]:50071")
    assert cfg.coordinator == "127.0.0.1:50051"  # the first, for code that names one
    env = {"GPULEASE_AGENT_COORDINATOR": "127.0.0.1:1,127.0.0.1:2"}
    assert config(env=env).coordinators == ("127.0.0.1:1", "127.0.0.1:2")


def test_toml_takes_a_list_or_a_comma_separated_string(tmp_path: Path) -> None:
    listed = tmp_path / "list.toml"
    listed.write_text('coordinator = ["127.0.0.1:1", " c2.internal:2 "]\ninsecure = true\n')
    assert config("--config", str(listed)).coordinators == ("127.0.0.1:1", "c2.internal:2")
    text = tmp_path / "text.toml"
    text.write_text('coordinator = "127.0.0.1:1,127.0.0.1:2"\n')
    assert config("--config", str(text)).coordinators == ("127.0.0.1:1", "127.0.0.1:2")
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("coordinator = [1, 2]\n")
    with pytest.raises(ConfigError, match="coordinator must be a list of 'HOST:PORT' strings"):
        config("--config", str(wrong))
    empty = tmp_path / "empty.toml"
    empty.write_text("coordinator = []\n")
    with pytest.raises(ConfigError, match="coordinator is required"):
        config("--config", str(empty))


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("127.0.0.1:1,,127.0.0.1:2", "coordinator: '127.0.0.1:1,,127.0.0.1:2' has an empty address"),
        ("127.0.0.1:1,", "coordinator: '127.0.0.1:1,' has an empty address"),
        ("127.0.0.1:1,c2.internal", "coordinator: 'c2.internal' is not HOST:PORT"),
        ("127.0.0.1:1,127.0.0.1:70000", "coordinator: port 70000 of '127.0.0.1:70000' is out of range"),
        ("127.0.0.1:0", "coordinator: port 0 of '127.0.0.1:0' is out of range"),
        ("127.0.0.1:1,bad host!:2", "coordinator: 'bad host!:2' has an invalid host 'bad host!'"),
        ("127.0.0.1:1,:2", "coordinator: ':2' has no host"),
        ("::1:50051", "coordinator: '::1:50051' has the IPv6 address '::1' without brackets"),
        ("127.0.0.1:1,127.0.0.1:1", "coordinator: '127.0.0.1:1' is listed twice"),
    ],
)
def test_a_malformed_address_stops_the_agent_with_status_2_naming_it(
    given: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, stderr = start_agent("--coordinator", given, capsys=capsys)
    assert status == 2
    assert stderr.startswith("gpulease-agent: ") and message in stderr, stderr


def test_clear_text_is_refused_to_every_coordinator_off_loopback(capsys: pytest.CaptureFixture[str]) -> None:
    status, stderr = start_agent("--coordinator", "127.0.0.1:1,10.20.0.11:50053", capsys=capsys)
    assert status == 2
    assert "refusing to talk to the coordinator at 10.20.0.11:50053 in clear text" in stderr, stderr
    # --insecure accepts the risk for all of them.
    cfg = config("--coordinator", "127.0.0.1:1,10.20.0.11:50053", "--insecure")
    assert cfg.coordinators == ("127.0.0.1:1", "10.20.0.11:50053")


def test_parse_coordinators_is_the_one_parser() -> None:
    assert parse_coordinators(["a.internal:1", "b.internal:2"]) == ("a.internal:1", "b.internal:2")
    with pytest.raises(ValueError, match="no coordinator address given"):
        parse_coordinators([])


def test_the_advertised_address_routes_towards_the_first_coordinator_that_resolves() -> None:
    # A name that cannot resolve (the .invalid TLD) is passed over for the next one.
    assert advertised_address("0.0.0.0", 50052, "nowhere.invalid:1,127.0.0.1:2") == "127.0.0.1:50052"
    assert advertised_address("0.0.0.0", 50052, ["nowhere.invalid:1", "127.0.0.1:2"]) == "127.0.0.1:50052"
    assert advertised_address("10.1.2.3", 50052, "127.0.0.1:1,127.0.0.1:2") == "10.1.2.3:50052"


# -- failover -------------------------------------------------------------------------------------


@dataclass
class Replica(coordinator_pb2_grpc.NodeServiceServicer):
    """A coordinator replica's NodeService: records each call (and the caller's certificate serial
    under TLS); answers UNAVAILABLE while `down`, as a replica that lost etcd does."""

    name: str
    down: bool = False
    calls: list[tuple[str, int]] = field(default_factory=list)

    async def _note(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        pems = context.auth_context().get("x509_pem_cert")
        serial = int(x509.load_pem_x509_certificate(pems[0]).serial_number) if pems else 0
        self.calls.append((method, serial))
        if self.down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"replica {self.name} is down")

    async def RegisterNode(
        self, request: pb.RegisterNodeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RegisterNodeResponse:
        await self._note("RegisterNode", context)
        return pb.RegisterNodeResponse(lease_id=7, heartbeat_interval_seconds=1, node_ttl_seconds=3)

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.HeartbeatResponse:
        await self._note("Heartbeat", context)
        return pb.HeartbeatResponse(lease_id=request.lease_id, heartbeat_interval_seconds=1)

    async def GetNodeAllocation(
        self, request: pb.GetAllocationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetAllocationResponse:
        await self._note("GetNodeAllocation", context)
        return pb.GetAllocationResponse(allocation=tpb.Allocation(id=request.allocation_id, node=NODE, revision=3))

    async def ListNodeAllocations(
        self, request: pb.ListAllocationsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListAllocationsResponse:
        await self._note("ListNodeAllocations", context)
        return pb.ListAllocationsResponse()

    def methods(self) -> list[str]:
        return [method for method, _ in self.calls]


@contextlib.asynccontextmanager
async def replica(name: str, tls: TlsFiles | None = None) -> AsyncIterator[tuple[Replica, str]]:
    server = grpc.aio.server()
    service = Replica(name)
    coordinator_pb2_grpc.add_NodeServiceServicer_to_server(service, server)
    if tls is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(require_client_cert=True))
    await server.start()
    try:
        yield service, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


class StaticInventory:
    def collect(self, ctx: InventoryContext | None = None) -> tpb.NodeInventory:
        return INVENTORY


def switches(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]


async def test_a_failed_heartbeat_is_retried_at_once_on_the_next_coordinator(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gpulease.agent.channel")
    dead = f"127.0.0.1:{procs.free_port()}"  # nothing listens: connection refused, as after a SIGKILL
    async with replica("b") as (b, b_address):
        channel = CoordinatorChannel([dead, b_address], None, purpose="heartbeats")
        try:
            reg = Registrar(node=NODE, address="127.0.0.1:9", channel=channel, source=StaticInventory())
            assert await reg.step() == 0.0  # the registration found no one: the next address, now
            assert channel.target == b_address
            assert 0.9 <= await reg.step() <= 1.0  # registered on b; then every interval
            assert 0.9 <= await reg.step() <= 1.0
            assert reg.lease_id == 7 and b.methods() == ["RegisterNode", "Heartbeat"]
        finally:
            await channel.close()
    [line] = switches(caplog)  # once per switch
    assert line.startswith(f"coordinator {dead} unreachable (UNAVAILABLE: ")
    assert line.endswith(f"); heartbeats now go to {b_address}")


async def test_a_replica_that_answers_unavailable_is_left_for_the_next(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gpulease.agent.channel")
    async with replica("a") as (a, a_address), replica("b") as (b, b_address):
        channel = CoordinatorChannel(f"{a_address},{b_address}", None, purpose="heartbeats")
        try:
            reg = Registrar(node=NODE, address="127.0.0.1:9", channel=channel, source=StaticInventory())
            assert 0.9 <= await reg.step() <= 1.0 and a.methods() == ["RegisterNode"]
            a.down = True
            assert await reg.step() == 0.0  # a said UNAVAILABLE: b at once
            assert 0.9 <= await reg.step() <= 1.0
            assert (a.methods(), b.methods()) == (["RegisterNode", "Heartbeat"], ["Heartbeat"])
            # Both down: one round of immediate retries, then a backoff (bounded by the interval).
            b.down = True
            assert await reg.step() == 0.0
            delay = await reg.step()
            assert 0.0 < delay <= 1.0
            assert reg.lease_id == 7  # nothing made the agent forget its lease
        finally:
            await channel.close()
    lines = switches(caplog)
    assert len(lines) == 3, lines
    assert lines[0].startswith(f"coordinator {a_address} unreachable (UNAVAILABLE: replica a is down)")
    assert lines[0].endswith(f"heartbeats now go to {b_address}")


async def test_fencing_reads_go_to_the_next_coordinator_after_a_failure() -> None:
    dead = f"127.0.0.1:{procs.free_port()}"
    async with replica("b") as (b, b_address):
        channel = CoordinatorChannel([dead, b_address], None, purpose="fencing checks")
        client = CoordinatorClient(channel, f"{dead}, {b_address}", timeout=3.0)
        try:
            with pytest.raises(Unavailable):
                await client.get_allocation(ALLOC_ID)  # no container starts on a guess
            alloc = await client.get_allocation(ALLOC_ID)
            assert alloc is not None and alloc.id == ALLOC_ID and b.methods() == ["GetNodeAllocation"]
        finally:
            await channel.close()


async def test_one_coordinator_has_nowhere_to_go() -> None:
    dead = f"127.0.0.1:{procs.free_port()}"
    channel = CoordinatorChannel(dead, None)
    try:
        reg = Registrar(node=NODE, address="127.0.0.1:9", channel=channel, source=StaticInventory())
        assert 0.0 < await reg.step() <= 5.0  # a backoff, as before: no address to switch to
        assert channel.target == dead and channel.switches == 0
    finally:
        await channel.close()


# -- TLS renewal, for every address ---------------------------------------------------------------


def _tls_dir(directory: Path, ca: Path, issued: pki.Issued) -> TlsFiles:
    directory.mkdir()
    for source, name in ((ca, "ca.pem"), (issued.cert, "tls.pem"), (issued.key, "tls.key")):
        shutil.copyfile(source, directory / name)
    return TlsFiles(TLSConfig(str(directory / "ca.pem"), str(directory / "tls.pem"), str(directory / "tls.key")))


def _rotate(directory: Path, issued: pki.Issued) -> None:
    for source, name in ((issued.key, "tls.key"), (issued.cert, "tls.pem")):
        shutil.copyfile(source, directory / f"{name}.new")
        os.replace(directory / f"{name}.new", directory / name)


def _serial(issued: pki.Issued) -> int:
    return int(x509.load_pem_x509_certificate(issued.cert.read_bytes()).serial_number)


async def test_rotated_tls_files_reach_every_coordinator_address(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    pki.init_ca(ca)
    coordinator = pki.issue(ca, Kind.COORDINATOR, "c1")
    old, new = pki.issue(ca, Kind.AGENT, NODE), pki.issue(ca, Kind.AGENT, NODE, basename="agent-n1-renewed")
    server_tls = TlsFiles(TLSConfig(str(ca / pki.CA_CERT), str(coordinator.cert), str(coordinator.key)))
    live = tmp_path / "agent-tls"
    agent_tls = _tls_dir(live, ca / pki.CA_CERT, old)
    async with replica("a", server_tls) as (a, a_address), replica("b", server_tls) as (b, b_address):
        channel = CoordinatorChannel([a_address, b_address], agent_tls, retire_after=0.3)
        client = CoordinatorClient(channel, f"{a_address}, {b_address}", timeout=3.0)
        try:
            assert await client.get_allocation(ALLOC_ID) is not None  # a, old certificate
            a.down = True
            with pytest.raises(Unavailable):
                await client.get_allocation(ALLOC_ID)  # a again: down, so on to b
            assert await client.get_allocation(ALLOC_ID) is not None  # b, old certificate
            _rotate(live, new)
            b.down, a.down = True, False
            with pytest.raises(Unavailable):
                await client.get_allocation(ALLOC_ID)  # b, renewed: down, so back to a
            # a's connection, made before the rotation and idle since, was renewed too.
            assert await client.get_allocation(ALLOC_ID) is not None
            assert channel.generation == 1
        finally:
            await channel.close()
    assert a.calls == [("GetNodeAllocation", _serial(old))] * 2 + [("GetNodeAllocation", _serial(new))]
    assert b.calls == [("GetNodeAllocation", _serial(old)), ("GetNodeAllocation", _serial(new))]
