"""The coordinator's HTTP side and metrics (issue 16, parts 1 and 2), on a real coordinator and etcd:
values asserted after known actions, read from a real scrape of /metrics."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

from gpulease.dev import procs
from gpulease.dev.cluster import LocalCluster
from gpulease.v1 import coordinator_pb2 as pb
from tests.support import harness
from tests.support.scrape import get, scrape, value

GiB = 2**30


def test_metrics_follow_allocations_and_refusals(local_cluster: LocalCluster, coordinator: harness.Coordinator) -> None:
    url = local_cluster.coordinator(coordinator.address).http_url
    assert url, "the test cluster's coordinator serves HTTP"
    assert get(f"{url}/healthz")[0] == 200
    assert get(f"{url}/readyz") == (200, "ready\n")
    s = coordinator.stub
    harness.register(s, "node-a", gpus=4)
    harness.wait_until(lambda: value(scrape(url), "gpulease_gpus", state="free") == 4, 10, "4 free GPUs")
    before = scrape(url)
    assert value(before, "gpulease_nodes", state="up") == 1
    assert value(before, "gpulease_gpus", state="allocated") == 0

    alloc = s.Allocate(pb.AllocateRequest(gpus=3, cpus=1, memory_bytes=GiB)).allocation
    after = scrape(url)
    assert value(after, "gpulease_gpus", state="allocated") == value(before, "gpulease_gpus", state="allocated") + 3
    assert value(after, "gpulease_gpus", state="free") == 1
    assert sum(v for (n, _), v in after.items() if n == "gpulease_allocations_live") == 1, after
    assert value(after, "gpulease_allocate_requests_total", outcome="ok", reason="") == 1
    assert value(after, "gpulease_allocate_seconds_count") == 1
    assert value(after, "gpulease_commit_batch_size_count") >= 1
    assert value(after, "gpulease_etcd_txn_seconds_count") >= 1

    # Two more GPUs than are free: refused, and counted with its reason.
    err = harness.rpc_error(lambda: s.Allocate(pb.AllocateRequest(gpus=2, cpus=1, memory_bytes=GiB)))
    assert harness.reason(err) == "INSUFFICIENT_RESOURCES"
    refused = scrape(url)
    assert value(refused, "gpulease_allocate_requests_total", outcome="error", reason="INSUFFICIENT_RESOURCES") == 1
    # More than any node has: never satisfiable.
    harness.rpc_error(lambda: s.Allocate(pb.AllocateRequest(gpus=64)))
    assert value(scrape(url), "gpulease_allocate_requests_total", outcome="error", reason="UNSATISFIABLE") == 1

    s.Release(pb.ReleaseRequest(allocation_id=alloc.id))
    released = scrape(url)
    assert value(released, "gpulease_gpus", state="allocated") == 0
    assert value(released, "gpulease_gpus", state="free") == 4
    assert value(released, "gpulease_allocations_live", tenant="none") == 0
    assert value(released, "gpulease_lease_expiries_total") == 0, "a release is not an expiry"

    s.CordonNode(pb.CordonNodeRequest(node="node-a", cordoned=True))
    harness.wait_until(lambda: value(scrape(url), "gpulease_gpus", state="cordoned") == 4, 10, "4 cordoned GPUs")
    assert value(scrape(url), "gpulease_nodes", state="cordoned") == 1
    assert value(scrape(url), "gpulease_view_synced") == 1


def test_an_allocation_that_is_not_released_counts_as_a_lease_expiry(
    local_cluster: LocalCluster, coordinator: harness.Coordinator
) -> None:
    url = local_cluster.coordinator(coordinator.address).http_url
    harness.register(coordinator.stub, "node-a", gpus=2)
    coordinator.stub.Allocate(pb.AllocateRequest(gpus=1, cpus=1, memory_bytes=GiB, ttl_seconds=5))
    harness.wait_until(lambda: value(scrape(url), "gpulease_lease_expiries_total") == 1, 25, "one lease expiry")
    assert value(scrape(url), "gpulease_gpus", state="allocated") == 0


def test_metrics_on_a_public_address_need_a_token(etcd: harness.Etcd, prefix: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    argv = [sys.executable, "-m", "gpulease.coordinator.main", "--etcd", etcd.url, "--prefix", prefix,
            "--listen", f"127.0.0.1:{procs.free_port()}", "--http-listen", f"0.0.0.0:{procs.free_port()}"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "is not a loopback address" in done.stderr and "metrics_token_file" in done.stderr, done.stderr

    token = tmp_path / "metrics.token"
    token.write_text("s3cret\n")
    cluster = LocalCluster(tmp_path / "c", etcd_url=etcd.url, prefix=prefix, http=False,
                           startup_timeout=harness.STARTUP_TIMEOUT_S)  # fmt: skip
    with cluster:
        port = procs.free_port()
        cluster.add_coordinator(extra_args=["--http-listen", f"0.0.0.0:{port}", "--metrics-token-file", str(token)])
        url = f"http://127.0.0.1:{port}"
        assert get(f"{url}/metrics")[0] == 401
        assert get(f"{url}/metrics", "wrong")[0] == 401
        status, text = get(f"{url}/metrics", "s3cret")
        assert status == 200 and "gpulease_gpus" in text
        assert get(f"{url}/readyz")[0] == 200  # probes need no token


def test_the_heartbeat_cap_stretches_the_interval_agents_are_told(
    local_cluster: LocalCluster, start_coordinator: Callable[..., harness.Coordinator]
) -> None:
    """Past max_heartbeats_per_second x heartbeat_interval nodes, the interval is nodes / cap and
    the TTL keeps its margin (coordinator/liveness.py); answers and metrics say the same."""
    c = start_coordinator(node_ttl=6, heartbeat=2, extra=["--max-heartbeats-per-second", "1"])
    url = local_cluster.coordinator(c.address).http_url
    lease = harness.register(c.stub, "node-a", gpus=1)
    harness.register(c.stub, "node-b", gpus=1)
    harness.wait_until(lambda: value(scrape(url), "gpulease_nodes", state="up") == 2, 10, "2 nodes up")
    assert c.stub.Heartbeat(pb.HeartbeatRequest(node="node-a", lease_id=lease)).heartbeat_interval_seconds == 2
    harness.register(c.stub, "node-c", gpus=1)
    harness.wait_until(lambda: value(scrape(url), "gpulease_nodes", state="up") == 3, 10, "3 nodes up")
    assert c.stub.Heartbeat(pb.HeartbeatRequest(node="node-a", lease_id=lease)).heartbeat_interval_seconds == 3
    metrics = scrape(url)
    assert value(metrics, "gpulease_node_heartbeat_interval_seconds") == 3
    assert value(metrics, "gpulease_node_ttl_seconds") == 7
