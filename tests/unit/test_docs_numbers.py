"""Numbers that docs/architecture.md states and the code owns: a test fails when they drift."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from gpulease.coordinator import config as coordinator_config
from gpulease.coordinator.batcher import BatchPolicy
from gpulease.coordinator.nodes import VIEW_CATCH_UP_S

DOC = (Path(__file__).resolve().parents[2] / "docs" / "architecture.md").read_text()


def test_the_coordinator_settings_table_matches_the_defaults() -> None:
    section = DOC[DOC.index("Coordinator (`coordinator/config.py`") : DOC.index("Commit rounds (")]
    rows = re.findall(r"^\| (`[a-z_]+`(?:, `[a-z_]+`)*) \| ([^|]+?) \|", section, re.M)
    documented: dict[str, str] = {}
    for names, default in rows:
        for name in re.findall(r"`([a-z_]+)`", names):
            documented[name] = default.strip().strip("`")
    defaults = {f.name: f.default for f in dataclasses.fields(coordinator_config.CoordinatorConfig)}
    assert set(documented) == set(defaults), "every setting has one row, and every row is a setting"
    for name, text in documented.items():
        parse = coordinator_config._PARSERS.get(name, str)
        assert parse("" if text == "empty" else text) == defaults[name], name


def test_numbers_quoted_in_prose_are_the_code_s() -> None:
    assert f"it waits up to {VIEW_CATCH_UP_S:g} s, `VIEW_CATCH_UP_S`" in DOC
    policy = BatchPolicy()
    assert f"`settle_timeout` ({policy.settle_timeout:g} s)" in DOC
    assert f"After `max_rounds` ({policy.max_rounds})" in DOC
    assert f"`contested_for` ({policy.contested_for:g} s)" in DOC
