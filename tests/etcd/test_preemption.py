"""Preemption (issue 15, section 3) through real coordinators on the session's etcd.

- a waiting high-priority request preempts a preemptible low-priority allocation: the victim's
  holder is told on KeepAlive (by whom, why, deadline), its lease is revoked at the end of its
  class's grace, the preemptor is admitted on the GPUs it freed, and the audit log says so;
- an allocation that is not preemptible is never chosen: the request keeps waiting, the holder
  keeps its GPUs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc

from gpulease.v1 import coordinator_pb2 as pb
from tests.support import harness

GiB = 2**30
SMALL = {"cpus": 1, "memory_bytes": GiB, "ttl_seconds": 30}


def cluster(start: Callable[..., harness.Coordinator]) -> harness.Coordinator:
    c = start(extra=["--queue-ttl", "3s"])
    harness.register(c.stub, "n1", gpus=2, cpus=16)
    harness.wait_nodes_up(c.stub, {"n1"})
    # A short grace keeps the test quick; the default is 30 s.
    c.stub.SetPriorityClass(pb.SetPriorityClassRequest(priority_class=pb.PriorityClass(
        name="low", value=-100, preemption_grace_seconds=2)), timeout=10)  # fmt: skip
    return c


def live(c: harness.Coordinator, alloc_id: str) -> bool:
    try:
        c.stub.GetAllocation(pb.GetAllocationRequest(allocation_id=alloc_id), timeout=10)
        return True
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
        return False


def test_a_high_priority_request_preempts_a_preemptible_low_one_after_its_grace(
    start_coordinator: Callable[..., harness.Coordinator],
) -> None:
    c = cluster(start_coordinator)
    victim = c.stub.Allocate(pb.AllocateRequest(gpus=2, priority_class="low", preemptible=True, tenant="batch",
                                                **SMALL), timeout=10).allocation  # fmt: skip
    assert victim.preemptible and victim.priority_class == "low"
    assert not c.stub.KeepAlive(pb.KeepAliveRequest(allocation_id=victim.id), timeout=10).HasField("preemption")
    stream = c.stub.WaitAllocate(pb.AllocateRequest(gpus=2, priority_class="high", wait_seconds=30, tenant="research",
                                                    request_id="urgent", **SMALL), timeout=40)  # fmt: skip
    reasons = []
    for update in stream:  # bounded by the call's timeout
        if update.WhichOneof("state") == "allocated":
            break
        reasons.append(update.pending.reason)
        pending_id = update.pending.id
        told = c.stub.KeepAlive(pb.KeepAliveRequest(allocation_id=victim.id), timeout=10)
        if told.HasField("preemption"):
            notice = told.preemption
            assert notice.by == pending_id and notice.cause == "priority"
            assert 0 < notice.deadline_unix_ms - time.time() * 1000 <= 2500
            assert "preempted by request" in notice.reason and "priority 100 over -100" in notice.reason
            record = c.stub.GetAllocation(pb.GetAllocationRequest(allocation_id=victim.id), timeout=10).allocation
            assert (record.preemption.by, record.preemption.cause) == (pending_id, "priority")  # its record says so
    else:
        raise AssertionError(f"the stream ended without an allocation: {reasons}")
    got = update.allocated.allocation
    assert got.node == "n1" and len(got.gpus) == 2 and got.tenant == "research"
    assert any(r.startswith("preempting 1 allocation(s) on n1") for r in reasons), reasons
    assert "notice" in locals(), "the victim was told on KeepAlive before its lease was revoked"
    assert not live(c, victim.id)
    audit = c.stub.ReadAudit(pb.ReadAuditRequest(), timeout=10).entries
    preempts = [e for e in audit if e.action == "preempt"]
    assert [(e.target, e.tenant) for e in preempts] == [(victim.id, "batch")]
    assert f"by={got.id}" in preempts[0].detail and "cause=priority" in preempts[0].detail


def test_an_allocation_that_is_not_preemptible_is_never_chosen(
    start_coordinator: Callable[..., harness.Coordinator],
) -> None:
    c = cluster(start_coordinator)
    holder = c.stub.Allocate(pb.AllocateRequest(gpus=2, priority_class="low", **SMALL), timeout=10).allocation
    stream = c.stub.WaitAllocate(pb.AllocateRequest(gpus=2, priority_class="high", wait_seconds=6, **SMALL),
                                 timeout=15)  # fmt: skip
    reasons = []
    try:
        for update in stream:
            assert update.WhichOneof("state") == "pending", "admitted while a non-preemptible holder held the GPUs"
            reasons.append(update.pending.reason)
        raise AssertionError("the stream ended without an error")
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err  # type: ignore[attr-defined]
    assert not any(r.startswith("preempting") for r in reasons), reasons
    assert live(c, holder.id)
    assert not c.stub.KeepAlive(pb.KeepAliveRequest(allocation_id=holder.id), timeout=10).HasField("preemption")


def test_a_tenant_below_its_nominal_quota_reclaims_gpus_another_tenant_borrowed(
    start_coordinator: Callable[..., harness.Coordinator],
) -> None:
    c = cluster(start_coordinator)
    c.stub.SetQuota(pb.SetQuotaRequest(quota=pb.Quota(tenant="research", gpus=2)), timeout=10)
    c.stub.SetQuota(pb.SetQuotaRequest(quota=pb.Quota(tenant="batch", gpus=0, borrow=2)), timeout=10)
    # Same priority class: only the reclaim rule can choose it.
    borrower = c.stub.Allocate(pb.AllocateRequest(gpus=2, priority_class="low", preemptible=True, tenant="batch",
                                                  **SMALL), timeout=10).allocation  # fmt: skip
    quotas = {t.tenant: t for t in c.stub.ListQuotas(pb.ListQuotasRequest(), timeout=10).tenants}
    assert quotas["batch"].borrowed_gpus == 2
    stream = c.stub.WaitAllocate(pb.AllocateRequest(gpus=2, priority_class="low", wait_seconds=30, tenant="research",
                                                    **SMALL), timeout=40)  # fmt: skip
    causes = set()
    for update in stream:  # bounded by the call's timeout
        if update.WhichOneof("state") == "allocated":
            break
        told = c.stub.KeepAlive(pb.KeepAliveRequest(allocation_id=borrower.id), timeout=10)
        if told.HasField("preemption"):
            causes.add(told.preemption.cause)
            assert "reclaims its quota from batch" in told.preemption.reason
    else:
        raise AssertionError("the stream ended without an allocation")
    assert update.allocated.allocation.tenant == "research"
    assert causes == {"reclaim"}
    assert not live(c, borrower.id)
