"""The commit loop in isolation: a fake committer that rejects commits drives the retry path."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from gpulease.coordinator.batcher import Batcher, BatchPolicy
from gpulease.coordinator.committer import Rejected
from gpulease.coordinator.domain import Allocation, ResourceRequest
from gpulease.coordinator.store import LeaseNotFound, OutcomeUnknown
from gpulease.errors import Conflict, InsufficientResources, InvalidRequest, Unavailable
from tests.support.batcher_fakes import (
    ONE,
    FakeCommitter,
    FakeSource,
    claim_as_is,
    draft,
    never_committed,
    no_lookup,
    node,
)


async def run_batch(batcher: Batcher, requests: list[tuple[ResourceRequest, Allocation]]) -> list[object]:
    task = asyncio.create_task(batcher.run())
    try:
        futs = [batcher.submit(r, d) for r, d in requests]
        return list(await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 5))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def make(source: FakeSource, committer: FakeCommitter, max_rounds: int = 5, **lookups) -> Batcher:  # type: ignore[no-untyped-def]
    return Batcher(source, committer, by_request_id=lookups.get("by_request_id", no_lookup),
                   by_id=lookups.get("by_id", no_lookup), claim=lookups.get("claim", claim_as_is),
                   decide=lookups.get("decide", never_committed),
                   policy=BatchPolicy(max_rounds=max_rounds))  # fmt: skip


@pytest.mark.parametrize(
    ("rejections", "max_rounds", "commits"),
    [(0, 5, 1), (1, 5, 2), (4, 5, 5)],
    ids=["first-try", "one-rejection", "rejected-until-last-round"],
)
async def test_rejected_commits_are_retried_after_catching_up(rejections: int, max_rounds: int, commits: int) -> None:
    source, committer = FakeSource(node("a")), FakeCommitter(reject=rejections)
    [(alloc, reused)] = await run_batch(make(source, committer, max_rounds), [(ONE, draft(1))])  # type: ignore[misc]
    assert not reused and alloc.node == "a" and alloc.revision == 101 and [g.index for g in alloc.gpus] == [0]
    assert len(committer.batches) == commits
    # Each rejection waits for the view to reach the revision the commit tripped on.
    assert source.waited[:rejections] == [42] * rejections


async def test_gives_up_with_conflict_after_max_rounds() -> None:
    committer = FakeCommitter(reject=99)
    [err] = await run_batch(make(FakeSource(node("a")), committer, max_rounds=3), [(ONE, draft(1))])
    assert isinstance(err, Conflict) and "3 conflicting commits" in str(err)
    assert len(committer.batches) == 3


async def test_concurrent_requests_share_one_transaction_without_overlap() -> None:
    committer = FakeCommitter()
    reqs = [(ONE, draft(i)) for i in range(6)]
    results = await run_batch(make(FakeSource(node("a", 4), node("b", 4)), committer), reqs)
    gpus = [(a.node, g.index) for a, _ in results for g in a.gpus]  # type: ignore[union-attr]
    assert len(gpus) == 6 and len(set(gpus)) == 6
    assert len(committer.batches) == 1 and len(committer.batches[0]) == 6


async def test_batch_members_that_do_not_fit_fail_alone() -> None:
    committer = FakeCommitter()
    big = ResourceRequest(gpus=3, cpus=1, memory_bytes=1)
    results = await run_batch(make(FakeSource(node("a", 4)), committer), [(big, draft(1)), (big, draft(2))])
    assert results[0][0].node == "a"  # type: ignore[index]
    assert isinstance(results[1], InsufficientResources)


async def test_taken_request_id_returns_the_existing_allocation() -> None:
    existing = replace(draft(7, "same"), node="a", revision=5)

    async def by_id(alloc_id: str) -> Allocation | None:
        return existing if alloc_id == existing.id else None

    committer = FakeCommitter(reject=1, rejection=Rejected(revision=6, taken={"same": existing.id}))
    [(alloc, reused)] = await run_batch(make(FakeSource(node("a")), committer, by_id=by_id),
                                        [(ONE, draft(1, "same"))])  # type: ignore[misc]  # fmt: skip
    assert reused and alloc == existing and len(committer.batches) == 1


async def test_unusable_node_is_excluded_on_retry() -> None:
    committer = FakeCommitter(reject=1, rejection=Rejected(revision=6, unusable=frozenset({"a"})))
    # "a" is the best fit (fewer GPUs) but etcd says it is down: the retry must go to "b".
    [(alloc, _)] = await run_batch(make(FakeSource(node("a", 2), node("b", 8)), committer), [(ONE, draft(1))])  # type: ignore[misc]
    assert [i.placement.node for b in committer.batches for i in b] == ["a", "b"] and alloc.node == "b"


async def test_node_lost_in_a_commit_race_is_avoided_on_retry() -> None:
    # "a" is the best fit, but another replica's commit got there first: go to "b" rather than
    # race for "a" again (best fit would send every replica back to it).
    committer = FakeCommitter(reject=1, rejection=Rejected(revision=6, conflicted=frozenset({"a"})))
    [(alloc, _)] = await run_batch(make(FakeSource(node("a", 2), node("b", 8)), committer), [(ONE, draft(1))])  # type: ignore[misc]
    assert [i.placement.node for b in committer.batches for i in b] == ["a", "b"] and alloc.node == "b"


async def test_a_lost_race_does_not_stop_a_request_that_only_fits_there() -> None:
    committer = FakeCommitter(reject=1, rejection=Rejected(revision=6, conflicted=frozenset({"a"})))
    # "b" has every GPU held: "a" is avoided only while something else fits, so the retry is "a".
    source = FakeSource(node("a", 2), node("b", 8, held=frozenset(range(8))))
    [(alloc, _)] = await run_batch(make(source, committer), [(ONE, draft(1))])  # type: ignore[misc]
    assert [i.placement.node for b in committer.batches for i in b] == ["a", "a"] and alloc.node == "a"


async def test_contested_node_is_avoided_by_later_requests_for_a_while() -> None:
    committer = FakeCommitter(reject=1, rejection=Rejected(revision=6, conflicted=frozenset({"a"})))
    batcher = Batcher(FakeSource(node("a", 2), node("b", 8)), committer, by_request_id=no_lookup, by_id=no_lookup,
                      claim=claim_as_is, decide=never_committed,
                      policy=BatchPolicy(max_rounds=5, contested_for=0.3))  # fmt: skip
    task = asyncio.create_task(batcher.run())
    try:
        await asyncio.wait_for(batcher.submit(ONE, draft(1)), 5)
        fresh = await asyncio.wait_for(batcher.submit(ONE, draft(2)), 5)  # a new request, never rejected
        await asyncio.sleep(0.4)
        later = await asyncio.wait_for(batcher.submit(ONE, draft(3)), 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert fresh[0].node == "b"  # the lost race still steers new requests away from "a"...
    assert later[0].node == "a"  # ...until contested_for has passed: best fit again


async def test_duplicate_request_ids_in_one_batch_never_share_a_txn() -> None:
    committer = FakeCommitter()
    await run_batch(make(FakeSource(node("a")), committer), [(ONE, draft(1, "dup")), (ONE, draft(2, "dup"))])
    assert all(len({i.draft.request_id for i in b}) == len(b) for b in committer.batches)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [(OutcomeUnknown("etcd went away"), Unavailable), (LeaseNotFound("lease gone"), Conflict)],
    ids=["unknown-outcome", "lease-expired"],
)
async def test_commit_errors_fail_the_batch_cleanly(exc: Exception, expected: type[Exception]) -> None:
    results = await run_batch(
        make(FakeSource(node("a")), FakeCommitter(raise_=exc)), [(ONE, draft(1)), (ONE, draft(2))]
    )
    assert all(isinstance(r, expected) for r in results)


async def test_unknown_outcome_that_did_commit_is_reported_as_committed() -> None:
    mine = replace(draft(1), node="a", revision=9)

    async def decide(d: Allocation) -> Allocation | None:
        return mine if d.request_id == mine.request_id else None

    committer = FakeCommitter(raise_=OutcomeUnknown("timeout"))
    [(alloc, reused)] = await run_batch(make(FakeSource(node("a")), committer, decide=decide),
                                        [(ONE, draft(1))])  # type: ignore[misc]  # fmt: skip
    assert alloc == mine and not reused


async def test_oversized_request_is_refused_not_wedged() -> None:
    huge = ResourceRequest(gpus=200, cpus=1, memory_bytes=1)
    [err] = await run_batch(make(FakeSource(node("a", 256)), FakeCommitter()), [(huge, draft(1))])
    assert isinstance(err, InvalidRequest) and "max-txn-ops" in str(err)


def test_the_per_commit_invariant_check_catches_what_placement_must_never_do() -> None:
    from gpulease.coordinator.batch_placement import check_batch
    from gpulease.coordinator.domain import Placement

    snap = FakeSource(node("a", 4, held=frozenset({0}))).snap
    one = ResourceRequest(gpus=1, cpus=32, memory_bytes=1)
    check_batch(snap, [(Placement("a", (1,), 1, 10), one), (Placement("a", (2,), 1, 10), one)])  # 64 of 64 CPUs
    for bad in (
        [(Placement("a", (0,), 1, 10), one)],  # a held GPU
        [(Placement("a", (1,), 1, 10), one), (Placement("a", (1,), 1, 10), one)],  # one GPU twice
        [(Placement("a", (i,), 1, 10), one) for i in (1, 2, 3)],  # 96 of 64 CPUs
    ):
        with pytest.raises(AssertionError):
            check_batch(snap, bad)


async def test_members_after_an_overflow_wait_a_round_and_take_nothing() -> None:
    """Members that would push the txn past max_txn_ops wait, and so does every later member: they
    were placed on an overlay that counted the overflowing one, so none of their results holds."""
    committer = FakeCommitter()
    big = ResourceRequest(gpus=6, cpus=1, memory_bytes=1)
    batcher = Batcher(FakeSource(node("a", 8), node("b", 8)), committer, by_request_id=no_lookup, by_id=no_lookup,
                      claim=claim_as_is, decide=never_committed, policy=BatchPolicy(max_txn_ops=16))  # fmt: skip
    task = asyncio.create_task(batcher.run())
    try:
        futs = [batcher.submit(big, draft(1)), batcher.submit(big, draft(2)), batcher.submit(ONE, draft(3))]
        results = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert all(not isinstance(r, BaseException) for r in results)
    # The 2nd member overflows the first txn: it and the 3rd (which would have fitted) wait a round.
    assert [[i.draft.id for i in b] for b in committer.batches] == [[draft(1).id], [draft(2).id, draft(3).id]]
