"""The agent without a real coordinator: configuration, simulated inventory, registration against a
fake CoordinatorService, the agent process itself, and the process helpers (with a real etcd)."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from gpulease.agent.address import advertised_address, join_host_port, split_host_port
from gpulease.agent.config import DEFAULT_GPU_MODEL, DEFAULT_LISTEN, ConfigError, load_config
from gpulease.agent.inventory import SIMULATED_GPU_MEMORY_BYTES
from gpulease.agent.inventory.host import HostOnlyInventory, total_memory_bytes, usable_cpus
from gpulease.agent.inventory.select import NO_GPU_SOURCE_MESSAGE, select_source
from gpulease.agent.inventory.simulated import SimulatedInventory
from gpulease.agent.registration import Registrar
from gpulease.dev import procs
from gpulease.dev.cluster import LocalCluster
from gpulease.v1 import agent_pb2, agent_pb2_grpc, coordinator_pb2, coordinator_pb2_grpc
from gpulease.v1.types_pb2 import NodeInventory

GiB = 2**30


# -- configuration ---------------------------------------------------------------------------


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_config_precedence_flags_over_env_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_file = _write(
        tmp_path / "agent.toml",
        """
coordinator = "file-coord:1"
node_id = "file-node"
listen = "127.0.0.1:7001"
simulate_gpus = 1
cpus = 4
memory = "8GiB"
gpu-model = "File GPU"
labels = { zone = "file", rack = "r1" }
""",
    )
    monkeypatch.setenv("GPULEASE_AGENT_NODE_ID", "env-node")
    monkeypatch.setenv("GPULEASE_AGENT_LISTEN", "127.0.0.1:7002")
    monkeypatch.setenv("GPULEASE_AGENT_CPUS", "8")
    monkeypatch.setenv("GPULEASE_AGENT_LABELS", "zone=env, pool=a")
    argv = ["--config", config_file, "--listen", "127.0.0.1:7003", "--label", "pool=flag"]

    cfg = load_config(argv, os.environ)

    assert cfg.coordinator == "file-coord:1"  # only in the file
    assert cfg.node_id == "env-node"  # env beats file
    assert cfg.listen == "127.0.0.1:7003"  # flag beats env and file
    assert cfg.cpus == 8
    assert cfg.memory_bytes == 8 * GiB
    assert cfg.simulate_gpus == 1
    assert cfg.gpu_model == "File GPU"
    # Labels merge key by key, each with the same precedence.
    assert dict(cfg.labels) == {"zone": "env", "rack": "r1", "pool": "flag"}
    assert cfg.config_file == config_file


def test_config_defaults_and_env_config_file(tmp_path: Path) -> None:
    config_file = _write(tmp_path / "a.toml", 'coordinator = "c:50051"\nnode_id = "n0"\n')
    cfg = load_config([], {"GPULEASE_AGENT_CONFIG": config_file})
    assert cfg.listen == DEFAULT_LISTEN
    assert cfg.simulate_gpus is None
    assert cfg.gpu_model == DEFAULT_GPU_MODEL
    assert cfg.cpus is None and cfg.memory_bytes is None
    assert dict(cfg.labels) == {}
    with pytest.raises(AttributeError):
        cfg.node_id = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("argv", "env", "toml", "message"),
    [
        (["--coordinator", "c:1"], {}, None, "node_id is required"),
        (["--node-id", "n"], {}, None, "coordinator is required"),
        (["--coordinator", "c:1", "--node-id", "bad name"], {}, None, "node id 'bad name' is invalid"),
        (["--coordinator", "nope", "--node-id", "n"], {}, None, "coordinator: 'nope' is not HOST:PORT"),
        (["--coordinator", "c:1", "--node-id", "n", "--memory", "lots"], {}, None, "cannot parse size"),
        (["--coordinator", "c:1", "--node-id", "n", "--simulate-gpus", "-1"], {}, None, "at least 0"),
        (["--coordinator", "c:1", "--node-id", "n"], {"GPULEASE_AGENT_CPUS": "many"}, None, "integer"),
        (["--coordinator", "c:1", "--node-id", "n", "--label", "novalue"], {}, None, "key=value"),
        (["--coordinator", "c:1", "--node-id", "n"], {}, "gpus = 3\n", "unknown setting 'gpus'"),
        (["--coordinator", "c:1", "--node-id", "n"], {}, "node_id = [\n", "not valid TOML"),
        (
            ["--coordinator", "c:1", "--node-id", "n"],
            {"GPULEASE_AGENT_CONTAINER_RETENTION_SECONDS": "-1"},
            None,
            "container_retention_seconds must be between 0 and 2592000 seconds",
        ),
    ],
)
def test_config_errors(tmp_path: Path, argv: list[str], env: dict[str, str], toml: str | None, message: str) -> None:
    if toml is not None:
        argv = [*argv, "--config", _write(tmp_path / "bad.toml", toml)]
    with pytest.raises(ConfigError, match=message):
        load_config(argv, env)


def test_container_retention_default_and_override() -> None:
    base = ["--coordinator", "c:1", "--node-id", "n"]
    assert load_config(base, {}).container_retention_seconds == 3600.0
    assert load_config([*base, "--container-retention-seconds", "0"], {}).container_retention_seconds == 0.0


def test_config_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(["--config", str(tmp_path / "absent.toml")], {})


# -- addresses -------------------------------------------------------------------------------


def test_host_port_round_trip() -> None:
    assert split_host_port("10.0.0.1:50052") == ("10.0.0.1", 50052)
    assert split_host_port("[::1]:50052") == ("::1", 50052)
    assert join_host_port("::1", 5) == "[::1]:5"
    with pytest.raises(ValueError):
        split_host_port("10.0.0.1")


def test_advertised_address_replaces_wildcard() -> None:
    assert advertised_address("0.0.0.0", 50052, "127.0.0.1:50051") == "127.0.0.1:50052"
    assert advertised_address("10.1.2.3", 50052, "127.0.0.1:50051") == "10.1.2.3:50052"


# -- inventory -------------------------------------------------------------------------------


def test_simulated_inventory_is_labelled_and_deterministic() -> None:
    source = SimulatedInventory(
        node="n1", gpus=3, model="Sim X", cpus=16, memory_bytes=64 * GiB, labels={"a": "b"}, hostname="h"
    )
    inv = source.collect()
    assert [g.index for g in inv.gpus] == [0, 1, 2]
    assert [g.uuid for g in inv.gpus] == ["GPU-SIM-n1-0", "GPU-SIM-n1-1", "GPU-SIM-n1-2"]
    for gpu in inv.gpus:
        assert gpu.simulated and gpu.healthy
        assert gpu.health_detail == "simulated"
        assert gpu.model == "Sim X"
        assert gpu.memory_total_bytes == SIMULATED_GPU_MEMORY_BYTES == 80 * GiB
    assert (inv.cpus_total, inv.memory_total_bytes, dict(inv.labels), inv.hostname) == (16, 64 * GiB, {"a": "b"}, "h")
    # Same inputs, same inventory: heartbeats only resend it when something really changed.
    again = SimulatedInventory(
        node="n1", gpus=3, model="Sim X", cpus=16, memory_bytes=64 * GiB, labels={"a": "b"}, hostname="h"
    )
    assert again.collect() == inv == source.collect()


def test_host_defaults() -> None:
    inv = SimulatedInventory(node="n", gpus=0, model="m").collect()
    assert len(inv.gpus) == 0
    assert inv.cpus_total == usable_cpus() == len(os.sched_getaffinity(0))
    assert inv.memory_total_bytes == total_memory_bytes() > 0
    assert inv.hostname


def test_total_memory_reads_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1024 kB\nMemFree:          10 kB\n")
    assert total_memory_bytes(meminfo) == 1024 * 1024


def _host_has_nvml() -> bool:
    """A real libnvidia-ml.so.1 on this host (a GPU machine): then "no GPUs" cannot be checked."""
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


HOST_HAS_NVML = _host_has_nvml()


@pytest.mark.skipif(HOST_HAS_NVML, reason="this host has a real NVML; tests/e2e/test_gpu_real.py covers it")
def test_without_simulation_the_node_has_no_gpus(caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config(["--coordinator", "c:1", "--node-id", "n", "--cpus", "2"], {})
    with caplog.at_level(logging.WARNING):
        source = select_source(cfg)
    assert isinstance(source, HostOnlyInventory)
    inv = source.collect()
    assert len(inv.gpus) == 0
    assert inv.cpus_total == 2
    assert NO_GPU_SOURCE_MESSAGE in caplog.text


def test_simulation_from_config() -> None:
    cfg = load_config(["--coordinator", "c:1", "--node-id", "n7", "--simulate-gpus", "2", "--memory", "1GiB"], {})
    inv = select_source(cfg).collect()
    assert [g.uuid for g in inv.gpus] == ["GPU-SIM-n7-0", "GPU-SIM-n7-1"]
    assert all(g.simulated and g.model == DEFAULT_GPU_MODEL for g in inv.gpus)
    assert inv.memory_total_bytes == GiB


# -- registration against a fake coordinator ------------------------------------------------


class FakeCoordinator(coordinator_pb2_grpc.NodeServiceServicer):
    """Records RegisterNode/Heartbeat calls; `fail_with` makes the next calls fail with a status."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.registers: list[coordinator_pb2.RegisterNodeRequest] = []
        self.heartbeats: list[coordinator_pb2.HeartbeatRequest] = []
        self.lease = 100
        self.fail_with: grpc.StatusCode | None = None
        self.failures_left = 0

    def _maybe_fail(self, context: grpc.ServicerContext) -> None:
        with self.lock:
            if self.failures_left > 0 and self.fail_with is not None:
                self.failures_left -= 1
                context.abort(self.fail_with, "injected by the test")

    def fail(self, code: grpc.StatusCode, times: int = 1) -> None:
        with self.lock:
            self.fail_with, self.failures_left = code, times

    def RegisterNode(
        self, request: coordinator_pb2.RegisterNodeRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.RegisterNodeResponse:
        self._maybe_fail(context)
        with self.lock:
            self.registers.append(request)
            self.lease += 1
            return coordinator_pb2.RegisterNodeResponse(
                lease_id=self.lease, heartbeat_interval_seconds=1, node_ttl_seconds=3
            )

    def Heartbeat(
        self, request: coordinator_pb2.HeartbeatRequest, context: grpc.ServicerContext
    ) -> coordinator_pb2.HeartbeatResponse:
        self._maybe_fail(context)
        with self.lock:
            self.heartbeats.append(request)
            return coordinator_pb2.HeartbeatResponse(lease_id=self.lease, heartbeat_interval_seconds=1)


def _new_fake() -> FakeCoordinator:
    # The stubs declare every RPC abstract; the generated base answers UNIMPLEMENTED for the rest.
    return FakeCoordinator()  # type: ignore[abstract]


def _serve_fake(fake: FakeCoordinator, address: str) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)])
    coordinator_pb2_grpc.add_NodeServiceServicer_to_server(fake, server)
    server.add_insecure_port(address)
    server.start()
    return server


