from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from gpulease.v1 import coordinator_pb2_grpc
from tests.support import harness


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[harness.Etcd]:
    server = harness.start_etcd(tmp_path_factory.mktemp("etcd"))
    yield server
    server.proc.stop()


@pytest.fixture
def prefix() -> str:
    return harness.new_prefix()


@pytest.fixture
def start_coordinator(etcd: harness.Etcd, prefix: str, tmp_path: Path) -> Iterator[Callable[..., harness.Coordinator]]:
    """Factory: start one or more coordinators on the test's prefix; all stopped at teardown."""
    started: list[harness.Coordinator] = []

    def start(**kw: object) -> harness.Coordinator:
        c = harness.start_coordinator(tmp_path, etcd.url, prefix, **kw)  # type: ignore[arg-type]
        started.append(c)
        return c

    yield start
    for c in started:
        c.channel.close()
    harness.stop_all([c.proc for c in started])


@pytest.fixture
def coordinator(start_coordinator: Callable[..., harness.Coordinator]) -> harness.Coordinator:
    return start_coordinator()


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
