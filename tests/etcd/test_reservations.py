"""Calendar reservations (issue 15, section 6) on the real etcd:

- team-b's reservation of 4 GPUs on a 4-GPU node refuses team-a's request with the reservation as its
  reason ('reserved for team-b until HH:MM:SS UTC') while team-b's request is placed on it;
- before its window, team-a is placed;
- a reservation created between a placement and its commit fails the commit (the reservations/
  range compare), and the request, placed again, is refused with the reservation as its reason;
- gpuctl reservation create / list / delete through a real coordinator, with JSON and exit codes,
  and the refusals (end before start, a window in the past, more GPUs than the nodes have).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

import pytest

from gpulease.common.identity import Kind, Principal, Role
from gpulease.coordinator.allocations import AllocateInput
from gpulease.coordinator.audit import AuditLog, AuditPolicy
from gpulease.coordinator.policies import Policies
from gpulease.errors import InsufficientResources
from tests.support import gpuctl, harness
from tests.support.inproc import Core, core, node_info

GiB = 2**30
HOUR_MS = 3_600_000
ADMIN = Principal(Kind.USER, "root", Role.ADMIN, "ops")
REASON = re.compile(r"reserved for team-b until \d\d:\d\d:\d\d UTC \(reservation train: 4 GPUs on n1\)")


def policies(c: Core) -> Policies:
    return Policies(c.store, c.keys, c.view, AuditLog(c.store, c.keys, AuditPolicy(3600, 1000)))


def ask(gpus: int, tenant: str, **kw: object) -> AllocateInput:
    return AllocateInput(gpus=gpus, cpus=1, memory_bytes=GiB, tenant=tenant, principal=f"user:{tenant}-user",
                         **kw)  # type: ignore[arg-type]  # fmt: skip


def now_ms() -> int:
    return int(time.time() * 1000)


async def test_a_reservation_keeps_other_tenants_off_and_lets_its_tenant_on(etcd: harness.Etcd,
                                                                            prefix: str) -> None:  # fmt: skip
    async with core([etcd.url], prefix) as c:
        await c.nodes.register(node_info("n1", gpus=4, cpus=16))
        r = await policies(c).create_reservation(ADMIN, "train", "team-b", 4, [], "", 0, now_ms() + HOUR_MS)
        assert dict(r.gpus) == {"n1": 4}, "the coordinator chose the node and recorded the count"
        with pytest.raises(InsufficientResources, match=REASON):
            await c.allocations.allocate(ask(1, "team-a"))
        mine, _ = await c.allocations.allocate(ask(4, "team-b"))
        assert mine.node == "n1" and len(mine.gpus) == 4
        audit = [k for k in await c.keys_under("audit") if "reservation" not in k]
        assert audit, "the allocation is audited"
        assert await policies(c).delete_reservation(ADMIN, "train") is True
        assert await policies(c).delete_reservation(ADMIN, "train") is False
        assert await c.keys_under("reservations") == []


async def test_before_its_window_a_reservation_withholds_nothing(etcd: harness.Etcd, prefix: str) -> None:
    async with core([etcd.url], prefix) as c:
        await c.nodes.register(node_info("n1", gpus=4, cpus=16))
        start = now_ms() + HOUR_MS
        await policies(c).create_reservation(ADMIN, "train", "team-b", 4, ["n1"], "", start, start + HOUR_MS)
        placed, _ = await c.allocations.allocate(ask(4, "team-a"))
        assert placed.node == "n1"


async def test_a_reservation_written_between_placement_and_commit_fails_the_commit(etcd: harness.Etcd,
                                                                                   prefix: str) -> None:  # fmt: skip
    async with core([etcd.url], prefix) as c:
        await c.nodes.register(node_info("n1", gpus=4, cpus=16))
        gate, held = asyncio.Event(), asyncio.Event()

        async def hold_first(n: int) -> None:
            if n == 1:
                held.set()
                await gate.wait()

        c.committer.before = hold_first
        pending = asyncio.create_task(c.allocations.allocate(ask(1, "team-a", request_id="late")))
        await asyncio.wait_for(held.wait(), 5)  # placed on n1, with no reservation; not committed yet
        await policies(c).create_reservation(ADMIN, "train", "team-b", 4, ["n1"], "", 0, now_ms() + HOUR_MS)
        gate.set()
        with pytest.raises(InsufficientResources, match=REASON):
            await pending
        # Its transaction was rejected; placed again on the newer view, it fit nowhere (nothing more to commit).
        assert (c.allocations.batcher.rejections, c.committer.commits) == (1, 1)
        assert await c.keys_under("allocs") == []


def test_gpuctl_reservation_create_list_delete(start_coordinator: Callable[..., harness.Coordinator]) -> None:
    c = start_coordinator()
    harness.register(c.stub, "n1", gpus=4, cpus=16)
    harness.wait_nodes_up(c.stub, {"n1"})
    base = ["--coordinator", c.address]
    small = ["--cpus", "1", "--memory", "1MiB"]

    made = gpuctl.run([*base, "reservation", "create", "train", "--tenant", "team-b", "--gpus", "4", "--end", "+2h",
                       "--json"])  # fmt: skip
    assert made.rc == 0, made
    r = made.json()
    assert (r["name"], r["tenant"], r["gpus"], r["nodes"], r["active"]) == ("train", "team-b", 4, {"n1": 4}, True)
    assert 2 * HOUR_MS - 60_000 < r["end_unix_ms"] - r["start_unix_ms"] <= 2 * HOUR_MS
    listed = gpuctl.run([*base, "reservation", "list", "--json"])
    assert listed.rc == 0 and [x["name"] for x in listed.json()] == ["train"], listed
    table = gpuctl.run([*base, "reservation"])
    assert table.rc == 0 and "train" in table.stdout and "n1:4" in table.stdout, table

    refused = gpuctl.run([*base, "allocate", "--gpus", "1", *small, "--tenant", "team-a"])
    assert refused.rc == 1 and REASON.search(refused.stderr), refused
    assert gpuctl.run([*base, "allocate", "--gpus", "4", *small, "--tenant", "team-b", "--json"]).rc == 0

    for argv, message in [
        (["--end", "2020-01-01T00:00Z", "--start", "2019-01-01T00:00Z"], "the window ended already"),
        (["--start", "+2h", "--end", "+1h"], "--end must be after --start"),
        (["--start", "+3h", "--end", "+4h", "--nodes", "n1", "--gpus", "5"], "the named node(s) n1 have 4 GPUs;"),
        (["--end", "+1h", "--nodes", "n1"], "n1 have 0 GPUs not reserved in that window"),  # train holds them
        (["--end", "tomorrow"], "cannot parse time 'tomorrow'"),
    ]:
        gpus = [] if "--gpus" in argv else ["--gpus", "1"]
        bad = gpuctl.run([*base, "reservation", "create", "other", "--tenant", "team-c", *gpus, *argv])
        assert bad.rc in (1, 2) and message in bad.stderr, bad

    deleted = gpuctl.run([*base, "reservation", "delete", "train", "--json"])
    assert deleted.rc == 0 and deleted.json() == {"name": "train", "deleted": True}, deleted
    again = gpuctl.run([*base, "reservation", "delete", "train"])
    assert again.rc == 0 and "nothing to do" in again.stdout, again
    assert gpuctl.run([*base, "reservation", "list", "--json"]).json() == []
