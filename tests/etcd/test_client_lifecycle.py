"""The sync client's allocation handles against a real coordinator and etcd: release on every way
out of a ``with`` block (SIGTERM: test_client_sigterm.py), keepalive, lease loss, and UNAVAILABLE
retries.

Containers need a node agent with a container runtime, which these tests do not start: for
container handles only argument validation and error mapping are checked.
"""

from __future__ import annotations

import dataclasses
import pickle
import threading
import time
from collections.abc import Callable

import grpc
import pytest

from gpulease import errors
from gpulease.client import Allocation, AllocationInfo, Client, Container, ContainerHandle
from gpulease.client.retry import RetryPlan
from gpulease.dev import procs
from gpulease.dev.cluster import LocalCluster
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import coordinator_pb2_grpc
from gpulease.v1 import types_pb2 as tpb
from tests.support import harness

NODE_GPUS = 4
Start = Callable[..., harness.Coordinator]


@pytest.fixture
def address(coordinator: harness.Coordinator) -> str:
    """A coordinator with one node of NODE_GPUS GPUs (its agent address leads nowhere)."""
    harness.register(coordinator.stub, "n1", gpus=NODE_GPUS)
    harness.wait_nodes_up(coordinator.stub, {"n1"})
    return coordinator.address


def dead_address() -> str:
    return f"127.0.0.1:{procs.free_port()}"


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> float:
    """Poll until true; returns the seconds it took."""
    start = time.monotonic()
    harness.wait_until(predicate, timeout, what, interval=0.05)
    return time.monotonic() - start


# --- release on the way out -------------------------------------------------------------------


def test_context_manager_releases_on_normal_exit(client: Client) -> None:
    with client.allocate(gpus=2, ttl=30, owner="lifecycle") as alloc:
        assert isinstance(alloc, Allocation)
        assert len(alloc.gpus) == 2 and alloc.to_dict()["id"] == alloc.id
        assert harness.free_gpus(client) == NODE_GPUS - 2
        assert not alloc.lost and not alloc.released
    assert alloc.released
    assert harness.free_gpus(client) == NODE_GPUS
    with pytest.raises(errors.AllocationNotFound):
        client.get_allocation(alloc.id)
    # Idempotent: nothing left to release.
    assert alloc.release() is False
    # Released by us is not lost; using it says so.
    assert not alloc.lost
    with pytest.raises(errors.AllocationNotFound, match="released"):
        alloc.keep_alive()


def test_context_manager_releases_on_exception(client: Client) -> None:
    with pytest.raises(RuntimeError, match="boom"), client.allocate(gpus=3, ttl=30) as alloc:
        assert harness.free_gpus(client) == NODE_GPUS - 3
        raise RuntimeError("boom")
    assert alloc.released
    assert harness.free_gpus(client) == NODE_GPUS


def test_release_inside_the_block_is_idempotent(client: Client) -> None:
    with client.allocate(gpus=1, ttl=30) as alloc:
        assert alloc.release() is True
        assert alloc.release() is False
        assert harness.free_gpus(client) == NODE_GPUS
    assert not alloc.lost


def test_plain_release_and_keep_alive_without_a_block(client: Client) -> None:
    alloc = client.allocate(gpus=1, ttl=30)
    assert alloc.keep_alive() > 0
    assert client.release(alloc.id) is True  # behind the handle's back
    with pytest.raises(errors.AllocationLost, match=f"allocation {alloc.id} was lost at .*no longer knows it"):
        alloc.keep_alive()
    assert alloc.lost
    with pytest.raises(errors.AllocationLost):
        alloc.run_container("busybox", ["true"])


def test_handles_from_get_and_list_are_bound(client: Client) -> None:
    made = client.allocate(gpus=1, ttl=30, owner="listed")
    fetched = client.get_allocation(made.id)
    assert fetched == made  # same record
    (listed,) = client.list_allocations(owner="listed")
    assert listed.id == made.id
    with fetched.keepalive():
        assert fetched.keep_alive() > 0
    assert not fetched.released  # keepalive() alone does not release
    # Copied or pickled, a handle is its record (threads and channels do not travel).
    assert dataclasses.asdict(made.info)["id"] == made.id
    copied = pickle.loads(pickle.dumps(made))
    assert type(copied) is AllocationInfo and copied.to_dict() == made.to_dict()
    assert listed.release() is True
    assert harness.free_gpus(client) == NODE_GPUS


