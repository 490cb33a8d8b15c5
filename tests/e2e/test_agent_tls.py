"""Mutual TLS between coordinator and agent, and node identity (issue 13).

Real TLS everywhere, on loopback: the agent's gRPC server and its container service (over the
in-memory runtime), the coordinator's AgentChannels and ContainerForwarder, and a NodeService
served over mutual TLS in place of the coordinator, which records who called it and with which
certificate. The agent process itself shows what only a process can: its exit status, signals
and the --insecure warning. Refusals are checked for what did not happen: no runtime call, no
container, no call to the coordinator.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
from cryptography import x509

from gpulease.agent.channel import CoordinatorChannel
from gpulease.agent.containers import ContainerService, ReadyGate, RuntimeHandle
from gpulease.agent.fencing import CoordinatorClient, Fence, Vouchers
from gpulease.agent.server import AgentServicer, start_server
from gpulease.common import pki, rpc_status
from gpulease.common.identity import Kind, Role
from gpulease.common.tls import TLSConfig, TlsFiles
from gpulease.coordinator.agents import AgentChannels
from gpulease.coordinator.containers import ContainerForwarder
from gpulease.errors import Unavailable
from gpulease.v1 import agent_pb2, agent_pb2_grpc, coordinator_pb2_grpc
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import types_pb2 as tpb
from tests.support.fake_runtime import FakeRuntime

NODE = "n1"
OTHER = "n2"
ALLOC_ID = "0123456789abcdef"
REVISION = 7
SPEC = tpb.ContainerSpec(image="busybox:latest", command=["sleep", "600"])
REF = tpb.ContainerRef(allocation_id=ALLOC_ID)
INVENTORY = tpb.NodeInventory(cpus_total=8, memory_total_bytes=16 * 2**30)
# One request per AgentService RPC; the test checks that this covers every RPC the servicer guards.
REQUESTS: dict[str, Any] = {
    "GetInventory": agent_pb2.GetInventoryRequest(),
    "StartContainer": agent_pb2.StartContainerRequest(allocation_id=ALLOC_ID, revision=REVISION, spec=SPEC),
    "StopContainer": tpb.StopContainerRequest(ref=REF),
    "GetContainer": REF,
    "WaitContainer": tpb.WaitContainerRequest(ref=REF, timeout_seconds=1),
    "StreamLogs": tpb.StreamLogsRequest(ref=REF),
    "ListContainers": tpb.ListContainersRequest(allocation_id=ALLOC_ID),
}
REPO = Path(__file__).resolve().parents[2]


# -- certificates --------------------------------------------------------------------------------


@dataclass
class Pki:
    dir: Path
    coordinator: pki.Issued
    agent: pki.Issued  # node n1
    other_agent: pki.Issued  # node n2
    user: pki.Issued
    foreign_dir: Path  # another CA
    foreign_coordinator: pki.Issued

    @property
    def ca(self) -> Path:
        return self.dir / pki.CA_CERT

    def files(self, issued: pki.Issued, ca: Path | None = None) -> TlsFiles:
        return TlsFiles(TLSConfig(str(ca or self.ca), str(issued.cert), str(issued.key)))


@pytest.fixture
def certs(tmp_path: Path) -> Pki:
    ca, foreign = tmp_path / "ca", tmp_path / "foreign-ca"
    pki.init_ca(ca)
    pki.init_ca(foreign, name="someone else's CA")
    return Pki(
        dir=ca,
        coordinator=pki.issue(ca, Kind.COORDINATOR, "c1"),
        agent=pki.issue(ca, Kind.AGENT, NODE),
        other_agent=pki.issue(ca, Kind.AGENT, OTHER),
        user=pki.issue(ca, Kind.USER, "alice", role=Role.ADMIN),
        foreign_dir=foreign,
        foreign_coordinator=pki.issue(foreign, Kind.COORDINATOR, "c1"),
    )


def serial_of(pem: bytes) -> int:
    return int(x509.load_pem_x509_certificate(pem).serial_number)


def live_copy(directory: Path, ca: Path, issued: pki.Issued) -> TlsFiles:
    """The files a daemon is configured with, in a directory of their own, to be rotated in place."""
    directory.mkdir()
    shutil.copyfile(ca, directory / "ca.pem")
    shutil.copyfile(issued.cert, directory / "tls.pem")
    shutil.copyfile(issued.key, directory / "tls.key")
    return TlsFiles(TLSConfig(str(directory / "ca.pem"), str(directory / "tls.pem"), str(directory / "tls.key")))


def rotate(directory: Path, issued: pki.Issued, ca: Path | None = None) -> None:
    """As deploy/README.md says: copy in under temporary names, then rename over the old files."""
    pairs = [(issued.key, "tls.key"), (issued.cert, "tls.pem"), *([(ca, "ca.pem")] if ca else [])]
    for source, name in pairs:
        shutil.copyfile(source, directory / f"{name}.new")
        os.replace(directory / f"{name}.new", directory / name)


# -- the coordinator's NodeService, over mutual TLS ------------------------------------------------


@dataclass
class Call:
    method: str
    caller: str  # the principal its client certificate names
    serial: int  # that certificate's serial number


@dataclass
class FakeNodeService(coordinator_pb2_grpc.NodeServiceServicer):
    """Answers an agent as the coordinator would for one live allocation on node n1 (no GPUs)."""

    calls: list[Call] = field(default_factory=list)

    def _note(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        pem = context.auth_context()["x509_pem_cert"][0]
        principal = pki.principal_of(pem)
        self.calls.append(Call(method, str(principal), serial_of(pem)))

    def allocation(self) -> tpb.Allocation:
        return tpb.Allocation(
            id=ALLOC_ID, node=NODE, revision=REVISION, cpus=1, memory_bytes=2**30, ttl_seconds=60, owner="test"
        )

    async def GetNodeAllocation(
        self, request: pb.GetAllocationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetAllocationResponse:
        self._note("GetNodeAllocation", context)
        return pb.GetAllocationResponse(allocation=self.allocation())

    async def ListNodeAllocations(
        self, request: pb.ListAllocationsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListAllocationsResponse:
        self._note("ListNodeAllocations", context)
        return pb.ListAllocationsResponse(allocations=[self.allocation()])

    async def RegisterNode(
        self, request: pb.RegisterNodeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RegisterNodeResponse:
        self._note("RegisterNode", context)
        return pb.RegisterNodeResponse(lease_id=1, heartbeat_interval_seconds=1, node_ttl_seconds=3)

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.HeartbeatResponse:
        self._note("Heartbeat", context)
        return pb.HeartbeatResponse(lease_id=1, heartbeat_interval_seconds=1)


@contextlib.asynccontextmanager
async def fake_coordinator(tls: TlsFiles) -> AsyncIterator[tuple[FakeNodeService, str]]:
    server = grpc.aio.server()
    service = FakeNodeService()
    coordinator_pb2_grpc.add_NodeServiceServicer_to_server(service, server)
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(require_client_cert=True))
    await server.start()
    try:
        yield service, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


# -- the agent, in process -----------------------------------------------------------------------


class StaticInventory:
    def collect(self) -> tpb.NodeInventory:
        return INVENTORY


@dataclass
class RunningAgent:
    address: str
    runtime: FakeRuntime
    channel: CoordinatorChannel


@contextlib.asynccontextmanager
async def serving_agent(node: str, tls: TlsFiles, coordinator: str) -> AsyncIterator[RunningAgent]:
    """The agent's server and container service as agent/app.py wires them: one TlsFiles for the
    server and the channel to the coordinator."""
    runtime = FakeRuntime()
    channel = CoordinatorChannel(coordinator, tls)
    containers = ContainerService(
        node=node,
        runtime=RuntimeHandle(lambda: runtime),
        fence=Fence(CoordinatorClient(channel, coordinator, timeout=3.0), node, Vouchers()),
        gate=ReadyGate(reconciling=False),
        latest_inventory=lambda: INVENTORY,
        stop_grace_seconds=1.0,
    )
    server = await start_server("127.0.0.1:0", node, StaticInventory(), containers, tls=tls)
    try:
        yield RunningAgent(f"127.0.0.1:{server.port}", runtime, channel)
    finally:
        await server.stop(0)
        await channel.close()


def dial(agent: RunningAgent, tls: TlsFiles, node: str = NODE) -> grpc.aio.Channel:
    """A channel to the agent as the coordinator makes it: the agent's certificate must name ``node``."""
    return grpc.aio.secure_channel(
        agent.address, tls.channel_credentials(), options=[("grpc.ssl_target_name_override", node)]
    )


