"""The waiting queue (issue 15, section 1) against real coordinators on the session's etcd.

- a request that does not fit waits, says why, and gets its allocation on the same call when a
  release frees its GPUs;
- higher priority first; a fresh request without a wait is refused while others are pending;
- a client that goes away leaves the queue within the waiting lease's TTL;
- a coordinator killed under a waiting client: the client resumes on the other replica with the
  same request id and keeps its place;
- backfill with a head reservation: a small request without a declared runtime never takes the
  big one's reserved node; one that ends before the estimated start does;
- max_runtime: KeepAlive stops renewing past it, and says why.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from gpulease.client import Client, PendingInfo
from gpulease.dev import procs
from gpulease.dev.cluster import LocalCluster
from gpulease.errors import InsufficientResources, RuntimeLimitReached, Unsatisfiable
from tests.support import gpuctl, harness

QUEUE_TTL = 3
QUEUE_ARGS = ["--queue-ttl", f"{QUEUE_TTL}s"]


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as ex:
        yield ex


def one_node(start: Callable[..., harness.Coordinator], gpus: int = 2, **inv: object) -> harness.Coordinator:
    c = start(extra=QUEUE_ARGS)
    harness.register(c.stub, "n1", gpus=gpus, cpus=16, **inv)
    harness.wait_nodes_up(c.stub, {"n1"})
    return c


def pending_ids(client: Client) -> list[str]:
    return [p.request_id for p in client.list_pending()]


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 10) -> None:
    harness.wait_until(predicate, timeout, what)


def test_a_request_waits_says_why_and_gets_the_gpus_a_release_frees(
    start_coordinator: Callable[..., harness.Coordinator], pool: ThreadPoolExecutor
) -> None:
    c = one_node(start_coordinator)
    with Client(c.address, timeout=5) as client:
        holder = client.allocate(gpus=2, cpus=1, memory="1MiB", ttl="60s")
        seen: list[PendingInfo] = []
        waiting: Future[object] = pool.submit(client.allocate, gpus=2, cpus=1, memory="1MiB", wait="30s",
                                              request_id="waiter", on_pending=seen.append)  # fmt: skip
        wait_for(lambda: any(s.position == 1 for s in seen), "a pending status with a position")
        status = next(s for s in seen if s.position == 1)
        assert status.request_id == "waiter" and status.gpus == 2
        assert "no node has room for 2 GPUs" in status.reason and "most: 0 on n1" in status.reason, status.reason
        assert pending_ids(client) == ["waiter"]
        assert not waiting.done()

        holder.release()
        alloc = waiting.result(timeout=10)
        assert alloc.node == "n1" and len(alloc.gpus) == 2 and alloc.request_id == "waiter"  # type: ignore[attr-defined]
        assert pending_ids(client) == []
        # Admitted means allocated: its lease is alive and it holds the GPUs.
        assert harness.free_gpus(client) == 0
        alloc.release()  # type: ignore[attr-defined]


def test_higher_priority_goes_first_and_a_fresh_request_does_not_jump_the_queue(
    start_coordinator: Callable[..., harness.Coordinator], pool: ThreadPoolExecutor
) -> None:
    c = one_node(start_coordinator)
    with Client(c.address, timeout=5) as client:
        holder = client.allocate(gpus=2, cpus=1, memory="1MiB")
        low = pool.submit(client.allocate, gpus=2, cpus=1, memory="1MiB", wait="30s", request_id="low",
                          priority="low")  # fmt: skip
        wait_for(lambda: pending_ids(client) == ["low"], "the low-priority request pending")
        high = pool.submit(client.allocate, gpus=2, cpus=1, memory="1MiB", wait="30s", request_id="high",
                           priority="high")  # fmt: skip
        wait_for(lambda: pending_ids(client) == ["high", "low"], "the high-priority request ahead of the low one")
        positions = {p.request_id: p.position for p in client.list_pending()}
        assert positions == {"high": 1, "low": 2}

        # Nothing is free; with requests pending, a request that does not wait is refused, saying so.
        with pytest.raises(InsufficientResources, match="requests are pending"):
            client.allocate(gpus=1, cpus=1, memory="1MiB")

        holder.release()
        first = high.result(timeout=10)
        assert first.request_id == "high"  # type: ignore[attr-defined]
        assert not low.done() and pending_ids(client) == ["low"]
        reason = client.list_pending()[0].reason
        assert "no node has room" in reason, reason
        first.release()  # type: ignore[attr-defined]
        assert low.result(timeout=10).request_id == "low"  # type: ignore[attr-defined]


def test_a_request_that_can_never_fit_is_refused_at_once(
    start_coordinator: Callable[..., harness.Coordinator],
) -> None:
    c = one_node(start_coordinator)
    with Client(c.address, timeout=5) as client:
        # Unsatisfiable is the at-once answer: a queued request would end, after its wait, as
        # InsufficientResources.
        with pytest.raises(Unsatisfiable, match="can ever fit 3 GPUs"):
            client.allocate(gpus=3, cpus=1, memory="1MiB", wait="60s")
        assert pending_ids(client) == []


def test_a_client_that_dies_leaves_the_queue_within_its_ttl(
    start_coordinator: Callable[..., harness.Coordinator], tmp_path: Path
) -> None:
    c = one_node(start_coordinator)
    with Client(c.address, timeout=5) as client:
        holder = client.allocate(gpus=2, cpus=1, memory="1MiB")
        script = (f"from gpulease.client import Client\n"
                  f"Client({c.address!r}, timeout=5).allocate(gpus=1, cpus=1, memory='1MiB', wait='60s', "
                  f"request_id='leaver')\n")  # fmt: skip
        proc = procs.start_process("waiting-client", [sys.executable, "-c", script], tmp_path / "client.log")
        try:
            wait_for(lambda: pending_ids(client) == ["leaver"], "the request pending")
        finally:
            proc.kill()  # SIGKILL: no goodbye; only the waiting lease's expiry removes the request
        # Gone within its waiting lease (and a poll's slack): the bound is the wait itself.
        wait_for(lambda: pending_ids(client) == [], "the request to leave the queue", timeout=QUEUE_TTL + 5)
        # And it never gets GPUs: releasing the holder frees both, nobody takes them.
        holder.release()
        time.sleep(1)
        assert harness.free_gpus(client) == 2


def test_a_waiting_client_keeps_its_place_when_its_coordinator_dies(
    start_coordinator: Callable[..., harness.Coordinator], local_cluster: LocalCluster,
    pool: ThreadPoolExecutor,
) -> None:  # fmt: skip
    a = one_node(start_coordinator)
    b = start_coordinator(extra=QUEUE_ARGS)
    harness.wait_nodes_up(b.stub, {"n1"})
    with Client(b.address, timeout=5) as admin:
        holder = admin.allocate(gpus=2, cpus=1, memory="1MiB", ttl="60s")
        first = pool.submit(admin.allocate, gpus=2, cpus=1, memory="1MiB", wait="60s", request_id="first")
        wait_for(lambda: pending_ids(admin) == ["first"], "the first request pending")
        # The second waits through replica a (listed first), behind "first".
        waiter = Client([a.address, b.address], timeout=5, retry_deadline=30)
        statuses: list[PendingInfo] = []
        second = pool.submit(waiter.allocate, gpus=2, cpus=1, memory="1MiB", wait="60s", request_id="second",
                             on_pending=statuses.append)  # fmt: skip
        wait_for(lambda: pending_ids(admin) == ["first", "second"], "the second request pending behind the first")
        queued_as = next(p.id for p in admin.list_pending() if p.request_id == "second")

        local_cluster.stop_coordinator(a.address)  # its waiter's stream breaks; the client moves to b
        time.sleep(QUEUE_TTL + 1)  # longer than the waiting lease: only a resumed wait keeps it
        listed = admin.list_pending()
        assert [(p.request_id, p.id) for p in listed] == [("first", listed[0].id), ("second", queued_as)]

        holder.release()
        got_first = first.result(timeout=10)
        got_first.release()  # type: ignore[attr-defined]
        got_second = second.result(timeout=10)
        assert got_second.id == queued_as  # type: ignore[attr-defined]
        got_second.release()  # type: ignore[attr-defined]
        waiter.close()


def test_backfill_only_into_what_ends_before_the_reserved_start(
    start_coordinator: Callable[..., harness.Coordinator], pool: ThreadPoolExecutor
) -> None:
    c = start_coordinator(extra=QUEUE_ARGS)
    harness.register(c.stub, "big", gpus=4, cpus=16)
    harness.register(c.stub, "small", gpus=1, cpus=16)
    harness.wait_nodes_up(c.stub, {"big", "small"})
    with Client(c.address, timeout=5) as client:
        # big holds 3 of 4 GPUs for at most 60s + its TTL; small's only GPU is free.
        holder = client.allocate(gpus=3, cpus=1, memory="1MiB", gpu_model="", ttl="30s", max_runtime="60s",
                                 node_selector={})  # fmt: skip
        assert holder.node == "big"
        head = pool.submit(client.allocate, gpus=4, cpus=1, memory="1MiB", wait="60s", request_id="head")
        wait_for(lambda: pending_ids(client) == ["head"], "the 4-GPU request pending")
        status = client.list_pending()[0]
        assert "big is reserved for it" in status.reason and status.estimated_start_unix_ms > 0, status.reason
        assert status.estimated_start_unix_ms == holder.created_unix_ms + (60 + 30) * 1000

        # No declared runtime: never onto the reserved node; the other node is fine.
        other = client.allocate(gpus=1, cpus=1, memory="1MiB")
        assert other.node == "small"
        with pytest.raises(InsufficientResources, match=r"held for request \S+ \(starvation protection\)"):
            client.allocate(gpus=1, cpus=1, memory="1MiB")
        # A runtime that ends before the estimated start may use the reserved node's free GPU...
        short = client.allocate(gpus=1, cpus=1, memory="1MiB", max_runtime="5s", ttl="5s")
        assert short.node == "big"
        # ...one that would end after it may not.
        short.release()
        with pytest.raises(InsufficientResources, match="starvation protection"):
            client.allocate(gpus=1, cpus=1, memory="1MiB", max_runtime="600s")
        assert not head.done()
        holder.release()
        got = head.result(timeout=10)
        assert got.node == "big" and len(got.gpus) == 4  # type: ignore[attr-defined]
        got.release()  # type: ignore[attr-defined]
        other.release()


def test_keepalive_stops_at_the_declared_max_runtime(start_coordinator: Callable[..., harness.Coordinator]) -> None:
    c = one_node(start_coordinator)
    with Client(c.address, timeout=5) as client:
        alloc = client.allocate(gpus=1, cpus=1, memory="1MiB", max_runtime="2s", ttl="5s")
        assert client.keep_alive(alloc.id) > 0
        time.sleep(2.2)
        with pytest.raises(RuntimeLimitReached, match="max runtime of 2s"):
            client.keep_alive(alloc.id)
        client.release(alloc.id)


def test_an_explicit_zero_ttl_is_refused(start_coordinator: Callable[..., harness.Coordinator]) -> None:
    c = one_node(start_coordinator)
    with Client(c.address, timeout=5) as client:
        for value in (0, "0s"):
            with pytest.raises(Exception, match="ttl must be positive"):
                client.allocate(gpus=1, ttl=value)


def test_gpuctl_waits_says_why_on_stderr_and_lists_the_queue(
    start_coordinator: Callable[..., harness.Coordinator], pool: ThreadPoolExecutor
) -> None:
    c = one_node(start_coordinator)
    base = ["--coordinator", c.address]
    with Client(c.address, timeout=5) as client:
        holder = client.allocate(gpus=2, cpus=1, memory="1MiB")
        waiting = pool.submit(gpuctl.run, [*base, "allocate", "--gpus", "1", "--cpus", "1", "--memory", "1MiB",
                                           "--wait", "30s", "--request-id", "cli", "--json"], timeout=60)  # fmt: skip
        wait_for(lambda: pending_ids(client) == ["cli"], "gpuctl's request pending")
        listed = gpuctl.run([*base, "queue", "--json"])
        assert listed.rc == 0 and [(p["request_id"], p["position"]) for p in listed.json()] == [("cli", 1)], listed
        table = gpuctl.run([*base, "queue"])
        assert table.rc == 0 and "cli" in table.stdout and "no node has room" in table.stdout, table
        holder.release()
        done = waiting.result(timeout=30)
        assert done.rc == 0, done
        assert done.json()["node"] == "n1" and "pending (position 1): no node has room" in done.stderr, done
        client.release(done.json()["id"])
        zero = gpuctl.run([*base, "allocate", "--gpus", "1", "--ttl", "0s"])
        assert zero.rc == 1 and "ttl must be positive" in zero.stderr, zero


def test_a_steady_stream_of_small_jobs_does_not_starve_a_big_one(
    start_coordinator: Callable[..., harness.Coordinator],
) -> None:
    """Issue 15's no-starvation test: 7 of 8 GPUs held by jobs of known runtime, an 8-GPU request
    queued, then a stream of 1-GPU requests, half with a short declared runtime and half with none.
    Only short ones take the free GPU ahead of the big request; it starts by its estimated start."""
    c = start_coordinator(extra=QUEUE_ARGS)
    harness.register(c.stub, "n1", gpus=8, cpus=64)
    harness.wait_nodes_up(c.stub, {"n1"})
    admitted: dict[str, float] = {}
    with Client(c.address, timeout=5) as client, ThreadPoolExecutor(16) as pool:
        # Declared to end by created + 10 s (+ TTL); never renewed, so they lapse after their 5 s TTL.
        for _ in range(7):
            client.allocate(gpus=1, cpus=1, memory="1MiB", ttl="5s", max_runtime="10s")
        big = pool.submit(client.allocate, gpus=8, cpus=1, memory="1MiB", wait="30s", request_id="big")
        wait_for(lambda: pending_ids(client) == ["big"], "the 8-GPU request pending")
        estimate = client.list_pending()[0].estimated_start_unix_ms / 1000
        assert estimate > time.time()

        def small(name: str, runtime: str | None) -> None:
            try:
                alloc = client.allocate(gpus=1, cpus=1, memory="1MiB", ttl="5s", wait="20s", request_id=name,
                                        max_runtime=runtime)  # fmt: skip
            except InsufficientResources:
                return
            admitted[name] = time.time()
            time.sleep(0.3)
            alloc.release()

        stream = []
        for i in range(24):  # 6 s of arrivals, bounded
            stream.append(pool.submit(small, f"short-{i}" if i % 2 else f"none-{i}", "1s" if i % 2 else None))
            time.sleep(0.25)
        got = big.result(timeout=30)
        started = time.time()
        admitted["big"] = started
        got.release()  # type: ignore[attr-defined]
        for f in stream:
            f.result(timeout=30)
    assert started <= estimate + 1, "the big request started later than its reservation's estimate"
    jumped = {n for n, t in admitted.items() if t < admitted["big"]}
    assert jumped, "no short request used the free GPU ahead of the big one (backfill)"
    assert all(n.startswith("short-") for n in jumped), f"a request with no declared runtime jumped ahead: {jumped}"