@pytest.fixture
def fake_coordinator() -> Iterator[tuple[FakeCoordinator, str]]:
    fake = _new_fake()
    address = f"127.0.0.1:{procs.free_port()}"
    server = _serve_fake(fake, address)
    yield fake, address
    server.stop(0)


class MutableSource:
    def __init__(self, inventory: NodeInventory) -> None:
        self.inventory = inventory

    def collect(self) -> NodeInventory:
        copy = NodeInventory()
        copy.CopyFrom(self.inventory)
        return copy


async def test_registrar_sends_inventory_only_when_changed(
    fake_coordinator: tuple[FakeCoordinator, str], caplog: pytest.LogCaptureFixture
) -> None:
    fake, address = fake_coordinator
    source = MutableSource(SimulatedInventory(node="n1", gpus=2, model="m", cpus=4, memory_bytes=GiB).collect())
    registered: list[bool] = []

    async def on_registered() -> None:
        registered.append(True)

    async with grpc.aio.insecure_channel(address) as channel:
        reg = Registrar(node="n1", address="127.0.0.1:9", channel=channel, source=source, on_registered=on_registered)
        assert 0.9 <= await reg.step() <= 1.0  # registered; the coordinator's interval is adopted
        assert reg.lease_id == 101 and registered == [True]
        assert fake.registers[0].inventory == source.inventory
        assert fake.registers[0].address == "127.0.0.1:9"

        await reg.step()
        assert not fake.heartbeats[-1].HasField("inventory")
        assert fake.heartbeats[-1].lease_id == 101

        source.inventory.cpus_total = 8
        await reg.step()
        assert fake.heartbeats[-1].inventory.cpus_total == 8
        await reg.step()
        assert not fake.heartbeats[-1].HasField("inventory")

        # The coordinator lost the node: register again at once.
        fake.fail(grpc.StatusCode.NOT_FOUND)
        assert await reg.step() == 0.0
        assert reg.lease_id is None
        await reg.step()
        assert len(fake.registers) == 2 and reg.lease_id == 102
        assert registered == [True]  # the callback is for the first registration only

        # The coordinator re-registered the node under a new lease: adopt it, resend inventory.
        fake.lease = 500
        await reg.step()
        assert reg.lease_id == 500
        await reg.step()
        assert fake.heartbeats[-1].lease_id == 500 and fake.heartbeats[-1].HasField("inventory")

        # An outage: logged once, bounded backoff, and heartbeating resumes afterwards.
        caplog.clear()
        fake.fail(grpc.StatusCode.UNAVAILABLE, times=3)
        with caplog.at_level(logging.DEBUG, logger="gpulease.agent.registration"):
            delays = [await reg.step() for _ in range(4)]
        assert all(0 < d <= 1.0 for d in delays)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "UNAVAILABLE" in warnings[0].getMessage()
        assert "answers again" in caplog.text
        assert reg.lease_id == 500


