"""Fair share (issue 15, section 2): two tenants saturate 16 GPUs with a steady stream of 1-GPU jobs
of equal length. With equal weights each gets half of the GPU time; with weights 1:3 (their quotas'
weights), a quarter and three quarters, within 10 points.

A real coordinator with a short half-life (so that the decayed usage follows the change of weights
within seconds), 2 simulated 8-GPU nodes, and 2 x 16 client workers, each looping allocate (waiting
in the queue) -> hold JOB_S -> release. GPU time is measured from the holders' own timestamps over a
window after a warm-up. Bounded: every loop ends at its phase's end, every wait has a deadline."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

from gpulease.client import Client
from gpulease.errors import GpuLeaseError
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import types_pb2 as tpb
from tests.support import harness

pytestmark = pytest.mark.slow
JOB_S = 2.0
WORKERS = 16  # per tenant: twice the cluster's GPUs in all, so the queue never runs dry
WARMUP_S = 12.0
WINDOW_S = 24.0


def run_phase(address: str, tenants: tuple[str, str]) -> tuple[dict[str, float], dict[str, int]]:
    """GPU-seconds each tenant held during the window (after the warm-up), and how many of its
    requests were told to wait in the queue during the window (the tenants really competed)."""
    held: dict[str, list[tuple[float, float]]] = {t: [] for t in tenants}
    waited = dict.fromkeys(tenants, 0)
    lock = threading.Lock()
    start = time.monotonic()
    end = start + WARMUP_S + WINDOW_S

    def worker(tenant: str) -> None:
        def pending(_: object) -> None:
            if start + WARMUP_S <= time.monotonic() < end:
                with lock:
                    waited[tenant] += 1

        with Client(address, timeout=10) as client:
            while time.monotonic() < end:
                left = end - time.monotonic()
                try:
                    alloc = client.allocate(gpus=1, cpus=1, memory="1MiB", ttl="30s", tenant=tenant,
                                            wait=f"{max(1, int(left))}s", on_pending=pending)  # fmt: skip
                except GpuLeaseError:
                    continue  # the wait ran out at the phase's end
                got = time.monotonic()
                time.sleep(JOB_S)
                alloc.release()
                with lock:
                    held[tenant].append((got, time.monotonic()))

    with ThreadPoolExecutor(2 * WORKERS) as pool:
        futures = [pool.submit(worker, t) for t in tenants for _ in range(WORKERS)]
        for f in futures:
            f.result(timeout=WARMUP_S + WINDOW_S + 60)
    lo, hi = start + WARMUP_S, end
    shares = {t: sum(max(0.0, min(b, hi) - max(a, lo)) for a, b in spans) for t, spans in held.items()}
    return shares, waited


def test_two_tenants_share_by_their_weights(start_coordinator: Callable[..., harness.Coordinator]) -> None:
    c = start_coordinator(extra=["--queue-ttl", "3s", "--fair-share-half-life", "5s"])
    leases = {name: harness.register(c.stub, name, gpus=8, cpus=64) for name in ("n1", "n2")}
    harness.wait_nodes_up(c.stub, {"n1", "n2"})
    # The test plays the agents: their nodes stay up only while heartbeats come (the node TTL is
    # shorter than the test).
    stop = threading.Event()

    def heartbeats() -> None:
        while not stop.wait(2):
            for name, lease in leases.items():
                c.stub.Heartbeat(pb.HeartbeatRequest(node=name, lease_id=lease), timeout=10)

    beating = threading.Thread(target=heartbeats, daemon=True)
    beating.start()
    try:
        check_shares(c.address)
        # The shares were measured on the whole cluster: no node dropped out meanwhile.
        assert set(harness.node_states(c.stub).values()) == {tpb.NODE_STATE_UP}
    finally:
        stop.set()
        beating.join(15)


def check_shares(address: str) -> None:

    equal, waited = run_phase(address, ("team-a", "team-b"))
    total = sum(equal.values())
    # Contention is the premise (speed is the bench's): both tenants' requests waited in the queue.
    assert all(waited.values()), f"a tenant never waited, so its share says nothing: {waited}"
    assert abs(equal["team-a"] / total - 0.5) <= 0.10, equal

    with Client(address, timeout=10) as admin:
        admin.set_quota("team-c", weight=1)
        admin.set_quota("team-d", weight=3)
    weighted, waited = run_phase(address, ("team-c", "team-d"))
    total = sum(weighted.values())
    assert all(waited.values()), f"a tenant never waited, so its share says nothing: {waited}"
    assert abs(weighted["team-c"] / total - 0.25) <= 0.10, weighted
