"""`gpuctl run` against a tiny in-process fake coordinator (no etcd, no agent): a Ctrl-C or SIGTERM
that arrives while the allocation is being made waits for it, then releases it. (With a real
container runtime: tests/e2e/test_containers_e2e.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import grpc
import pytest

from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import coordinator_pb2_grpc
from gpulease.v1 import types_pb2 as tpb
from tests.support import harness


class SlowAllocate(coordinator_pb2_grpc.CoordinatorServiceServicer):
    """Allocate answers once ``answer`` is set; records what it was asked."""

    def __init__(self) -> None:
        self.asked = threading.Event()
        self.answer = threading.Event()
        self.released: list[str] = []

    def Allocate(self, request: pb.AllocateRequest, context: grpc.ServicerContext) -> pb.AllocateResponse:
        self.asked.set()
        self.answer.wait(30)
        alloc = tpb.Allocation(id="a1", node="n1", ttl_seconds=60, request_id=request.request_id)
        alloc.gpus.add(index=0, uuid="GPU-0", model="sim")
        return pb.AllocateResponse(allocation=alloc)

    def KeepAlive(self, request: pb.KeepAliveRequest, context: grpc.ServicerContext) -> pb.KeepAliveResponse:
        return pb.KeepAliveResponse(ttl_seconds=60)

    def Release(self, request: pb.ReleaseRequest, context: grpc.ServicerContext) -> pb.ReleaseResponse:
        self.released.append(request.allocation_id)
        return pb.ReleaseResponse(released=True)


@pytest.mark.parametrize(("signum", "name"), [(signal.SIGINT, "SIGINT"), (signal.SIGTERM, "SIGTERM")])
def test_a_signal_during_allocate_waits_for_the_allocation_then_releases_it(
    serve_fake: harness.ServeFake, signum: int, name: str
) -> None:
    fake = SlowAllocate()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPULEASE_")}
    child = subprocess.Popen([sys.executable, "-m", "gpulease.cli.main", "--coordinator", serve_fake(fake), "run",
                              "--gpus", "1", "busybox", "true"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        assert fake.asked.wait(30), "gpuctl never asked for an allocation"
        child.send_signal(signum)  # while Allocate is in flight
        threading.Timer(0.5, fake.answer.set).start()
        _, err = child.communicate(timeout=30)
    finally:
        fake.answer.set()
        if child.poll() is None:
            child.kill()
            child.wait(10)
    assert child.returncode == 128 + signum, err
    assert fake.released == ["a1"], err  # not left to its TTL
    assert "allocated a1 on n1" in err and f"{name}: stopping the container and releasing" in err, err
    assert "released a1" in err and "Traceback" not in err, err