async def call(stub: agent_pb2_grpc.AgentServiceStub, name: str) -> Any:
    if name == "StreamLogs":
        return [chunk async for chunk in stub.StreamLogs(REQUESTS[name], timeout=5)]
    return await getattr(stub, name)(REQUESTS[name], timeout=5)


def served_serial(address: str, ca: Path, client: pki.Issued, node: str = NODE) -> int:
    """The serial of the certificate the agent serves to a new connection (a plain TLS handshake)."""
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(client.cert), str(client.key))
    context.check_hostname = False  # the name is checked by the coordinator's channels; here: which cert
    context.set_alpn_protocols(["h2"])
    host, port = address.rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=node) as s,
    ):
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


# -- who may call an agent -----------------------------------------------------------------------


async def test_an_agent_takes_calls_from_coordinator_certificates_only(certs: Pki) -> None:
    assert set(REQUESTS) == set(AgentServicer.guarded_methods)  # type: ignore[attr-defined]
    async with (
        fake_coordinator(certs.files(certs.coordinator)) as (coordinator, coordinator_address),
        serving_agent(NODE, certs.files(certs.agent), coordinator_address) as agent,
    ):
        # A user's certificate (an admin's, even) and another node's agent: refused, naming the rule.
        for who, principal in ((certs.user, "user:alice"), (certs.other_agent, "agent:n2")):
            async with dial(agent, certs.files(who)) as channel:
                stub = agent_pb2_grpc.AgentServiceStub(channel)
                for name in REQUESTS:
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await call(stub, name)
                    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
                    assert rpc_status.reason_of(refused.value) == "PERMISSION_DENIED"
                    details = refused.value.details() or ""
                    assert f"{principal} may not call gpulease.v1.AgentService.{name}" in details
                    assert "only a coordinator may call an agent" in details

        # A coordinator certificate from another CA, and clear text: the handshake fails.
        foreign = TlsFiles(
            TLSConfig(str(certs.ca), str(certs.foreign_coordinator.cert), str(certs.foreign_coordinator.key))
        )
        for channel in (dial(agent, foreign), grpc.aio.insecure_channel(agent.address)):
            async with channel:
                stub = agent_pb2_grpc.AgentServiceStub(channel)
                for name in ("StartContainer", "GetInventory"):
                    with pytest.raises(grpc.aio.AioRpcError) as failed:
                        await call(stub, name)
                    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE

        # Nothing happened: no runtime call, no container, no fencing check with the coordinator.
        assert agent.runtime.calls == [] and agent.runtime.containers == {}
        assert coordinator.calls == []

        # A coordinator's certificate is served, and the container starts.
        async with dial(agent, certs.files(certs.coordinator)) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            inventory = await stub.GetInventory(agent_pb2.GetInventoryRequest(), timeout=5)
            assert inventory.node == NODE
            status = await call(stub, "StartContainer")
            assert status.allocation_id == ALLOC_ID and status.revision == REVISION
            assert len(agent.runtime.containers) == 1
            assert len((await call(stub, "ListContainers")).containers) == 1
        # The agent fenced with its own certificate, over mutual TLS.
        assert {c.caller for c in coordinator.calls} == {"agent:n1"}
        assert {c.method for c in coordinator.calls} == {"GetNodeAllocation"}