# --- keepalive and lease loss -----------------------------------------------------------------


@pytest.mark.slow
def test_keepalive_keeps_a_short_lease_alive(client: Client) -> None:
    unattended = client.allocate(gpus=1, ttl=5)
    with client.allocate(gpus=1, ttl=5) as kept:
        time.sleep(8)
        assert not kept.lost
        assert client.get_allocation(kept.id).id == kept.id
        # The control: the same TTL without a keepalive has expired by now.
        with pytest.raises(errors.AllocationNotFound):
            client.get_allocation(unattended.id)
    assert harness.free_gpus(client) == NODE_GPUS


@pytest.mark.slow
def test_lost_when_released_behind_its_back(address: str, client: Client) -> None:
    with client.allocate(gpus=2, ttl=6) as alloc:
        with Client(address, timeout=5) as other:
            assert other.release(alloc.id) is True
        # Found out at the next renewal (every ttl/3 = 2 s), within the TTL in any case.
        assert wait_for(lambda: alloc.lost, 6, "the handle to notice") <= 6
        assert alloc.lost_reason and "no longer knows it" in alloc.lost_reason
        with pytest.raises(errors.AllocationLost, match="lost at"):
            alloc.run_container("busybox", ["true"])
        with pytest.raises(errors.AllocationLost):
            alloc.keep_alive()
        handle = ContainerHandle(alloc, _container(alloc.id))
        for use in (handle.wait, handle.stop, lambda: list(handle.logs())):
            with pytest.raises(errors.AllocationLost):
                use()
    # Leaving the block neither raises nor hangs; the allocation is gone either way.
    assert harness.free_gpus(client) == NODE_GPUS


@pytest.mark.slow
def test_lost_when_the_coordinator_is_gone_for_longer_than_the_ttl(coordinator: harness.Coordinator,
                                                                  address: str) -> None:  # fmt: skip
    ttl = 5
    with Client(address, timeout=1) as client, client.allocate(gpus=1, ttl=ttl) as alloc:
        time.sleep(0.5)  # the first renewal is done
        stopping = time.monotonic()
        coordinator.proc.stop()
        stopped = time.monotonic()
        wait_for(lambda: alloc.lost, ttl + 5, "the lease to be declared lost")
        lost_at = time.monotonic()
        # The last renewal was at most ttl/3 before the stop began, and not after it ended: lost
        # once the TTL has run out since then.
        assert lost_at - stopping >= ttl - ttl / 3 - 0.5, (stopping, stopped, lost_at)
        assert lost_at - stopped <= ttl + 2, (stopping, stopped, lost_at)
        assert alloc.lost_reason and f"longer than its {ttl}s TTL" in alloc.lost_reason
        with pytest.raises(errors.AllocationLost, match="lost at"):
            alloc.keep_alive()
        started = time.monotonic()
    # The release in __exit__ failed (no coordinator) without raising, within its bounded budget.
    assert time.monotonic() - started < 5


# --- UNAVAILABLE: failover, bounded retries, idempotent Allocate --------------------------------


def test_fails_over_from_a_dead_address(address: str) -> None:
    with Client([dead_address(), address], timeout=5) as client:
        with client.allocate(gpus=1, ttl=30) as alloc:
            assert alloc.node == "n1"
        assert harness.free_gpus(client) == NODE_GPUS


def test_only_dead_addresses_raise_unavailable_after_a_bounded_backoff() -> None:
    dead = dead_address()
    with Client(dead, timeout=1, retry_deadline=2) as client:
        started = time.monotonic()
        with pytest.raises(errors.Unavailable) as info:
            client.allocate(gpus=1, ttl=30)
        took = time.monotonic() - started
    # Retried (not a single attempt), and gave up at the deadline.
    assert 1.5 <= took <= 4, took
    assert dead in info.value.message


