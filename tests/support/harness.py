"""Test harness: real etcd, coordinator and agent processes (a LocalCluster, gpulease/dev/cluster.py),
plus small gRPC helpers.

Each test gets its own cluster and key prefix on one session-wide etcd, so tests never see each
other's state and no test needs a fresh etcd (about 1 s each).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from gpulease.coordinator.keys import range_end
from gpulease.coordinator.store import Store
from gpulease.dev import procs
from gpulease.dev.cluster import LocalCluster
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import coordinator_pb2_grpc as pb_grpc
from gpulease.v1 import types_pb2 as tpb

GiB = 2**30
# How long a test's coordinator or agent may take to report SERVING.
STARTUP_TIMEOUT_S = 20.0


# Serves an in-process fake CoordinatorService and returns its address (conftest: serve_fake).
ServeFake = Callable[[pb_grpc.CoordinatorServiceServicer], str]


@dataclass
class Etcd:
    """The session's etcd: a LocalCluster of etcd alone, which every test's cluster shares."""

    url: str
    cluster: LocalCluster = field(repr=False)

    @property
    def proc(self) -> procs.ManagedProcess:
        assert self.cluster.etcd is not None
        return self.cluster.etcd


# Which service serves each RPC: the coordinator's API is split by audience (users, agents,
# operators), and test tooling speaks to all three.
SERVICE_OF = {m.name: s.name for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods}


class AnyService:
    """The stubs of every coordinator service on one channel (sync or grpc.aio), called by RPC name:
    `stub.Allocate(...)`, `stub.RegisterNode(...)` and `stub.CordonNode(...)` each reach their service."""

    def __init__(self, channel: Any) -> None:
        self._stubs = {name: getattr(pb_grpc, f"{name}Stub")(channel) for name in set(SERVICE_OF.values())}

    def __getattr__(self, rpc: str) -> Any:
        if rpc not in SERVICE_OF:
            raise AttributeError(rpc)
        return getattr(self._stubs[SERVICE_OF[rpc]], rpc)


@dataclass
class Coordinator:
    address: str
    proc: procs.ManagedProcess
    channel: grpc.Channel = field(repr=False)
    stub: Any = field(repr=False)  # AnyService


def start_etcd(tmp: Path) -> Etcd:
    cluster = LocalCluster(tmp, startup_timeout=STARTUP_TIMEOUT_S).start(coordinators=0)
    return Etcd(cluster.etcd_url, cluster)


def new_cluster(etcd: Etcd, prefix: str, tmp: Path, *, secure: bool = False) -> LocalCluster:
    """A test's own cluster: its coordinators and agents on the shared etcd, under its prefix, with
    their logs in tmp/logs. Quick heartbeats; node leases long enough to outlive a slow test.
    secure: mutual TLS and tokens everywhere (see LocalCluster)."""
    return LocalCluster(tmp, etcd_url=etcd.url, prefix=prefix, node_ttl=60, heartbeat_interval=2,
                        startup_timeout=STARTUP_TIMEOUT_S, secure=secure)  # fmt: skip


def start_coordinator(cluster: LocalCluster, *, node_ttl: int | None = None, heartbeat: int | None = None,
                      extra: list[str] | None = None, port: int | None = None) -> Coordinator:  # fmt: skip
    """A coordinator of cluster, with a channel and the stubs of every service; stopped with the
    cluster (close its channel first)."""
    child = cluster.add_coordinator(port, node_ttl=node_ttl, heartbeat_interval=heartbeat, extra_args=extra or ())
    channel = cluster.channel(child.address)
    return Coordinator(child.address, child.process, channel, AnyService(channel))


def new_prefix() -> str:
    return f"/t-{uuid.uuid4().hex[:12]}/"


def inventory(
    gpus: int = 8, *, model: str = "NVIDIA H100 80GB HBM3", cpus: int = 32, memory: int = 256 * GiB,
    labels: dict[str, str] | None = None, gpu_memory: int = 80 * GiB, node: str = "n",
) -> tpb.NodeInventory:  # fmt: skip
    return tpb.NodeInventory(
        gpus=[
            tpb.Gpu(index=i, uuid=f"GPU-{node}-{i}", model=model, memory_total_bytes=gpu_memory, healthy=True)
            for i in range(gpus)
        ],
        cpus_total=cpus,
        memory_total_bytes=memory,
        labels=labels or {},
        hostname=node,
    )


def register(stub: Any, name: str, **inv: object) -> int:
    resp = stub.RegisterNode(
        pb.RegisterNodeRequest(
            node=name, address=f"127.0.0.1:{procs.free_port()}", inventory=inventory(node=name, **inv)
        )  # type: ignore[arg-type]
    )
    return resp.lease_id


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1) -> object:
    """Poll predicate until truthy; fail with `what` after timeout. Returns the truthy value."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def summary(stub: pb_grpc.CoordinatorServiceStub) -> pb.GetClusterSummaryResponse:
    return stub.GetClusterSummary(pb.GetClusterSummaryRequest())


def wait_nodes_up(stub: pb_grpc.CoordinatorServiceStub, names: set[str], timeout: float = 10) -> None:
    def up() -> bool:
        nodes = stub.ListNodes(pb.ListNodesRequest()).nodes
        return {n.name for n in nodes if n.state == tpb.NODE_STATE_UP} >= names

    wait_until(up, timeout, f"nodes {sorted(names)} up")


def rpc_error(fn: Callable[[], object]) -> grpc.RpcError:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("expected an RPC error, got success")


def reason(err: grpc.RpcError) -> str:
    return dict(err.trailing_metadata() or ()).get("gpulease-reason", "")  # type: ignore[attr-defined]


def etcd_keys(url: str, prefix: str) -> list[str]:
    """Every key under prefix, read directly from etcd (not through the coordinator)."""

    async def read() -> list[str]:
        store = Store([url])
        await store.start()
        try:
            _, kvs = await store.get_prefix(prefix, range_end(prefix))
            return [kv.key[len(prefix) :] for kv in kvs]
        finally:
            await store.close()

    return asyncio.run(read())


def node_states(stub: pb_grpc.CoordinatorServiceStub) -> dict[str, int]:
    return {n.name: n.state for n in stub.ListNodes(pb.ListNodesRequest()).nodes}


def free_gpus(client: Any) -> int:
    """Free GPUs in the cluster, as a Client sees them."""
    return int(client.cluster_summary().totals.gpus_free)


def alive_leases(etcd_url: str, prefix: str, nodes: list[str]) -> dict[str, int | None]:
    """node -> the lease of its alive/<node> key, read from etcd itself (None: no key)."""

    async def read() -> dict[str, int | None]:
        store = Store([etcd_url])
        await store.start()
        try:
            out: dict[str, int | None] = {}
            for node in nodes:
                kv = await store.get(f"{prefix}alive/{node}")
                out[node] = kv.lease if kv is not None else None
            return out
        finally:
            await store.close()

    return asyncio.run(read())