async def test_registrar_survives_broken_inventory_source(fake_coordinator: tuple[FakeCoordinator, str]) -> None:
    _, address = fake_coordinator

    class Broken:
        def collect(self) -> NodeInventory:
            raise OSError("device gone")

    async with grpc.aio.insecure_channel(address) as channel:
        reg = Registrar(node="n1", address="a:1", channel=channel, source=Broken())
        for _ in range(3):
            assert 0 < await reg.step() <= 5.0
        assert reg.lease_id is None


# -- the agent process ------------------------------------------------------------------------


def _wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[LocalCluster]:
    """Agent processes only (no etcd, no coordinator: each test serves a fake one); stopped at teardown."""
    cluster = LocalCluster(tmp_path)
    try:
        yield cluster
    finally:
        cluster.stop()


def _start_agent(agents: LocalCluster, coordinator: str, gpus: int | None = None, **kw: Any) -> procs.ManagedProcess:
    """Agent n1 with 4 CPUs, started (not waited for): it reports to `coordinator`."""
    return agents.add_agent("n1", gpus, cpus=4, coordinator=coordinator, wait=False, **kw).process


@pytest.mark.slow
def test_agent_process_registers_serves_and_stops(
    agents: LocalCluster, fake_coordinator: tuple[FakeCoordinator, str]
) -> None:
    fake, address = fake_coordinator
    agent = _start_agent(agents, address, 2, labels={"k": "v"})
    listen = agents.agents["n1"].address
    try:
        agents.wait_agent("n1", 20)  # SERVING means registered
        assert fake.registers[0].node == "n1"
        assert fake.registers[0].address == listen
        with grpc.insecure_channel(listen) as channel:
            reply = agent_pb2_grpc.AgentServiceStub(channel).GetInventory(agent_pb2.GetInventoryRequest(), timeout=5)
        assert reply.node == "n1"
        assert [g.uuid for g in reply.inventory.gpus] == ["GPU-SIM-n1-0", "GPU-SIM-n1-1"]
        assert dict(reply.inventory.labels) == {"k": "v"}
        _wait_until(lambda: len(fake.heartbeats) >= 2, 10, "two heartbeats")
        assert all(h.lease_id == 101 for h in fake.heartbeats)

        agent.popen.send_signal(signal.SIGTERM)
        assert agent.popen.wait(timeout=10) == 0
        log = agent.log_path.read_text()
        assert "received SIGTERM" in log and "stopped" in log
    finally:
        agent.kill()


