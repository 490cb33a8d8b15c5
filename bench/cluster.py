"""A benchmark cluster: real etcd and coordinator processes, nodes registered through the
agent-facing RPCs (RegisterNode / Heartbeat), exactly as agents would."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil

from gpulease import procs
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import coordinator_pb2_grpc as pb_grpc
from gpulease.v1 import types_pb2 as tpb

GiB = 2**30


@dataclass
class BenchCluster:
    tmp: Path
    etcd: procs.ManagedProcess
    etcd_url: str
    coordinators: list[tuple[procs.ManagedProcess, str]] = field(default_factory=list)

    @classmethod
    def start(cls) -> BenchCluster:
        # tmpfs when there is one: the bench measures the software, not this machine's fsync.
        base = "/dev/shm" if Path("/dev/shm").is_dir() else None
        tmp = Path(tempfile.mkdtemp(prefix="gpulease-bench-", dir=base))
        client, peer = procs.free_port(), procs.free_port()
        etcd = procs.start_etcd(tmp / "etcd", client, peer)
        url = f"http://127.0.0.1:{client}"
        procs.wait_etcd_healthy(url, 30, etcd)
        return cls(tmp, etcd, url)

    def start_coordinator(self, prefix: str, *, node_ttl: int = 3600, heartbeat: int = 10) -> str:
        port = procs.free_port()
        address = f"127.0.0.1:{port}"
        args = [
            "--etcd", self.etcd_url, "--listen", address, "--prefix", prefix, "--node-ttl", str(node_ttl),
            "--heartbeat-interval", str(heartbeat), "--log-level", "WARNING", "--etcd-max-txn-ops", "1024",
        ]  # fmt: skip
        proc = procs.start_python_module(
            f"coordinator-{port}", "gpulease.coordinator.main", args, self.tmp / f"c-{port}.log"
        )
        # Tracked before the wait, so a coordinator that never gets healthy is stopped too.
        self.coordinators.append((proc, address))
        procs.wait_grpc_health(address, 120, proc)
        return address

    def stop_coordinator(self, address: str) -> None:
        for proc, addr in list(self.coordinators):
            if addr == address:
                proc.stop()
                self.coordinators.remove((proc, addr))

    def pid(self, address: str) -> int:
        for proc, addr in self.coordinators:
            if addr == address:
                return proc.pid
        raise KeyError(address)

    def coordinator_rss(self, address: str) -> int:
        return int(psutil.Process(self.pid(address)).memory_info().rss)

    def etcd_version(self) -> str:
        out = subprocess.run([procs.find_etcd(), "--version"], capture_output=True, text=True, timeout=10).stdout
        return out.splitlines()[0].split(":", 1)[-1].strip() if out else "unknown"

    def stop(self) -> None:
        procs.stop_all([p for p, _ in self.coordinators] + [self.etcd], grace=5)
        shutil.rmtree(self.tmp, ignore_errors=True)


# Every simulated node of the bench has this many GPUs.
GPUS_PER_NODE = 8


def inventory(name: str, gpus: int = GPUS_PER_NODE) -> tpb.NodeInventory:
    return tpb.NodeInventory(
        gpus=[
            tpb.Gpu(
                index=i,
                uuid=f"GPU-SIM-{name}-{i}",
                model="Simulated GPU 80GB",
                memory_total_bytes=80 * GiB,
                healthy=True,
                simulated=True,
                health_detail="simulated",
            )
            for i in range(gpus)
        ],
        cpus_total=224,
        memory_total_bytes=2048 * GiB,
        labels={"gpulease.dev/simulated": "true"},
        hostname=name,
        source="simulated",
    )


async def register_nodes(address: str, names: list[str], concurrency: int = 64) -> dict[str, int]:
    """RegisterNode for every name; returns name -> lease id (for heartbeats)."""
    leases: dict[str, int] = {}
    sem = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.NodeServiceStub(channel)

        async def one(name: str) -> None:
            async with sem:
                resp = await stub.RegisterNode(
                    pb.RegisterNodeRequest(node=name, address="127.0.0.1:1", inventory=inventory(name)), timeout=60
                )
                leases[name] = resp.lease_id

        await asyncio.gather(*(one(n) for n in names))
    return leases


async def wait_nodes(address: str, count: int, timeout: float) -> float:
    """Seconds until the coordinator lists `count` nodes (how long its view takes to sync)."""
    start = time.perf_counter()
    deadline = start + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.CoordinatorServiceStub(channel)
        while time.perf_counter() < deadline:
            try:
                summary = await stub.GetClusterSummary(pb.GetClusterSummaryRequest(), timeout=10)
                if len(summary.nodes) >= count:
                    return time.perf_counter() - start
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.02)
    raise TimeoutError(f"coordinator at {address} did not list {count} nodes within {timeout}s")
