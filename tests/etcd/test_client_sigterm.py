"""SIGTERM and the sync client, against a real coordinator and etcd.

While an Allocation is used as a context manager in the main thread, SIGTERM raises Terminated
there, wherever the main thread is, so the ``with`` block releases the allocation; ``gpuctl run``
relies on the same. Is raising from the handler safe while gRPC calls are in flight? An older
gpuctl kept every gRPC call off its main thread because a signal raised inside a blocking gRPC
call was once seen to abort in malloc. ``test_raising_from_a_sigterm_handler_during_grpc_calls_is_safe``
settles it: a child holds an allocation while its main thread sits in gRPC calls back to back (a
followed log stream, WaitContainer) and two other threads make calls (the keepalive thread, and
one that renews and waits in a loop to widen the window); SIGTERM comes at a random moment, many
times. Every time the child must exit by Terminated (128 + SIGTERM) with its allocation released
at once: not abort, not hang, not leave the GPUs held until the TTL.

The node's agent is a fake served here, so that the coordinator's forwarded calls block the way
real ones do: the log stream sends a chunk every 20 ms, WaitContainer takes 300 ms.
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import FrameType

import grpc
import pytest

import gpulease
from gpulease import errors
from gpulease.client import Client, Terminated
from gpulease.v1 import agent_pb2_grpc
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import types_pb2 as tpb
from tests.support import harness

NODE_GPUS = 4
ROUNDS = 20

HOLD_AND_SLEEP = """
    with Client(sys.argv[1], timeout=5) as client:
        with client.allocate(gpus=2, ttl=60, owner="sigterm") as alloc:
            print(alloc.id, flush=True)
            time.sleep(60)
    print("not reached", flush=True)
"""

HOLD_AND_CALL = """
    with Client(sys.argv[1], timeout=5) as client:
        with client.allocate(gpus=1, ttl=5, owner="sigterm-grpc") as alloc:  # keepalive every ~1.7 s

            def busy():  # another thread inside gRPC calls nearly all the time, until the very end
                calls = [alloc.keep_alive, lambda: client.wait_container(alloc.id, "c1", timeout=1), client.list_nodes]
                while True:
                    for call in calls:
                        try:
                            call()
                        except Exception:  # released, or the channel closed at exit: on to the next call
                            time.sleep(0.05)

            threading.Thread(target=busy, daemon=True).start()
            print(alloc.id, flush=True)
            while True:  # the main thread: inside gRPC calls, or between two
                for _ in client.logs(alloc.id, "c1", follow=True):
                    pass
                client.wait_container(alloc.id, "c1", timeout=1)
    print("not reached", flush=True)
"""


class SlowAgent(agent_pb2_grpc.AgentServiceServicer):
    def StreamLogs(self, request: object, context: grpc.ServicerContext) -> Iterator[tpb.LogChunk]:
        for _ in range(50):
            if not context.is_active():
                return
            time.sleep(0.02)
            yield tpb.LogChunk(stream="stdout", data=b"x" * 64)

    def WaitContainer(self, request: object, context: grpc.ServicerContext) -> tpb.ContainerStatus:
        time.sleep(0.3)
        return tpb.ContainerStatus(container_id="c1", state=tpb.CONTAINER_STATE_RUNNING)


@pytest.fixture
def agent_address() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    agent_pb2_grpc.add_AgentServiceServicer_to_server(SlowAgent(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


class Node:
    def __init__(self, coordinator: harness.Coordinator, agent_address: str) -> None:
        self._stub = coordinator.stub
        inventory = harness.inventory(NODE_GPUS, node="n1")
        self._lease = self._stub.RegisterNode(
            pb.RegisterNodeRequest(node="n1", address=agent_address, inventory=inventory)
        ).lease_id
        harness.wait_nodes_up(self._stub, {"n1"})

    def heartbeat(self) -> None:
        self._stub.Heartbeat(pb.HeartbeatRequest(node="n1", lease_id=self._lease))


@pytest.fixture
def address(coordinator: harness.Coordinator, agent_address: str) -> str:
    """A coordinator with one node of NODE_GPUS GPUs, whose agent is a SlowAgent."""
    Node(coordinator, agent_address)
    return coordinator.address


class Child:
    """A Python child running ``body`` (with Client, signal, sys, threading and time imported): it
    prints the id of the allocation it holds, then waits for SIGTERM."""

    def __init__(self, tmp: Path, body: str, address: str) -> None:
        script = tmp / "child.py"
        header = "import faulthandler, signal, sys, threading, time\nfrom gpulease.client import Client\n"
        # The test asks for every thread's stack if the child hangs.
        script.write_text(header + "faulthandler.register(signal.SIGUSR1)\n" + textwrap.dedent(body))
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPULEASE_")}
        source_root = str(Path(gpulease.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen([sys.executable, str(script), address],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)  # fmt: skip

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def allocation_id(self) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        assert ready, "the child did not allocate within 30 s"
        alloc_id = self.proc.stdout.readline().decode().strip()
        assert alloc_id, self.proc.stderr.read().decode() if self.proc.stderr else ""
        return alloc_id

    def terminate(self) -> tuple[int, str, str]:
        """SIGTERM; (exit status, stdout, stderr) once it exits, within 15 s."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            out, err = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)  # faulthandler: where is each thread?
            time.sleep(1)
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            raise AssertionError(f"no exit within 15 s of SIGTERM; its threads:\n{err.decode()}") from None
        return self.proc.returncode, out.decode(), err.decode(errors="replace")


