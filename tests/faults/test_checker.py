"""The fault suite's checker (tests/faults/history.py) on hand-built histories: each kind of
violation is caught, a clean history passes, and unknown outcomes alone are not violations."""

from __future__ import annotations

from pathlib import Path

from tests.faults.history import History, Op, Violation, check


def alloc(p: str, rid: str, aid: str, gpus: set[str], rev: int, t0: float, t1: float, outcome: str = "ok",
          error: str = "") -> Op:  # fmt: skip
    if outcome != "ok":
        return Op("allocate", p, rid, t0, t1, outcome, error=error)
    return Op("allocate", p, rid, t0, t1, "ok", aid, frozenset(gpus), rev)


def release(p: str, rid: str, aid: str, t0: float, t1: float, rev: int = 0, outcome: str = "ok",
            found: bool = True, error: str = "") -> Op:  # fmt: skip
    return Op("release", p, rid, t0, t1, outcome, aid, revision=rev, found=found, error=error)


def kinds(violations: list[Violation]) -> list[str]:
    return sorted(v.kind for v in violations)


def clean_history() -> list[Op]:
    # c1 holds n/g0 over revisions [10, 12); c2 gets it at 13, after the release; c3 holds n/g1
    # throughout and is still holding it at the final read.
    return [
        alloc("c1", "r1", "a1", {"n/g0"}, 10, 0.0, 0.1),
        Op("keepalive", "c1", "r1", 0.2, 0.3, "ok", "a1", ttl=10),
        release("c1", "r1", "a1", 0.4, 0.5, rev=12),
        alloc("c2", "r2", "a2", {"n/g0"}, 13, 0.45, 0.6),
        release("c2", "r2", "a2", 0.7, 0.8, rev=14),
        alloc("c3", "r3", "a3", {"n/g1"}, 11, 0.0, 0.2),
    ]


def test_clean_history_passes() -> None:
    assert check(clean_history(), final_allocations={"a3": frozenset({"n/g1"})}, quiet_leaked={}) == []


def test_overlap_by_revision_is_caught() -> None:
    ops = clean_history()
    # a2 committed at 11, before a1's deletion at 12.
    ops[3] = alloc("c2", "r2", "a2", {"n/g0"}, 11, 0.05, 0.15)
    violations = check(ops, final_allocations={"a3": frozenset({"n/g1"})})
    assert kinds(violations) == ["overlap"], violations
    assert "n/g0" in violations[0].detail


def test_overlap_by_time_when_the_release_answer_was_lost() -> None:
    # a1's release is unknown (no deletion revision); a2 was answered before that release was even
    # sent, so a1 was certainly live when a2 committed.
    ops = [
        alloc("c1", "r1", "a1", {"n/g0"}, 10, 0.0, 0.1),
        alloc("c2", "r2", "a2", {"n/g0"}, 11, 0.2, 0.3),
        release("c1", "r1", "a1", 0.4, 0.9, outcome="unknown", error="DEADLINE_EXCEEDED: timed out"),
        release("c2", "r2", "a2", 1.0, 1.1, rev=15),
    ]
    assert kinds(check(ops, final_allocations={})) == ["overlap"]
    # Had a2 been answered only after a1's release was sent, nothing is proven.
    ops[1] = alloc("c2", "r2", "a2", {"n/g0"}, 11, 0.2, 0.5)
    assert check(ops, final_allocations={}) == []


def test_overlap_in_the_final_read_is_caught() -> None:
    violations = check([], final_allocations={"x": frozenset({"n/g0"}), "y": frozenset({"n/g0", "n/g1"})})
    assert kinds(violations) == ["overlap"]


def test_lost_acknowledgement_is_caught() -> None:
    ops = clean_history()
    # a3 was never released, yet etcd no longer holds it.
    assert kinds(check(ops, final_allocations={})) == ["lost"]
    # Declared expired (its holder could not renew it), it is not lost.
    assert check(ops, final_allocations={}, expired={"a3"}) == []


