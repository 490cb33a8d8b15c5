"""One tenant cannot starve the agent (issue 14, part B), end to end: a real agent process on the
test dockerd, a real coordinator, and a registry stand-in on loopback that trickles bytes.

With 50 pulls stuck on that registry and 500 concurrent waits on 63 running containers:
- at most 2 pulls reach the registry at once (the rest wait in turn on the agent);
- every heartbeat is on time (the agent logs any that starts over 1 s late) and the node, whose
  TTL is 4 heartbeats, never goes down;
- a start of an image already on the node is not held up by the pull queue;
- a release stops its container within the enforcer's budget, and an expiry within TTL + 5 s;
- when the 50 callers go away, the agent cuts the pulls in flight and the queued ones never
  reach the registry;
- a pull has a hard deadline whatever the registry trickles (the runtime alone, below).

Every loop here is bounded in count and time; every process and thread is stopped at the end.
"""

from __future__ import annotations

import contextlib
import http.server
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from gpulease.client import Client
from gpulease.dev import procs
from gpulease.dev.cluster import LocalCluster
from gpulease.errors import GpuLeaseError, RateLimited
from gpulease.v1 import agent_pb2, agent_pb2_grpc
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import types_pb2 as tpb
from tests.support import gpuctl, harness
from tests.support.dockerd import Dockerd

pytestmark = pytest.mark.slow