@pytest.mark.slow
def test_agent_waits_for_a_coordinator_that_starts_late(agents: LocalCluster) -> None:
    fake = _new_fake()
    coordinator = f"127.0.0.1:{procs.free_port()}"
    agent = _start_agent(agents, coordinator)
    server: grpc.Server | None = None
    try:
        _wait_until(lambda: "coordinator call failed" in agent.log_path.read_text(), 20, "a failed call")
        time.sleep(1.0)  # a few more failed attempts, which must not be logged again
        server = _serve_fake(fake, coordinator)
        agents.wait_agent("n1", 20)
        assert fake.registers[0].node == "n1"
        agent.popen.send_signal(signal.SIGINT)
        assert agent.popen.wait(timeout=10) == 0
        log = agent.log_path.read_text()
        assert log.count("coordinator call failed") == 1
        if not HOST_HAS_NVML:  # without NVML the node reports no GPUs, and says why once
            assert len(fake.registers[0].inventory.gpus) == 0
            assert log.count(NO_GPU_SOURCE_MESSAGE) == 1
    finally:
        agent.kill()
        if server is not None:
            server.stop(0)


def test_agent_rejects_bad_config(agents: LocalCluster) -> None:
    agent = _start_agent(agents, "c:1", port=1, memory="lots")
    assert agent.popen.wait(timeout=20) == 2
    assert "cannot parse size" in agent.log_tail()


