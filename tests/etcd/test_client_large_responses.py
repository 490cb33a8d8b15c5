"""Cluster-wide answers outgrow gRPC's default 4 MiB receive limit well before 10,000 nodes
(about 600 bytes per simulated 8-GPU node, several KB with real NVML telemetry): the client and
gpuctl must still read them."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gpulease.client import Client
from gpulease.client.aio import AsyncClient
from gpulease.v1 import coordinator_pb2 as pb
from tests.support import harness

NODES = 80
GPUS = 1024  # validation's per-node maximum: ~70 bytes per GPU, so ~5.5 MiB for the cluster


@pytest.fixture
def big_cluster(coordinator: harness.Coordinator) -> harness.Coordinator:
    names = {f"big{i:02d}" for i in range(NODES)}
    for name in sorted(names):
        harness.register(coordinator.stub, name, gpus=GPUS)
    harness.wait_nodes_up(coordinator.stub, names)
    return coordinator


def test_default_grpc_limit_would_refuse_this_answer(big_cluster: harness.Coordinator) -> None:
    with grpc.insecure_channel(big_cluster.address) as channel, pytest.raises(grpc.RpcError) as err:
        channel.unary_unary(
            "/gpulease.v1.CoordinatorService/ListNodes",
            request_serializer=pb.ListNodesRequest.SerializeToString,
            response_deserializer=pb.ListNodesResponse.FromString,
        )(pb.ListNodesRequest(), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_clients_read_cluster_wide_answers_over_4_mib(big_cluster: harness.Coordinator) -> None:
    with Client(big_cluster.address, timeout=30) as client:
        nodes = client.list_nodes()
        summary = client.cluster_summary()
    assert len(nodes) == NODES and all(len(n.gpus) == GPUS for n in nodes)
    assert summary.totals.gpus_total == NODES * GPUS

    async def via_async() -> int:
        async with AsyncClient(big_cluster.address, timeout=30) as aclient:
            return len(await aclient.list_nodes())

    assert asyncio.run(via_async()) == NODES