def test_the_same_request_id_allocates_once(client: Client) -> None:
    first = client.allocate(gpus=2, ttl=30, request_id="lifecycle-req-1", owner="idem")
    again = client.allocate(gpus=2, ttl=30, request_id="lifecycle-req-1", owner="idem")
    assert again.id == first.id and again.request_id == "lifecycle-req-1"
    assert len(client.list_allocations(owner="idem")) == 1
    assert harness.free_gpus(client) == NODE_GPUS - 2
    assert first.release() is True
    assert again.release() is False  # already released through the other handle


def test_retry_plan_backs_off_with_jitter_until_the_deadline() -> None:
    now = [0.0]
    plan = RetryPlan(["a:1", "b:1"], 1, timeout=1.0, retry_deadline=3.0, clock=lambda: now[0], jitter=lambda: 1.0)
    attempts = []
    for attempt in plan.attempts():
        now[0] += attempt.delay + 0.01  # each attempt fails at once
        attempts.append(attempt)
    # Every target once, starting at the one that answered last; then rounds with growing pauses.
    assert [a.target for a in attempts[:4]] == ["b:1", "a:1", "b:1", "a:1"]
    assert [a.delay for a in attempts[:2]] == [0.0, 0.05]
    firsts = [a.delay for a in attempts if a.round and a.target == "b:1"]
    assert firsts[:4] == pytest.approx([0.1, 0.2, 0.4, 0.8])
    assert all(0 < (a.timeout or 0) <= 1.0 for a in attempts)
    assert 3.0 - 0.3 <= now[0] <= 3.0 + 0.05  # a last attempt just before the deadline, none after
    # Jitter: the pause before round n is random in [cap/2, cap].
    low = RetryPlan(["a:1"], 0, timeout=1.0, retry_deadline=1.0, jitter=lambda: 0.0)
    assert low.backoff(1) == pytest.approx(0.05) and low.backoff(10) == pytest.approx(1.0)


class RunFake(coordinator_pb2_grpc.CoordinatorServiceServicer):
    """RunContainer only: counts the calls that reached it; aborts with ``fail`` when set."""

    def __init__(self, fail: tuple[grpc.StatusCode, str | None, str] | None = None) -> None:
        self.fail = fail
        self.runs = 0

    def RunContainer(self, request: pb.RunContainerRequest, context: grpc.ServicerContext) -> tpb.ContainerStatus:
        self.runs += 1
        if self.fail is not None:
            code, reason, details = self.fail
            if reason is not None:
                context.set_trailing_metadata(((errors.REASON_METADATA_KEY, reason),))
            context.abort(code, details)
        return tpb.ContainerStatus(container_id="c1", allocation_id=request.allocation_id,
                                   state=tpb.CONTAINER_STATE_RUNNING)  # fmt: skip