async def test_a_coordinator_forwards_nothing_to_an_agent_whose_certificate_names_another_node(certs: Pki) -> None:
    @dataclass
    class Allocations:
        async def get(self, allocation_id: str) -> Any:
            return SimpleNamespace(id=allocation_id, node=NODE, nodes=(NODE,), revision=REVISION)

    @dataclass
    class View:
        address: str  # what node n1 registered

        def node(self, name: str) -> Any:
            return SimpleNamespace(name=name, up=True, info=SimpleNamespace(address=self.address))

        def nodes(self) -> list[Any]:
            return [self.node(NODE)]

    async with fake_coordinator(certs.files(certs.coordinator)) as (coordinator, coordinator_address):
        # Node n1 registered an address where node n2's agent answers (a forged or stale address).
        async with serving_agent(OTHER, certs.files(certs.other_agent), coordinator_address) as impostor:
            channels = AgentChannels(certs.files(certs.coordinator))
            forwarder = ContainerForwarder(cast(Any, Allocations()), cast(Any, View(impostor.address)), channels)
            try:
                alloc = await Allocations().get(ALLOC_ID)
                for attempt in (forwarder.run(alloc, SPEC), forwarder.list(ALLOC_ID)):
                    with pytest.raises(Unavailable) as refused:
                        await attempt
                    message = refused.value.message
                    assert f"the agent of node {NODE} at {impostor.address} failed the TLS handshake" in message
                    assert f"the agent's certificate may not name node {NODE}" in message
                    assert "nothing was sent to it" in message
            finally:
                await channels.close()
            assert impostor.runtime.calls == [] and impostor.runtime.containers == {}
        assert coordinator.calls == []

        # The agent whose certificate names n1 gets the same calls.
        async with serving_agent(NODE, certs.files(certs.agent), coordinator_address) as agent:
            channels = AgentChannels(certs.files(certs.coordinator))
            forwarder = ContainerForwarder(cast(Any, Allocations()), cast(Any, View(agent.address)), channels)
            try:
                status = await forwarder.run(await Allocations().get(ALLOC_ID), SPEC)
                assert status.allocation_id == ALLOC_ID and len(agent.runtime.containers) == 1
                assert len((await forwarder.list(ALLOC_ID)).containers) == 1
            finally:
                await channels.close()
        assert {c.caller for c in coordinator.calls} == {"agent:n1"}


