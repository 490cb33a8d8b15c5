"""The heartbeat interval and node TTL a cluster of N nodes is told (coordinator/liveness.py), and
the session lease's TTL: pure arithmetic, the same on every replica."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

# MAX_RPC_TIMEOUT_S: the most an agent waits on a silent replica before it tries the next.
from gpulease.agent.registration import MAX_RPC_TIMEOUT_S
from gpulease.coordinator.liveness import TICK_S, LivenessPolicy, Timing, session_ttl, timing

DEFAULT = LivenessPolicy()


@pytest.mark.parametrize(
    ("nodes", "expected"),
    [
        (0, Timing(5, 15)),
        (100, Timing(5, 15)),
        (1_000, Timing(5, 15)),
        (1_250, Timing(5, 15)),  # 250/s x 5 s: the last size the configured interval serves
        (1_251, Timing(6, 16)),
        (10_000, Timing(40, 50)),
        (20_000, Timing(80, 90)),
    ],
)
def test_default_policy(nodes: int, expected: Timing) -> None:
    assert timing(nodes, DEFAULT) == expected


def test_the_issue_s_bound_at_10000_nodes() -> None:
    # Issue 18: a dead node is down within 60 s at 10,000 nodes, at no more than the cap.
    t = timing(10_000, DEFAULT)
    assert t.detection_s == 50 + TICK_S <= 60
    assert 10_000 / t.heartbeat_interval <= DEFAULT.max_heartbeats_per_second


def test_no_cap_keeps_the_configured_values() -> None:
    assert timing(1_000_000, LivenessPolicy(2, 6, max_heartbeats_per_second=0)) == Timing(2, 6)


def test_the_ttl_keeps_its_configured_margin() -> None:
    policy = LivenessPolicy(heartbeat_interval=2, node_ttl=6, max_heartbeats_per_second=100)
    assert timing(200, policy) == Timing(2, 6)
    assert timing(201, policy) == Timing(3, 7)  # rounded up: never above the cap


@given(nodes=st.integers(0, 2_000_000), cap=st.integers(1, 5_000), interval=st.integers(1, 60),
       margin=st.integers(1, 120))  # fmt: skip
def test_never_above_the_cap_never_below_the_configured_values(nodes: int, cap: int, interval: int,
                                                               margin: int) -> None:  # fmt: skip
    policy = LivenessPolicy(interval, interval + margin, cap)
    t = timing(nodes, policy)
    assert t.heartbeat_interval >= interval and t.node_ttl - t.heartbeat_interval == margin
    assert nodes / t.heartbeat_interval <= cap or t.heartbeat_interval == interval
    # The session outlives a hung replica's nodes moving away: the next heartbeat comes within one
    # interval, waits at most MAX_RPC_TIMEOUT_S on the silent replica, then goes elsewhere.
    assert session_ttl(t) >= t.heartbeat_interval + MAX_RPC_TIMEOUT_S + 1
    assert session_ttl(t) >= 2 * t.node_ttl


def test_session_ttl_of_the_defaults() -> None:
    assert session_ttl(Timing(5, 15)) == 30
    assert session_ttl(Timing(40, 50)) == 100


def test_the_table_in_the_architecture_doc_is_timing_s() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "architecture.md").read_text()
    section = doc[doc.index("A dead node is down within node TTL + 1 s") : doc.index("The cost: an ended allocation")]
    rows = re.findall(r"^\s*\| ([\d,]+) \| (\d+) s \| (\d+) s \| (\d+) s \| (\d+) \|$", section, re.M)
    assert len(rows) == 3, section
    for nodes_text, interval, ttl, bound, rate in rows:
        nodes = int(nodes_text.replace(",", ""))
        t = timing(nodes, DEFAULT)
        assert (t.heartbeat_interval, t.node_ttl, t.detection_s) == (int(interval), int(ttl), int(bound))
        assert nodes // t.heartbeat_interval == int(rate)
