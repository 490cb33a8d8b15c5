"""A gang as the coordinator stores it and the client hands it out: members in the record (and
records without them read as one member), every member's keys, the view from one member node, the
transaction's size, and run_gang's environment. Pure functions, no etcd."""

from __future__ import annotations

import json

import pytest

from gpulease.client.models import AllocatedGpu as ClientGpu
from gpulease.client.models import AllocationInfo, AllocationMember, gang_envs
from gpulease.coordinator.committer import Item, gang_txn_size, txn_size
from gpulease.coordinator.domain import AllocatedGpu, Allocation, Member, Placement
from gpulease.coordinator.keys import Keys
from gpulease.coordinator.records import decode_alloc, encode_alloc


def _gpus(node: str, n: int) -> tuple[AllocatedGpu, ...]:
    return tuple(AllocatedGpu(i, f"GPU-{node}-{i}", "H100") for i in range(n))


GANG = Allocation(
    id="0190abcdef0123456789", node="n1", gpus=_gpus("n1", 2), cpus=4, memory_bytes=8, ttl_seconds=60, lease_id=7,
    revision=0, request_id="user:a/r1", tenant="ml",
    gang=(Member("n1", _gpus("n1", 2), 4, 8), Member("n2", _gpus("n2", 2), 4, 8)),
)  # fmt: skip


def test_a_gang_record_round_trips_and_an_old_record_is_one_member() -> None:
    back = decode_alloc(encode_alloc(GANG), 5)
    assert back.members == GANG.members and back.revision == 5 and back.is_gang
    one = Allocation(**{**GANG.__dict__, "gang": ()})
    raw = encode_alloc(one)
    assert "members" not in json.loads(raw)  # records of one node are unchanged
    back = decode_alloc(raw, 5)
    assert back.members == (Member("n1", _gpus("n1", 2), 4, 8),) and not back.is_gang


def test_on_a_member_node_and_usage_over_members() -> None:
    seen = GANG.on("n2")
    assert (seen.node, seen.gpus, seen.id, seen.members) == ("n2", _gpus("n2", 2), GANG.id, GANG.members)
    with pytest.raises(KeyError):
        GANG.on("n3")
    assert (GANG.usage.gpus, GANG.usage.cpus, GANG.usage.memory_bytes) == (4, 8, 16)


def test_every_members_keys_are_the_allocations() -> None:
    k = Keys("/p/")
    keys = k.of_allocation(GANG)
    gpus = {f"/p/gpus/{n}/GPU-{n}-{i}" for n in ("n1", "n2") for i in range(2)}
    expected = {"/p/allocs/" + GANG.id, "/p/reqs/user:a/r1", "/p/res/n1/" + GANG.id, "/p/res/n2/" + GANG.id,
                "/p/usage/ml/" + GANG.id, *gpus}  # fmt: skip
    assert set(keys) == expected and len(keys) == len(expected)


def test_txn_size_counts_every_member() -> None:
    one = Placement("n0", (0, 1, 2, 3, 4, 5, 6, 7), 1, 1)
    draft = Allocation("x", "", (), 0, 0, 0, 0, 0)
    more = tuple(Placement(f"n{i}", tuple(range(8)), 1, 1) for i in range(1, 16))
    gang = Placement("n0", tuple(range(8)), 1, 1, more)
    # compares: 1 request + 128 GPUs + 5 per node x 16 nodes (res/ and drain/ ranges, record, alive,
    # cordoned) + the reservations/ range
    assert txn_size([Item(gang, draft)]) == 1 + 128 + 80 + 1
    assert txn_size([Item(one, draft)]) == 1 + 8 + 5 + 1
    assert gang_txn_size(16, 8) == 1 + 128 + 80 + 1 + 2 + 1 + 1  # as an admission, with a tenant


def test_run_gang_environment_per_member() -> None:
    members = tuple(AllocationMember(n, (ClientGpu(0, f"GPU-{n}", "H100"),), 1, 1, f"10.0.0.{i}:50052")
                    for i, n in enumerate(("n1", "n2", "n3")))  # fmt: skip
    info = AllocationInfo("a", "n1", members[0].gpus, 1, 1, 60, 3, "", "r", 0, "10.0.0.0:50052", members=members)
    envs = gang_envs(info, {"X": "1"})
    assert [node for node, _ in envs] == ["n1", "n2", "n3"]
    for rank, (_, env) in enumerate(envs):
        assert env == {"X": "1", "RANK": str(rank), "WORLD_SIZE": "3", "MASTER_ADDR": "10.0.0.0",
                       "GPULEASE_PEERS": "10.0.0.0:50052,10.0.0.1:50052,10.0.0.2:50052"}  # fmt: skip
    single = AllocationInfo("a", "n1", (), 1, 1, 60, 3, "", "r", 0, "[::1]:50052")
    assert gang_envs(single, None) == [("n1", {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "::1",
                                               "GPULEASE_PEERS": "[::1]:50052"})]  # fmt: skip