# -- process helpers ---------------------------------------------------------------------------


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_etcd_starts_and_stops(tmp_path: Path) -> None:
    try:
        procs.find_etcd()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    client_port, peer_port = procs.free_port(), procs.free_port()
    etcd = procs.start_etcd(tmp_path / "etcd", client_port, peer_port)
    try:
        procs.wait_tcp("127.0.0.1", client_port, 20, etcd)
        procs.wait_etcd_healthy(f"http://127.0.0.1:{client_port}", 20, etcd)
        assert etcd.alive()
    finally:
        etcd.stop(grace=5)
    assert not etcd.alive()
    assert _pid_gone(etcd.pid)
    assert (tmp_path / "etcd" / "etcd.log").exists()


def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    )
    proc = procs.start_process("stubborn", [sys.executable, "-c", code], tmp_path / "stubborn.log")
    _wait_until(lambda: "ready" in proc.log_path.read_text(), 10, "the child to ignore SIGTERM")
    started = time.monotonic()
    assert proc.stop(grace=0.5) == -signal.SIGKILL
    assert time.monotonic() - started < 5
    assert _pid_gone(proc.pid)


def test_waits_report_a_dead_child_with_its_log(tmp_path: Path) -> None:
    code = "import sys; print('boom: cannot start', file=sys.stderr); sys.exit(3)"
    proc = procs.start_process("doomed", [sys.executable, "-c", code], tmp_path / "doomed.log")
    with pytest.raises(procs.StartupError, match=r"(?s)doomed exited with status 3.*boom: cannot start"):
        procs.wait_tcp("127.0.0.1", procs.free_port(), 20, proc)
    with pytest.raises(procs.StartupError, match="not ready after"):
        procs.wait_grpc_health(f"127.0.0.1:{procs.free_port()}", 0.5)
