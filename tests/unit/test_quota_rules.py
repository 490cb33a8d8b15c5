"""Table tests of the pure quota rule (coordinator/quota.py) and the fair-share ledger's arithmetic
(coordinator/fair_share.py)."""

from __future__ import annotations

import pytest

from gpulease.coordinator.fair_share import advance
from gpulease.coordinator.quota import Quota, QuotaBook, Usage, borrowed, decayed, over_quota, share_key

A = "A100"


@pytest.mark.parametrize(
    ("quota", "held", "asks", "reason"),
    [
        (None, Usage(99), Usage(99), None),  # no quota: no limit
        (Quota(max_lifetime_s=60), Usage(99), Usage(99), None),  # a lifetime alone caps nothing
        (Quota(gpus=4), Usage(3), Usage(1), None),
        (Quota(gpus=4), Usage(4), Usage(1), "quota: t uses 4 of 4 GPUs (asks for 1)"),
        (Quota(gpus=4, borrow=2), Usage(5), Usage(1), None),
        (Quota(gpus=4, borrow=2), Usage(6), Usage(1), "quota: t uses 6 of 4 (+2 borrowable) GPUs (asks for 1)"),
        (Quota(models={A: 8}), Usage(8, {A: 8}), Usage(1, {A: 1}), "quota: t uses 8 of 8 A100 (asks for 1)"),
        (Quota(models={A: 8}), Usage(8, {A: 8}), Usage(1, {"H100": 1}), None),  # another model is not capped
        (Quota(models={A: 8}), Usage(8, {A: 8}), Usage(1), None),  # model unknown before placement
        (Quota(cpus=8), Usage(1, cpus=6), Usage(1, cpus=3), "quota: t uses 6 of 8 CPUs (asks for 3)"),
        (Quota(memory_bytes=2 << 30), Usage(memory_bytes=1 << 30), Usage(memory_bytes=3 << 29),
         "quota: t uses 1 GiB of 2 GiB memory (asks for 1.5 GiB)"),
    ],
)  # fmt: skip
def test_over_quota(quota: Quota | None, held: Usage, asks: Usage, reason: str | None) -> None:
    assert over_quota("t", quota, held, asks) == reason


def test_borrowed_is_what_is_held_above_nominal() -> None:
    assert borrowed(Quota(gpus=4, borrow=4), Usage(6)) == 2
    assert borrowed(Quota(gpus=4), Usage(3)) == 0
    assert borrowed(None, Usage(9)) == 0


def test_the_default_quota_applies_only_to_tenants_without_one() -> None:
    book = QuotaBook({"*": (Quota(gpus=1), 7), "a": (Quota(gpus=5), 9)})
    assert book.quota_for("a") == (Quota(gpus=5), False) and book.revision("a") == 9
    assert book.quota_for("b") == (Quota(gpus=1), True) and book.revision("b") == 0
    assert QuotaBook().quota_for("b") == (None, False)


def test_decay_halves_per_half_life_and_held_gpus_accrue() -> None:
    assert decayed(100.0, 60, 60) == pytest.approx(50.0)
    assert decayed(100.0, 120, 60) == pytest.approx(25.0)
    # 10 s later: the old figure decayed, plus 4 GPUs x 10 s for the tenant holding them now.
    now = advance(0, {"a": 100.0}, {"b": 4}, 10_000, half_life_s=10)
    assert now["a"] == pytest.approx(50.0) and now["b"] == pytest.approx(40.0)


def test_share_key_divides_usage_by_the_quota_weight() -> None:
    book = QuotaBook({"big": (Quota(gpus=12), 1), "small": (Quota(gpus=4), 1), "w": (Quota(weight=2.5), 1)})
    usage = {"big": 120.0, "small": 40.0, "w": 10.0}
    assert share_key("big", book, usage) == share_key("small", book, usage) == 10.0
    assert share_key("w", book, usage) == 4.0
    assert share_key("nobody", book, usage) == 0.0