def test_run_container_is_resent_only_when_it_never_reached_a_coordinator(serve_fake: harness.ServeFake) -> None:
    live = RunFake()
    with Client([dead_address(), serve_fake(live)], timeout=5, retry_deadline=5) as client:
        assert client.run_container("a1", "busybox", ["true"]).id == "c1"
    assert live.runs == 1

    # UNAVAILABLE without the coordinator's reason, after the call went out (like a connection that
    # broke mid-call): the outcome is unknown, so it is not sent to the next coordinator.
    broken, spare = RunFake(fail=(grpc.StatusCode.UNAVAILABLE, None, "Socket closed")), RunFake()
    with Client([serve_fake(broken), serve_fake(spare)], timeout=5, retry_deadline=5) as client:
        with pytest.raises(errors.Unavailable, match="may or may not have taken effect"):
            client.run_container("a1", "busybox", ["true"])
        assert (broken.runs, spare.runs) == (1, 0)
        # An idempotent call in the same situation moves on (ListContainers is not implemented by
        # the fake, so reaching it shows as UNIMPLEMENTED -> Internal).
        with pytest.raises(errors.Internal):
            client.list_containers("a1")

    # The coordinator's own UNAVAILABLE (its agent did not answer): its words, not resent either.
    agent_down = RunFake(fail=(grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE", "the agent of node n1 did not answer"))
    spare = RunFake()
    with (
        Client([serve_fake(agent_down), serve_fake(spare)], timeout=5, retry_deadline=5) as client,
        pytest.raises(errors.Unavailable, match="agent of node n1"),
    ):
        client.run_container("a1", "busybox", ["true"])
    assert (agent_down.runs, spare.runs) == (1, 0)


@pytest.mark.slow
def test_retries_ride_out_a_coordinator_restart(local_cluster: LocalCluster) -> None:
    port = procs.free_port()
    address = local_cluster.add_coordinator(port).address
    with Client(address, timeout=2, retry_deadline=30) as client:
        with grpc.insecure_channel(address) as channel:
            stub = harness.AnyService(channel)
            harness.register(stub, "n1", gpus=NODE_GPUS)
            harness.wait_nodes_up(stub, {"n1"})
        with client.allocate(gpus=1, ttl=10) as kept:
            local_cluster.stop_coordinator(address)
            # Restarted in place, on the same address.
            restarter = threading.Timer(2.0, lambda: local_cluster.add_coordinator(port))
            restarter.start()
            try:
                # Sent while the coordinator is down: retried until it is back.
                alloc = client.allocate(gpus=1, ttl=30, request_id="restart-req")
            finally:
                restarter.join(30)
            assert client.allocate(gpus=1, ttl=30, request_id="restart-req").id == alloc.id
            assert alloc.release() is True
            # The keepalive thread rode it out too (down ~2-3 s, TTL 10 s).
            time.sleep(1)
            assert not kept.lost
            assert client.get_allocation(kept.id).id == kept.id
        assert harness.free_gpus(client) == NODE_GPUS


# --- containers: argument checks and error mapping (no container runtime here) ------------------


def _container(allocation_id: str) -> Container:
    return Container(id="c0ffee", allocation_id=allocation_id, revision=1, state="running", exit_code=None,
                     image="busybox", name="c", node="n1", gpu_indexes=(0,))  # fmt: skip


def test_run_container_checks_arguments_before_sending(client: Client) -> None:
    with client.allocate(gpus=1, ttl=30) as alloc:
        with pytest.raises(errors.InvalidRequest, match="list of arguments"):
            alloc.run_container("busybox", "echo hi")
        with pytest.raises(errors.InvalidRequest, match="volume"):
            alloc.run_container("busybox", ["true"], volumes=["/only-one-part"])
        with pytest.raises(errors.InvalidRequest, match="shm_size"):
            alloc.run_container("busybox", ["true"], shm_size="lots")
        with pytest.raises(errors.InvalidRequest, match="timeout"):
            alloc.run_container("busybox", ["true"], timeout=0)
        with pytest.raises(errors.InvalidRequest):
            alloc.run_container("busybox", ["true"], env={"A": 1})  # type: ignore[dict-item]
        handle = ContainerHandle(alloc, _container(alloc.id))
        with pytest.raises(errors.InvalidRequest, match="timeout"):
            handle.wait(timeout=-1)
        with pytest.raises(errors.InvalidRequest, match="grace"):
            handle.stop(grace=-1)


def test_run_container_on_an_unreachable_agent_is_unavailable_and_not_resent(address: str) -> None:
    # The node's registered agent address leads nowhere: the coordinator answers UNAVAILABLE. That
    # is not retried for RunContainer (a resend could start a second container), so it is quick.
    with Client(address, timeout=5, retry_deadline=20) as client, client.allocate(gpus=1, ttl=30) as alloc:
        started = time.monotonic()
        with pytest.raises(errors.Unavailable, match="agent"):
            alloc.run_container("busybox", ["true"])
        assert time.monotonic() - started < 5
        assert not alloc.lost


def test_run_container_on_an_unknown_allocation_maps_to_allocation_not_found(client: Client) -> None:
    with pytest.raises(errors.AllocationNotFound):
        client.run_container("a" * 32, "busybox", ["true"])