MiB = 2**20
STUCK_PULLS = 50
WAITS = 500
WAITS_PER_ALLOCATION = 8
WAITERS = -(-WAITS // WAITS_PER_ALLOCATION)  # 63 running containers
HEARTBEAT_S = 1
NODE_TTL_S = 4
PULL_DEADLINE_S = 60
TRICKLE_S = 0.5
MAX_TRICKLE_S = 300.0  # a handler never trickles longer than this
NODE = "starved"


class TrickleRegistry:
    """A registry stand-in on 127.0.0.1: /v2/ answers at once (dockerd's ping); anything else (the
    manifest) gets its status line and then one header byte every TRICKLE_S, never ending. Counts
    the connections that are trickling now, the most at once, and the paths asked for."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.active = 0
        self.most = 0
        self.paths: list[str] = []
        registry = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v2":
                    body = b"{}"
                    self.send_response(200)
                    self.send_header("Docker-Distribution-Api-Version", "registry/2.0")
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if self.command == "GET":
                        self.wfile.write(body)
                    return
                registry.trickle(self)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="trickle-registry", daemon=True)

    def trickle(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        with self.lock:
            self.paths.append(handler.path)
            self.active += 1
            self.most = max(self.most, self.active)
        try:
            handler.wfile.write(b"HTTP/1.1 200 OK\r\nX-Trickle: ")
            deadline = time.monotonic() + MAX_TRICKLE_S
            while not self.stop.wait(TRICKLE_S) and time.monotonic() < deadline:
                handler.wfile.write(b"a")
                handler.wfile.flush()
        except OSError:
            pass  # the client went away
        finally:
            with self.lock:
                self.active -= 1
            handler.close_connection = True

    def __enter__(self) -> TrickleRegistry:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


class NodeWatch:
    """Polls the node's state every 0.2 s on a thread of its own; records every state but UP."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = harness.AnyService(self.channel)
        self.stop = threading.Event()
        self.not_up: list[tuple[float, int]] = []
        self.polls = 0
        self.thread = threading.Thread(target=self._run, name="node-watch", daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + 900
        while not self.stop.wait(0.2) and time.monotonic() < deadline:
            try:
                nodes = self.stub.ListNodes(pb.ListNodesRequest(), timeout=5).nodes
            except grpc.RpcError:
                continue  # the coordinator is busy too: that is not the node going down
            self.polls += 1
            for n in nodes:
                if n.name == NODE and n.state != tpb.NODE_STATE_UP:
                    self.not_up.append((time.monotonic(), n.state))

    def __enter__(self) -> NodeWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        self.channel.close()


@pytest.fixture
def registry() -> Iterator[TrickleRegistry]:
    with TrickleRegistry() as r:
        yield r


def start_request(alloc: tpb.Allocation, image: str, *command: str) -> agent_pb2.StartContainerRequest:
    spec = tpb.ContainerSpec(image=image, command=list(command))
    return agent_pb2.StartContainerRequest(allocation_id=alloc.id, revision=alloc.revision, spec=spec)


def test_stuck_pulls_and_many_waits_do_not_starve_heartbeats_or_enforcement(
    start_coordinator: Any, local_cluster: LocalCluster, dockerd: Dockerd, busybox: str, registry: TrickleRegistry
) -> None:
    coordinator: harness.Coordinator = start_coordinator(node_ttl=NODE_TTL_S, heartbeat=HEARTBEAT_S)
    gpus = WAITERS + STUCK_PULLS + 4
    port = procs.free_port()
    args = [
        "--docker-host", dockerd.base_url, "--container-network", "none",
        "--registry-allowlist", f"docker.io,127.0.0.1:{registry.port}",
        "--pull-timeout-seconds", str(PULL_DEADLINE_S),
    ]  # fmt: skip
    agent = local_cluster.add_agent(
        NODE, gpus, cpus=gpus, memory="512GiB", coordinator=coordinator.address, port=port, extra_args=args,
        env=local_cluster.child_env(drop=("DOCKER_",)), timeout=60,
    )  # fmt: skip
    client = dockerd.client()
    channels = [grpc.insecure_channel(agent.address) for _ in range(4)]
    stubs = [agent_pb2_grpc.AgentServiceStub(c) for c in channels]
    pending: list[grpc.Future] = []

    def allocate(ttl: int = 600) -> tpb.Allocation:
        request = pb.AllocateRequest(gpus=1, cpus=1, memory_bytes=64 * MiB, ttl_seconds=ttl, owner="starve")
        return coordinator.stub.Allocate(request, timeout=30).allocation

    def running(container_id: str) -> bool:
        return bool(client.api.inspect_container(container_id)["State"]["Running"])

    try:
        harness.wait_nodes_up(coordinator.stub, {NODE}, timeout=30)
        # 63 running containers to wait on, and one to release.
        waiters = [allocate() for _ in range(WAITERS)]
        released = allocate()
        containers: dict[str, str] = {}
        for i, alloc in enumerate([*waiters, released]):
            pending.append(stubs[i % len(stubs)].StartContainer.future(start_request(alloc, busybox, "sleep", "900"),
                                                                      timeout=300))  # fmt: skip
            if len(pending) >= 4:
                for f in pending:
                    status = f.result()
                    containers[status.allocation_id] = status.container_id
                pending.clear()
        for f in pending:
            status = f.result()
            containers[status.allocation_id] = status.container_id
        pending.clear()
        assert len(containers) == WAITERS + 1

        with NodeWatch(coordinator.address) as watch:
            # 50 pulls that never finish: two reach the registry, the others wait their turn.
            pullers = [allocate() for _ in range(STUCK_PULLS)]
            pulls = [
                stubs[i % len(stubs)].StartContainer.future(
                    start_request(alloc, f"127.0.0.1:{registry.port}/stuck/img{i}:1", "true"), timeout=600
                )
                for i, alloc in enumerate(pullers)
            ]
            harness.wait_until(lambda: registry.active >= 2, 60, "two pulls to reach the registry")
            # 500 waits at once, 8 on each running container.
            waits = [
                stubs[i % len(stubs)].WaitContainer.future(
                    tpb.WaitContainerRequest(
                        ref=tpb.ContainerRef(container_id=containers[waiters[i % WAITERS].id]), timeout_seconds=45
                    ),
                    timeout=120,
                )
                for i in range(WAITS)
            ]
            time.sleep(3)  # let them all arrive
            refused = [w for w in waits if w.done() and w.exception() is not None]
            assert not refused, [w.exception() for w in refused[:3]]

            # A start whose image is on the node is not held up by the pull queue.
            expiring = allocate(ttl=10)
            began = time.monotonic()
            status = stubs[0].StartContainer(start_request(expiring, busybox, "sleep", "900"), timeout=60)
            assert time.monotonic() - began < 15, "a start of a present image waited behind the pulls"
            expires_at = began + 10  # not kept alive: its lease ends 10 s after it was made (at the latest)

            # A release stops its container within the enforcer's budget (interval 2 s + grace 1 s).
            coordinator.stub.Release(pb.ReleaseRequest(allocation_id=released.id), timeout=30)
            stopped_at = time.monotonic()
            harness.wait_until(lambda: not running(containers[released.id]), 10, "the released container to stop")
            release_took = time.monotonic() - stopped_at
            # An expiry within TTL + 5 s.
            harness.wait_until(lambda: not running(status.container_id), 30, "the expired container to stop")
            assert time.monotonic() <= expires_at + 5 + 1, "stopped later than TTL + 5 s after its expiry"

            assert registry.most <= 2, f"{registry.most} pulls reached the registry at once"
            assert all(not w.done() or w.exception() is None for w in waits)
            assert watch.polls > 10 and not watch.not_up, watch.not_up

            # The callers of the stuck pulls go away: the agent cuts the two in flight, and the queued
            # ones never reach the registry. (dockerd 20.10 itself keeps its HEAD of the manifest open
            # after its own client has gone: its registry client ignores the request's context there,
            # so the registry's open connections say nothing about the agent.)
            asked_before = len(registry.paths)
            for f in pulls:
                f.cancel()
            harness.wait_until(
                lambda: agent.process.log_path.read_text().count("its caller has gone") >= 2,
                20,
                "the agent to cut the pulls in flight",
            )
            time.sleep(3)
            assert len(registry.paths) == asked_before, registry.paths[asked_before:]

        log = agent.process.log_path.read_text()
        late = re.findall(r"heartbeat of node \S+ is [0-9.]+s late", log)
        assert not late, late
        assert log.count("pulling image 127.0.0.1") == 2, "a queued pull started after its caller had gone"
        assert release_took < 10
        for w in waits:
            w.cancel()
    finally:
        for f in pending:
            f.cancel()
        with contextlib.suppress(Exception):
            local_cluster.stop_agent(NODE)
        for c in channels:
            c.close()
        for c in client.api.containers(all=True, filters={"label": "io.gpulease.node=" + NODE}):
            with contextlib.suppress(Exception):
                client.api.remove_container(c["Id"], force=True)
        client.close()


def test_the_registry_stand_in_trickles(registry: TrickleRegistry) -> None:
    """The stand-in itself: /v2/ answers; a manifest request gets a never-ending header."""
    with socket.create_connection(("127.0.0.1", registry.port), timeout=5) as s:
        s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
    with socket.create_connection(("127.0.0.1", registry.port), timeout=5) as s:
        s.sendall(b"GET /v2/a/manifests/1 HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        deadline = time.monotonic() + 5
        while b"aa" not in got and time.monotonic() < deadline:
            got += s.recv(4096)
        assert got.startswith(b"HTTP/1.1 200 OK\r\nX-Trickle: a") and b"\r\n\r\n" not in got


def test_a_pull_ends_at_its_deadline_whatever_the_registry_trickles(
    dockerd: Dockerd, registry: TrickleRegistry
) -> None:
    """dockerd sends no answer at all while the registry trickles the manifest's headers: the
    runtime's watcher cuts the request at the deadline all the same."""
    from gpulease.agent.runtime.docker_runtime import DockerRuntime
    from gpulease.errors import ImageUnavailable

    runtime = DockerRuntime(dockerd.base_url, pull_timeout=3)
    try:
        began = time.monotonic()
        with pytest.raises(ImageUnavailable, match="not done after 3s"):
            runtime.ensure_image(f"127.0.0.1:{registry.port}/stuck/deadline:1")
        took = time.monotonic() - began
    finally:
        runtime.close()
    assert 3 <= took < 5, took
    assert registry.paths  # it did reach the registry, and was stuck there


def test_an_allocation_at_its_log_stream_limit_does_not_stop_another_gpuctl_run(
    coordinator: harness.Coordinator, local_cluster: LocalCluster, dockerd: Dockerd, busybox: str
) -> None:
    """Allocation A holds its 4 log streams (a 5th is RATE_LIMITED, rule 'log-streams'); gpuctl run on
    allocation B streams its output and exits with its code meanwhile. A's holder, following its
    job with a 5th stream, waits for its exit instead (ContainerHandle.follow's fallback)."""
    dockerd.add_agent(local_cluster, "logs", 2, coordinator=coordinator.address)
    ticker = ["sh", "-c", "i=0; while [ $i -lt 600 ]; do echo tick $i; i=$((i+1)); sleep 0.2; done"]
    threads: list[threading.Thread] = []
    with Client(coordinator.address, timeout=30, handle_sigterm=False) as client:
        alloc = client.allocate(gpus=1, cpus=1, memory="256MiB", ttl=120)
        with alloc:
            job = alloc.run_container(busybox, ticker)
            seen = [threading.Event() for _ in range(4)]

            def follow(i: int) -> None:
                with contextlib.suppress(GpuLeaseError):
                    for _ in job.logs(follow=True):
                        seen[i].set()

            threads = [threading.Thread(target=follow, args=(i,), daemon=True) for i in range(4)]
            for t in threads:
                t.start()
            for event in seen:
                assert event.wait(30), "a log stream of A did not start"
            with pytest.raises(RateLimited) as e:
                next(iter(job.logs(follow=True)))
            assert "rule 'log-streams'" in e.value.message

            done = gpuctl.run(
                ["--coordinator", coordinator.address, "run", "--gpus", "1", "--cpus", "1", "--memory", "256MiB",
                 busybox, "sh", "-c", "echo hello from B; exit 5"],
                timeout=120,
            )  # fmt: skip
            assert done.rc == 5 and "hello from B" in done.stdout, str(done)
            assert "cannot stream" not in done.stderr

            # A 5th stream of A is refused: its holder waits for the job instead of giving it up.
            why: list[GpuLeaseError] = []
            stopper = threading.Timer(2.0, lambda: job.stop(grace=1))
            stopper.start()
            try:
                status = job.follow(lambda chunk: None, on_fallback=why.append)
            finally:
                stopper.join(30)  # its stop call has its answer before the client closes
            assert status.exited and len(why) == 1 and isinstance(why[0], RateLimited)
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
