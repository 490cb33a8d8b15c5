"""Tenant quotas (issue 15, section 2) on the real etcd, with the interleavings forced by hooks.

- two replicas that both judged "3 of 4 used" from the same revision cannot both commit: the
  second transaction fails its compare on usage/<tenant>/ and, re-placed on the newer view, is
  refused with the quota as its reason;
- a quota written between a placement and its commit fails the commit (quotas/<tenant> compare);
- per-model quotas, CPU caps, the default quota "*", borrowing, the never-fits refusal;
- a pending request over quota waits with the quota as its reason, does not block its pool, and
  is admitted when its tenant frees GPUs;
- the lifetime limit stops KeepAlive; naming another tenant is an admin's privilege.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from gpulease.common.identity import Kind, Principal, Role
from gpulease.coordinator import authz
from gpulease.coordinator.allocations import AllocateInput
from gpulease.coordinator.audit import AuditLog, AuditPolicy
from gpulease.coordinator.domain import GpuInfo, NodeInfo
from gpulease.coordinator.policies import Policies
from gpulease.coordinator.quota import Quota
from gpulease.errors import LifetimeReached, PermissionDenied, QuotaExceeded, Unsatisfiable
from gpulease.v1 import coordinator_pb2 as pb
from tests.support import harness
from tests.support.inproc import Core, core, node_info, until

GiB = 2**30
ADMIN = Principal(Kind.USER, "root", Role.ADMIN, "ops")


def policies(c: Core) -> Policies:
    return Policies(c.store, c.keys, c.view, AuditLog(c.store, c.keys, AuditPolicy(3600, 1000)))


def ask(gpus: int = 1, tenant: str = "team-a", **kw: object) -> AllocateInput:
    return AllocateInput(gpus=gpus, cpus=1, memory_bytes=GiB, tenant=tenant, principal=f"user:{tenant}-user",
                         **kw)  # type: ignore[arg-type]  # fmt: skip


async def usage_keys(c: Core, tenant: str) -> list[str]:
    return [k for k in await c.keys_under("usage") if k.startswith(f"{tenant}/")]


async def test_two_replicas_judging_the_same_usage_cannot_both_take_the_last_gpu(etcd: harness.Etcd,
                                                                                  prefix: str) -> None:  # fmt: skip
    async with core([etcd.url], prefix) as a, core([etcd.url], prefix) as b:
        await a.nodes.register(node_info("n1", gpus=8, cpus=16))
        await policies(a).set_quota(ADMIN, "team-a", Quota(gpus=4))
        for _ in range(3):
            await a.allocations.allocate(ask())
        rev = await a.store.put(f"{prefix}sync", b"")
        assert await a.view.wait_for_revision(rev, 5) and await b.view.wait_for_revision(rev, 5)
        assert a.view.quota_book().usage_of("team-a").gpus == 3 == b.view.quota_book().usage_of("team-a").gpus

        # Replica A places its request on "3 of 4" and is held before its commit; replica B, which
        # also sees "3 of 4", commits meanwhile. A's commit must fail, not take a 5th GPU.
        gate, held = asyncio.Event(), asyncio.Event()

        async def hold_once(n: int) -> None:
            if not held.is_set():
                held.set()
                await gate.wait()

        a.committer.before = hold_once
        first = asyncio.create_task(a.allocations.allocate(ask(request_id="from-a")))
        await asyncio.wait_for(held.wait(), 5)
        assert a.view.quota_book().usage_of("team-a").gpus == 3  # A placed on the old usage
        winner, _ = await b.allocations.allocate(ask(request_id="from-b"))
        gate.set()
        with pytest.raises(QuotaExceeded, match=r"quota: team-a uses 4 of 4 GPUs \(asks for 1\)"):
            await first
        assert a.committer.commits >= 2, "A's first transaction was rejected, then re-judged on the newer view"
        assert len(await usage_keys(a, "team-a")) == 4
        assert winner.tenant == "team-a"


async def test_a_quota_written_between_placement_and_commit_fails_the_commit(etcd: harness.Etcd,
                                                                             prefix: str) -> None:  # fmt: skip
    async with core([etcd.url], prefix) as c:
        await c.nodes.register(node_info("n1", gpus=8, cpus=16))
        await c.allocations.allocate(ask(gpus=2))
        gate, held = asyncio.Event(), asyncio.Event()

        async def hold_first(n: int) -> None:
            if n == 2:  # the first was the allocation above
                held.set()
                await gate.wait()

        c.committer.before = hold_first
        pending = asyncio.create_task(c.allocations.allocate(ask(gpus=2, request_id="late")))
        await asyncio.wait_for(held.wait(), 5)
        await policies(c).set_quota(ADMIN, "team-a", Quota(gpus=3))  # no quota when it was placed
        gate.set()
        with pytest.raises(QuotaExceeded, match="quota: team-a uses 2 of 3 GPUs"):
            await pending
        assert len(await usage_keys(c, "team-a")) == 1


async def test_model_cpu_default_and_borrow_limits_name_what_is_full(etcd: harness.Etcd, prefix: str) -> None:
    async with core([etcd.url], prefix) as c:
        gpus = tuple(GpuInfo(i, f"GPU-m-{i}", "A100" if i < 4 else "H100", 80 * GiB) for i in range(8))
        await c.nodes.register(NodeInfo("mixed", "127.0.0.1:1", gpus, 64, 512 * GiB))
        p = policies(c)
        await p.set_quota(ADMIN, "team-a", Quota(gpus=4, models={"A100": 2}, borrow=1, cpus=8))
        await c.allocations.allocate(ask(gpus=2, gpu_model="A100"))
        # 2 of 2 A100 plus 1 borrowable: a third A100 fits, a fourth does not.
        await c.allocations.allocate(ask(gpus=1, gpu_model="A100"))
        with pytest.raises(QuotaExceeded, match=r"quota: team-a uses 3 of 2 \(\+1 borrowable\) A100 \(asks for 1\)"):
            await c.allocations.allocate(ask(gpus=1, gpu_model="A100"))
        # Overall: 3 held of 4 (+1): two more H100s fit, a third does not.
        await c.allocations.allocate(ask(gpus=2, gpu_model="H100"))
        with pytest.raises(QuotaExceeded, match=r"quota: team-a uses 5 of 4 \(\+1 borrowable\) GPUs"):
            await c.allocations.allocate(ask(gpus=1, gpu_model="H100"))
        book = c.view.quota_book()
        assert book.usage_of("team-a").gpus == 5 and book.usage_of("team-a").models == {"A100": 3, "H100": 2}
        # CPU is a hard cap: 3 CPUs held (one per allocation), 6 more exceed 8.
        await p.set_quota(ADMIN, "team-a", Quota(cpus=8))
        with pytest.raises(QuotaExceeded, match=r"quota: team-a uses 3 of 8 CPUs \(asks for 6\)"):
            await c.allocations.allocate(AllocateInput(gpus=1, cpus=6, memory_bytes=GiB, tenant="team-a"))
        # The default quota applies to a tenant with none of its own.
        await p.set_quota(ADMIN, "*", Quota(gpus=1))
        await c.allocations.allocate(ask(tenant="team-b"))
        with pytest.raises(QuotaExceeded, match="quota: team-b uses 1 of 1 GPUs"):
            await c.allocations.allocate(ask(tenant="team-b"))
        # More than the quota allows even with nothing held: refused at once, never queued.
        with pytest.raises(Unsatisfiable, match=r"quota: team-c uses 0 of 1 GPUs .* even with nothing held"):
            await c.allocations.allocate(ask(gpus=2, tenant="team-c"))
        # Removing the tenant's own quota brings the default back; deleting the default lifts all.
        assert await p.delete_quota(ADMIN, "*")
        await c.allocations.allocate(ask(tenant="team-b"))


async def test_a_release_frees_quota_and_an_expiry_does_too(etcd: harness.Etcd, prefix: str) -> None:
    async with core([etcd.url], prefix) as c:
        await c.nodes.register(node_info("n1", gpus=4, cpus=16))
        await policies(c).set_quota(ADMIN, "team-a", Quota(gpus=1))
        first, _ = await c.allocations.allocate(ask(ttl_seconds=5))
        with pytest.raises(QuotaExceeded):
            await c.allocations.allocate(ask())
        await c.allocations.release(first.id)
        second, _ = await c.allocations.allocate(ask(ttl_seconds=5))
        assert await usage_keys(c, "team-a") == [f"team-a/{second.id}"]
        # Its lease lapses (no keepalive): the usage key goes with it, with no coordinator action.
        await until(lambda: c.view.quota_book().usage_of("team-a").gpus == 0, 15, "the expired usage to go")
        await c.allocations.allocate(ask())


async def test_the_lifetime_limit_stops_keepalive_and_says_why(etcd: harness.Etcd, prefix: str) -> None:
    async with core([etcd.url], prefix) as c:
        await c.nodes.register(node_info("n1", gpus=4, cpus=16))
        await policies(c).set_quota(ADMIN, "team-a", Quota(max_lifetime_s=5))
        alloc, _ = await c.allocations.allocate(ask(ttl_seconds=30))
        assert await c.allocations.keep_alive(alloc.id) > 0
        await asyncio.sleep(max(0.0, alloc.created_unix_ms / 1000 + 5.2 - time.time()))
        with pytest.raises(LifetimeReached, match="maximum allocation lifetime of 5s"):
            await c.allocations.keep_alive(alloc.id)


def test_naming_another_tenant_is_for_admins() -> None:
    alice = Principal(Kind.USER, "alice", Role.USER, "team-a")
    assert authz.check_tenant(alice, "") == "team-a"
    assert authz.check_tenant(alice, "team-a") == "team-a"
    with pytest.raises(PermissionDenied, match="rule 'tenant'"):
        authz.check_tenant(alice, "team-b")
    assert authz.check_tenant(ADMIN, "team-b") == "team-b"


def test_a_waiting_request_over_quota_says_so_does_not_block_others_and_starts_when_its_tenant_frees(
    start_coordinator: Callable[..., harness.Coordinator],
) -> None:
    c = start_coordinator(extra=["--queue-ttl", "3s"])
    harness.register(c.stub, "n1", gpus=4, cpus=16)
    harness.wait_nodes_up(c.stub, {"n1"})
    c.stub.SetQuota(pb.SetQuotaRequest(quota=pb.Quota(tenant="team-a", gpus=1)), timeout=10)
    small = {"cpus": 1, "memory_bytes": GiB, "ttl_seconds": 60}
    held = c.stub.Allocate(pb.AllocateRequest(gpus=1, tenant="team-a", **small), timeout=10).allocation
    stream = c.stub.WaitAllocate(pb.AllocateRequest(gpus=1, tenant="team-a", wait_seconds=30, request_id="capped",
                                                    **small), timeout=40)  # fmt: skip
    reasons = []
    for update in stream:  # bounded by the call's timeout
        assert update.WhichOneof("state") == "pending"
        reasons.append(update.pending.reason)
        if update.pending.reason != "waiting for its first queue pass":
            break
    assert reasons[-1] == "quota: team-a uses 1 of 1 GPUs (asks for 1)", reasons
    # Another tenant is not held behind it: there are free GPUs, and the quota is team-a's alone.
    other = c.stub.Allocate(pb.AllocateRequest(gpus=2, tenant="team-b", **small), timeout=10).allocation
    assert other.tenant == "team-b"
    quotas = {t.tenant: t for t in c.stub.ListQuotas(pb.ListQuotasRequest(), timeout=10).tenants}
    assert quotas["team-a"].used_gpus == 1 and quotas["team-a"].pending == 1 and quotas["team-a"].quota.gpus == 1
    assert quotas["team-b"].used_gpus == 2 and not quotas["team-b"].HasField("quota")
    # team-a's own release frees its quota: the waiting request is admitted on the same call.
    c.stub.Release(pb.ReleaseRequest(allocation_id=held.id), timeout=10)
    last = [m for m in stream][-1]
    assert last.WhichOneof("state") == "allocated" and last.allocated.allocation.tenant == "team-a"
