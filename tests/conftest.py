from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from gpulease.client import Client
from gpulease.dev.cluster import LocalCluster
from gpulease.v1 import coordinator_pb2_grpc
from tests.support import harness


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.Etcd]:
    server = harness.start_etcd(tmp_path_factory.mktemp("etcd"))
    yield server
    server.cluster.stop()


@pytest.fixture
def prefix() -> str:
    return harness.new_prefix()


@pytest.fixture
def local_cluster(etcd: harness.Etcd, prefix: str, tmp_path: Path) -> Iterator[LocalCluster]:
    """The test's coordinators and agents (none started yet), on the session's etcd under the test's
    prefix; every one stopped at teardown."""
    cluster = harness.new_cluster(etcd, prefix, tmp_path)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def start_coordinator(local_cluster: LocalCluster) -> Iterator[Callable[..., harness.Coordinator]]:
    """Factory: start one or more coordinators of the test's cluster; all stopped at teardown."""
    started: list[harness.Coordinator] = []

    def start(**kw: Any) -> harness.Coordinator:
        c = harness.start_coordinator(local_cluster, **kw)
        started.append(c)
        return c

    yield start
    for c in started:
        c.channel.close()


@pytest.fixture
def coordinator(start_coordinator: Callable[..., harness.Coordinator]) -> harness.Coordinator:
    return start_coordinator()


@pytest.fixture
def client(address: str) -> Iterator[Client]:
    """A Client of the module's `address` fixture (a coordinator the module sets up)."""
    with Client(address, timeout=5) as c:
        yield c


@pytest.fixture
def secure_cluster(etcd: harness.Etcd, prefix: str, tmp_path: Path) -> Iterator[LocalCluster]:
    """A secure cluster (mutual TLS, tokens) with one coordinator, on the session's etcd."""
    cluster = harness.new_cluster(etcd, prefix, tmp_path, secure=True)
    try:
        cluster.add_coordinator()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def serve_fake() -> Iterator[harness.ServeFake]:
    """Factory: serve fake coordinator servicers on free ports; all stopped at teardown."""
    servers: list[grpc.Server] = []

    def start(servicer: coordinator_pb2_grpc.CoordinatorServiceServicer) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(servicer, server)
        if isinstance(servicer, coordinator_pb2_grpc.AdminServiceServicer):  # cordon, stats
            coordinator_pb2_grpc.add_AdminServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(grace=None)


# One private dockerd per session, shared by every module that asks for it.
from tests.support.dockerd import busybox, dockerd  # noqa: E402, F401

# --- no token in anything the suite wrote -----------------------------------------------------
# Every token the coordinator makes has this form (coordinator/tokens.py). After the run, every
# file under the session's temporary directory (daemons' logs, gpuctl output saved by tests,
# Airflow task logs and XCom stores) is scanned; only files meant to hold a token may: those
# named *.token, and the test that writes a token file on purpose names it so.
_TOKEN_RE = re.compile(rb"gpl_[A-Za-z0-9_-]{43}")
_TOKEN_FILES = (".token",)


def _token_leaks(root: Path) -> list[str]:
    leaks = []
    for path in root.rglob("*"):
        try:
            if not path.is_file() or path.is_symlink() or path.name.endswith(_TOKEN_FILES):
                continue
            if path.stat().st_size > 64 * 2**20:
                continue
            if _TOKEN_RE.search(path.read_bytes()):
                leaks.append(str(path))
        except OSError:
            continue
    return leaks


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None:
        return
    try:
        root = factory.getbasetemp()
    except Exception:
        return
    leaks = _token_leaks(Path(root))
    if leaks:
        sys.stderr.write("\nA bearer token was written outside a *.token file:\n  " + "\n  ".join(leaks[:20]) + "\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