def test_lost_by_keepalive_not_found() -> None:
    ops = [
        alloc("c1", "r1", "a1", {"n/g0"}, 10, 0.0, 0.1),
        Op("keepalive", "c1", "r1", 0.2, 0.3, "fail", "a1", error="NOT_FOUND: allocation a1 is not live"),
        release("c1", "r1", "a1", 0.4, 0.5, found=False),
    ]
    violations = check(ops, final_allocations={})
    assert kinds(violations) == ["lost"], violations
    assert check(ops, final_allocations={}, expired={"a1"}) == []


def test_release_after_the_final_read_does_not_excuse_absence() -> None:
    ops = [alloc("c1", "r1", "a1", {"n/g0"}, 10, 0.0, 0.1), release("c1", "r1", "a1", 5.0, 5.1, rev=20)]
    assert kinds(check(ops, final_allocations={}, final_read_at=4.0)) == ["lost"]
    assert check(ops, final_allocations={}, final_read_at=6.0) == []


def test_leak_is_caught() -> None:
    violations = check(clean_history(), final_allocations={"a3": frozenset({"n/g1"})},
                       quiet_leaked={"zz": frozenset({"n/g5"})})  # fmt: skip
    assert kinds(violations) == ["leak"]
    assert "never acknowledged" in violations[0].detail


def test_duplicate_request_id_is_caught() -> None:
    ops = [
        alloc("c1", "r1", "a1", {"n/g0"}, 10, 0.0, 0.1),
        alloc("c1", "r1", "a9", {"n/g1"}, 11, 0.2, 0.3),
        release("c1", "r1", "a1", 0.4, 0.5, rev=12),
        release("c1", "r1", "a9", 0.4, 0.5, rev=13),
    ]
    assert kinds(check(ops, final_allocations={})) == ["duplicate"]
    # The same allocation answered twice (reused=true on a retry) is fine.
    ops[1] = alloc("c1", "r1", "a1", {"n/g0"}, 10, 0.2, 0.3)
    del ops[3]
    assert check(ops, final_allocations={}) == []


def test_internal_and_unknown_errors_are_caught() -> None:
    ops = [
        *clean_history(),
        alloc("c4", "r4", "", set(), 0, 1.0, 1.1, outcome="fail", error="INTERNAL: boom"),
        alloc("c5", "r5", "", set(), 0, 1.0, 1.1, outcome="unknown", error="UNKNOWN: TypeError: bad"),
        alloc("c6", "r6", "", set(), 0, 1.0, 1.1, outcome="fail", error="RESOURCE_EXHAUSTED: no room"),
    ]
    violations = check(ops, final_allocations={"a3": frozenset({"n/g1"})})
    assert kinds(violations) == ["unclean", "unclean"]


def test_unknown_outcomes_alone_are_not_violations() -> None:
    ops = [
        *clean_history(),
        alloc("c4", "r4", "", set(), 0, 1.0, 3.0, outcome="unknown", error="UNAVAILABLE: not known yet"),
        alloc("c5", "r5", "", set(), 0, 1.0, 3.0, outcome="unknown", error="DEADLINE_EXCEEDED: deadline"),
        release("c3", "r3", "a3", 4.0, 5.0, outcome="unknown", error="UNAVAILABLE: etcd down"),
    ]
    # The unknown allocate may well have committed (x holds n/g2): not a violation by itself.
    final = {"a3": frozenset({"n/g1"}), "x": frozenset({"n/g2"})}
    assert check(ops, final_allocations=final, quiet_leaked={}, final_read_at=3.5) == []


def test_dump_and_load_round_trip(tmp_path: Path) -> None:
    history = History()
    h = history.invoke("allocate", "c1", "r1")
    h.ok("a1", {"n/g0", "n/g1"}, 42, ttl=10)
    history.invoke("release", "c1", "r1").unknown(TimeoutError("slow"), allocation_id="a1")
    history.note("kill", member=1)
    loaded = History.load(history.dump(tmp_path / "h.jsonl"))
    assert loaded.ops == history.ops
    assert loaded.notes == history.notes
    assert loaded.ops[1].code == "UNKNOWN"
