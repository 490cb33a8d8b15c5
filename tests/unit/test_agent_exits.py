"""agent/exits.py: which container exits the agent queues for heartbeats, and when it forgets them."""

from __future__ import annotations

import time

from gpulease.agent.exits import ExitReports
from gpulease.agent.runtime import ContainerInfo


def info(cid: str, state: str = "exited", finished: int = -1, code: int | None = 0, alloc: str = "a1") -> ContainerInfo:
    ms = int(time.time() * 1000) if finished < 0 else finished
    return ContainerInfo(id=cid, name=cid, allocation_id=alloc, revision=1, state=state,  # type: ignore[arg-type]
                         exit_code=code, image="img", gpu_indexes=(), finished_unix_ms=ms)  # fmt: skip


def test_new_exits_are_queued_once_and_cleared_only_when_sent() -> None:
    r = ExitReports()
    r.note([info("c1", code=3), info("c2", state="running"), info("c3", code=None)])
    batch = r.batch()
    assert [(e.container_id, e.HasField("exit_code"), e.exit_code) for e in batch] == [
        ("c1", True, 3),
        ("c3", False, 0),
    ]
    r.note([info("c1", finished=batch[0].finished_unix_ms), info("c3", code=None, finished=batch[1].finished_unix_ms)])
    assert len(r) == 2  # seen already: not queued twice
    assert r.batch() == batch  # not answered yet: sent again
    r.sent(batch[:1])
    assert [e.container_id for e in r.batch()] == ["c3"]
    r.sent(batch)
    assert len(r) == 0


def test_bounds_old_exits_and_restarts() -> None:
    r = ExitReports(max_pending=3, max_age_s=60)
    r.note([info("old", finished=int(time.time() * 1000) - 120_000)])
    assert len(r) == 0  # finished before the agent could have been watching: not news
    base = int(time.time() * 1000)
    r.note([info(f"c{i}", finished=base + i) for i in range(5)])
    assert [e.container_id for e in r.batch()] == ["c2", "c3", "c4"] and r.dropped == 2
    assert [e.container_id for e in r.batch(limit=2)] == ["c2", "c3"]
    now = int(time.time() * 1000)
    r2 = ExitReports()
    r2.note([info("c1", finished=now)])
    r2.sent(r2.batch())
    r2.note([info("c1", finished=now + 5000)])  # restarted and exited again
    assert [e.finished_unix_ms for e in r2.batch()] == [now + 5000]
    r2.note([])  # removed: forgotten
    assert len(r2) == 1