# -- rotation ------------------------------------------------------------------------------------


async def test_a_rotated_agent_certificate_is_served_to_new_connections_while_open_ones_stay_up(
    certs: Pki, tmp_path: Path
) -> None:
    live = tmp_path / "agent-tls"
    tls = live_copy(live, certs.ca, certs.agent)
    coordinator_tls = certs.files(certs.coordinator)
    async with (
        fake_coordinator(coordinator_tls) as (_, coordinator_address),
        serving_agent(NODE, tls, coordinator_address) as agent,
        dial(agent, coordinator_tls) as open_channel,
    ):
        stub = agent_pb2_grpc.AgentServiceStub(open_channel)
        await stub.GetInventory(agent_pb2.GetInventoryRequest(), timeout=5)
        first = await asyncio.to_thread(served_serial, agent.address, certs.ca, certs.coordinator)
        assert first == serial_of(certs.agent.cert.read_bytes())

        # Same CA, new certificate: renamed into place, no signal. The next handshake serves it.
        renewed = pki.issue(certs.dir, Kind.AGENT, NODE, basename="agent-n1-renewed")
        rotate(live, renewed)
        served = await asyncio.to_thread(served_serial, agent.address, certs.ca, certs.coordinator)
        assert served == serial_of(renewed.cert.read_bytes())
        await stub.GetInventory(agent_pb2.GetInventoryRequest(), timeout=5)  # the open connection
        async with dial(agent, coordinator_tls) as fresh:
            await agent_pb2_grpc.AgentServiceStub(fresh).GetInventory(agent_pb2.GetInventoryRequest(), timeout=5)

        # A new CA for everything (SIGHUP this time): a new connection made with the old CA's
        # certificate is refused, while the connection opened before the rotation keeps working.
        new_ca = tmp_path / "new-ca"
        pki.init_ca(new_ca)
        rotate(live, pki.issue(new_ca, Kind.AGENT, NODE), ca=new_ca / pki.CA_CERT)
        tls.request_reload()
        async with dial(agent, coordinator_tls) as stale:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await agent_pb2_grpc.AgentServiceStub(stale).GetInventory(agent_pb2.GetInventoryRequest(), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert (await stub.GetInventory(agent_pb2.GetInventoryRequest(), timeout=5)).node == NODE
        new_coordinator = pki.issue(new_ca, Kind.COORDINATOR, "c1")
        new_coordinator_tls = TlsFiles(
            TLSConfig(str(new_ca / pki.CA_CERT), str(new_coordinator.cert), str(new_coordinator.key))
        )
        async with dial(agent, new_coordinator_tls) as fresh:
            assert (await agent_pb2_grpc.AgentServiceStub(fresh).GetInventory(agent_pb2.GetInventoryRequest())).node
        assert agent.runtime.calls == []


async def test_the_agent_dials_its_coordinator_with_the_rotated_certificate(certs: Pki, tmp_path: Path) -> None:
    live = tmp_path / "agent-tls"
    tls = live_copy(live, certs.ca, certs.agent)
    async with fake_coordinator(certs.files(certs.coordinator)) as (coordinator, address):
        channel = CoordinatorChannel(address, tls, retire_after=0.3)
        client = CoordinatorClient(channel, address, timeout=3.0)
        try:
            old_stub = channel.node_service()
            assert await client.get_allocation(ALLOC_ID) is not None
            renewed = pki.issue(certs.dir, Kind.AGENT, NODE, basename="agent-n1-renewed")
            rotate(live, renewed)
            assert await client.get_allocation(ALLOC_ID) is not None
            assert channel.generation == 1 and channel.node_service() is not old_stub
            # A call on the old channel, made before it is retired, still goes through.
            await old_stub.GetNodeAllocation(pb.GetAllocationRequest(allocation_id=ALLOC_ID), timeout=3)
            serials = [c.serial for c in coordinator.calls]
            old, new = serial_of(certs.agent.cert.read_bytes()), serial_of(renewed.cert.read_bytes())
            assert serials == [old, new, old]
            assert {c.caller for c in coordinator.calls} == {"agent:n1"}
        finally:
            await channel.close()


async def test_the_coordinator_renews_its_agent_channels_when_its_files_change(certs: Pki, tmp_path: Path) -> None:
    live = tmp_path / "coordinator-tls"
    coordinator_tls = live_copy(live, certs.ca, certs.coordinator)
    async with (
        fake_coordinator(certs.files(certs.coordinator)) as (_, coordinator_address),
        serving_agent(NODE, certs.files(certs.agent), coordinator_address) as agent,
    ):
        channels = AgentChannels(coordinator_tls)
        try:
            before = channels.stub(NODE, agent.address)
            assert channels.stub(NODE, agent.address) is before  # reused while the files stay
            await before.GetInventory(agent_pb2.GetInventoryRequest(), timeout=5)
            rotate(live, pki.issue(certs.dir, Kind.COORDINATOR, "c1", basename="coordinator-c1-renewed"))
            after = channels.stub(NODE, agent.address)
            assert after is not before
            await after.GetInventory(agent_pb2.GetInventoryRequest(), timeout=5)
            await before.GetInventory(agent_pb2.GetInventoryRequest(), timeout=5)  # kept for its grace
        finally:
            await channels.close()


# -- the agent process ---------------------------------------------------------------------------


def agent_argv(*args: str) -> list[str]:
    return [
        sys.executable, "-m", "gpulease.agent.main", "--node-id", NODE, "--listen", "127.0.0.1:0",
        "--simulate-gpus", "1", "--docker-host", "unix:///nonexistent/docker.sock", "--http-listen", "", *args,
    ]  # fmt: skip


@contextlib.contextmanager
def agent_process(argv: list[str], log: Path) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPULEASE_") and k != "NOTIFY_SOCKET"}
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def read(log: Path) -> str:
    return log.read_text(errors="replace")


async def wait_for_log(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in read(log):
            return
        if proc.poll() is not None:
            break
        await asyncio.sleep(0.1)
    raise AssertionError(f"{text!r} not in the agent's log (exit {proc.poll()}):\n{read(log)}")


async def wait_until(predicate: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def test_an_agent_whose_certificate_names_another_node_does_not_start(certs: Pki, tmp_path: Path) -> None:
    flags = [
        "--tls-ca",
        str(certs.ca),
        "--tls-cert",
        str(certs.other_agent.cert),
        "--tls-key",
        str(certs.other_agent.key),
    ]
    done = subprocess.run(
        [*agent_argv(*flags), "--coordinator", "127.0.0.1:1"], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert done.returncode == 2, done.stderr
    assert "names agent:n2, but this agent is node 'n1'" in done.stderr
    assert "listening" not in done.stderr  # refused before serving anything


async def test_an_insecure_agent_warns_and_a_sighup_does_not_stop_it(tmp_path: Path) -> None:
    log = tmp_path / "agent.log"
    with socket.socket() as s:  # a loopback port where no coordinator answers
        s.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{s.getsockname()[1]}"
    with agent_process([*agent_argv("--insecure"), "--coordinator", nobody], log) as proc:
        await wait_for_log(log, "INSECURE: the agent of node n1 on 127.0.0.1:0 serves clear text", proc)
        proc.send_signal(signal.SIGHUP)
        await wait_for_log(log, "received SIGHUP: no TLS files to re-read", proc)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 15) == 0


async def test_an_agent_process_speaks_mutual_tls_and_reloads_on_sighup(certs: Pki, tmp_path: Path) -> None:
    live = tmp_path / "agent-tls"
    live_copy(live, certs.ca, certs.agent)
    flags = ["--tls-ca", str(live / "ca.pem"), "--tls-cert", str(live / "tls.pem"), "--tls-key", str(live / "tls.key")]
    log = tmp_path / "agent.log"
    async with fake_coordinator(certs.files(certs.coordinator)) as (coordinator, address):
        with agent_process([*agent_argv(*flags), "--coordinator", address], log) as proc:
            await wait_until(lambda: any(c.method == "RegisterNode" for c in coordinator.calls), "a registration")
            assert {c.caller for c in coordinator.calls} == {"agent:n1"}
            assert {c.serial for c in coordinator.calls} == {serial_of(certs.agent.cert.read_bytes())}
            await wait_for_log(log, "mutual TLS", proc)

            renewed = pki.issue(certs.dir, Kind.AGENT, NODE, basename="agent-n1-renewed")
            rotate(live, renewed)
            proc.send_signal(signal.SIGHUP)
            await wait_for_log(log, "received SIGHUP: re-reading the TLS files", proc)
            new = serial_of(renewed.cert.read_bytes())
            await wait_until(lambda: coordinator.calls[-1].serial == new, "a heartbeat with the new certificate")
            assert proc.poll() is None
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 15) == 0