def check_released_at_once(client: Client, alloc_id: str, status: int, out: str, err: str) -> None:
    assert status == 128 + signal.SIGTERM, err[-3000:]  # Terminated; not -SIGABRT, -SIGSEGV, 1, ...
    assert "not reached" not in out
    # Free right away, not after the TTL.
    assert harness.free_gpus(client) == NODE_GPUS, err[-3000:]
    with pytest.raises(errors.AllocationNotFound):
        client.get_allocation(alloc_id)


@pytest.mark.slow
def test_sigterm_releases_the_allocation(client: Client, address: str, tmp_path: Path) -> None:
    with Child(tmp_path, HOLD_AND_SLEEP, address) as child:
        alloc_id = child.allocation_id()
        assert harness.free_gpus(client) == NODE_GPUS - 2
        sent = time.monotonic()
        check_released_at_once(client, alloc_id, *child.terminate())
        assert time.monotonic() - sent < 10


@pytest.mark.slow
def test_raising_from_a_sigterm_handler_during_grpc_calls_is_safe(
    coordinator: harness.Coordinator, agent_address: str, tmp_path: Path
) -> None:
    node = Node(coordinator, agent_address)
    seed = random.randrange(2**32)
    delays = random.Random(seed).sample([i / 100 for i in range(5, 120)], ROUNDS)
    started = time.monotonic()
    with Client(coordinator.address, timeout=5) as client:
        for n, delay in enumerate(delays):
            node.heartbeat()
            with Child(tmp_path, HOLD_AND_CALL, coordinator.address) as child:
                alloc_id = child.allocation_id()
                assert harness.free_gpus(client) == NODE_GPUS - 1
                time.sleep(delay)
                try:
                    check_released_at_once(client, alloc_id, *child.terminate())
                except AssertionError as exc:
                    raise AssertionError(f"round {n}, SIGTERM {delay:.2f} s in (seed {seed}): {exc}") from None
    assert time.monotonic() - started < 150  # bounded: about 2 s a round


def test_sigterm_in_process_chains_the_previous_handler_and_restores_it(client: Client) -> None:
    seen: list[int] = []

    def previous(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)

    original = signal.signal(signal.SIGTERM, previous)
    try:
        with pytest.raises(Terminated) as info, client.allocate(gpus=1, ttl=30) as alloc:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # interrupted by the handler
        assert info.value.code == 128 + signal.SIGTERM
        assert seen == [signal.SIGTERM]
        assert alloc.released and harness.free_gpus(client) == NODE_GPUS
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, original)


def test_no_sigterm_handler_when_disabled_or_off_the_main_thread(address: str) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with Client(address, timeout=5, handle_sigterm=False) as client, client.allocate(gpus=1, ttl=30):
        assert signal.getsignal(signal.SIGTERM) is before
    with Client(address, timeout=5) as client:
        seen: list[object] = []

        def in_thread() -> None:
            with client.allocate(gpus=1, ttl=30):
                seen.append(signal.getsignal(signal.SIGTERM))

        worker = threading.Thread(target=in_thread)
        worker.start()
        worker.join(30)
        assert seen == [before]
        assert harness.free_gpus(client) == NODE_GPUS
