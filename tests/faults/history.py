"""A recorded history of client operations under faults, and an offline checker of the promise:
no GPU is ever held by two live allocations, no acknowledged allocation is lost, no GPU leaks.

Recording: `History.invoke(kind, process, request_id)` before the call, then exactly one of
`handle.ok(...)`, `handle.fail(err)` or `handle.unknown(err)` after it. Outcomes:

- "ok": the coordinator answered. For allocate: the allocation (id, GPUs, revision = its fencing
  token). For release: `found` says whether it ended a live allocation (ReleaseResponse.released),
  `revision` the etcd revision of the deletion (0 when not found). For keepalive: `revision` unused.
- "fail": the coordinator answered an error that says nothing happened (RESOURCE_EXHAUSTED,
  NOT_FOUND, ABORTED, ...). `error` is "<gRPC code name>: <message>".
- "unknown": no answer that tells (a deadline, UNAVAILABLE after the request may have been sent):
  the operation may or may not have taken effect, now or later.

`check()` works offline on the recorded ops plus what was read from etcd afterwards; see its
docstring for the precise rules.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import defaultdict
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

OUTCOMES = ("ok", "fail", "unknown")
UNCLEAN_CODES = ("INTERNAL", "UNKNOWN")


@dataclass(frozen=True)
class Op:
    kind: str  # "allocate" | "release" | "keepalive"
    process: str  # the client that did it, e.g. "c7"
    request_id: str
    invoked: float  # time.monotonic() at invocation
    completed: float  # time.monotonic() at completion
    outcome: str  # "ok" | "fail" (certainly nothing happened) | "unknown" (may have happened)
    allocation_id: str = ""
    gpus: frozenset[str] = frozenset()  # "node/uuid"
    revision: int = 0  # allocate: the fencing token; release: the deletion's revision
    error: str = ""  # "<gRPC code name>: <message>" for fail and unknown
    # release: whether it ended a live allocation (False: it was already gone). keepalive: the
    # lease was live (a keepalive that finds it gone is a "fail" with NOT_FOUND instead).
    found: bool = True
    ttl: int = 0  # allocate: the TTL asked for; keepalive: the TTL answered

    @property
    def code(self) -> str:
        """The gRPC status code name of a failure ("" for ok)."""
        return self.error.split(":", 1)[0].strip() if self.error else ""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["gpus"] = sorted(self.gpus)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Op:
        return cls(**{**d, "gpus": frozenset(d.get("gpus", ()))})


def error_text(err: BaseException | str) -> str:
    """ "<gRPC code name>: <message>" for a gpulease error or a grpc.RpcError; anything else (a bug
    in the client, say) is "UNKNOWN: <type>: <message>", which the checker reports as unclean."""
    if isinstance(err, str):
        return err
    code = getattr(err, "code", None)
    if isinstance(code, str):  # gpulease.errors.GpuLeaseError
        return f"{code}: {getattr(err, 'message', str(err))}"
    if callable(code):  # grpc.RpcError
        try:
            name = code().name
            details = err.details() if hasattr(err, "details") else str(err)
            return f"{name}: {details}"
        except Exception:
            pass
    return f"UNKNOWN: {type(err).__name__}: {err}"


class Handle:
    """One invoked operation; complete it exactly once."""

    def __init__(self, history: History, kind: str, process: str, request_id: str, invoked: float) -> None:
        self._history = history
        self.kind = kind
        self.process = process
        self.request_id = request_id
        self.invoked = invoked
        self.op: Op | None = None

    def _done(self, outcome: str, **fields: Any) -> Op:
        if self.op is not None:
            raise RuntimeError(f"{self.kind} {self.request_id} completed twice")
        op = Op(self.kind, self.process, self.request_id, self.invoked, time.monotonic(), outcome, **fields)
        self.op = op
        self._history._append(op)
        return op

    def ok(
        self,
        allocation_id: str = "",
        gpus: Collection[str] = (),
        revision: int = 0,
        *,
        found: bool = True,
        ttl: int = 0,
    ) -> Op:
        return self._done("ok", allocation_id=allocation_id, gpus=frozenset(gpus), revision=revision,
                          found=found, ttl=ttl)  # fmt: skip

    def fail(self, err: BaseException | str, allocation_id: str = "") -> Op:
        return self._done("fail", allocation_id=allocation_id, error=error_text(err))

    def unknown(self, err: BaseException | str, allocation_id: str = "") -> Op:
        return self._done("unknown", allocation_id=allocation_id, error=error_text(err))


class History:
    """Thread-safe recorder of completed operations, in completion order."""

    def __init__(self, ops: Sequence[Op] = ()) -> None:
        self._lock = threading.Lock()
        self._ops: list[Op] = list(ops)
        # Free-form facts a scenario wants kept with the history (faults injected, recovery times).
        self.notes: list[dict[str, Any]] = []

    def invoke(self, kind: str, process: str, request_id: str) -> Handle:
        return Handle(self, kind, process, request_id, time.monotonic())

    def _append(self, op: Op) -> None:
        with self._lock:
            self._ops.append(op)

    def note(self, what: str, **fields: Any) -> None:
        with self._lock:
            self.notes.append({"what": what, "at": time.monotonic(), **fields})

    @property
    def ops(self) -> list[Op]:
        with self._lock:
            return list(self._ops)

    def __iter__(self) -> Iterator[Op]:
        return iter(self.ops)

    def __len__(self) -> int:
        with self._lock:
            return len(self._ops)

    def dump(self, path: Path | str) -> Path:
        """JSONL: one op per line; notes as lines {"note": {...}}."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            for op in self.ops:
                f.write(json.dumps(op.to_json()) + "\n")
            for n in list(self.notes):
                f.write(json.dumps({"note": n}) + "\n")
        return path

    @classmethod
    def load(cls, path: Path | str) -> History:
        ops: list[Op] = []
        notes: list[dict[str, Any]] = []
        for line in Path(path).read_text().splitlines():
            if not line.strip():
                continue
            d = json.loads(line)
            if "note" in d:
                notes.append(d["note"])
            else:
                ops.append(Op.from_json(d))
        history = cls(ops)
        history.notes = notes
        return history

    def counts(self) -> dict[str, int]:
        """ "<kind>.<outcome>" -> count, for reports."""
        out: dict[str, int] = defaultdict(int)
        for op in self.ops:
            out[f"{op.kind}.{op.outcome}"] += 1
        return dict(sorted(out.items()))


@dataclass(frozen=True)
class Violation:
    kind: str  # "overlap" | "lost" | "leak" | "duplicate" | "unclean"
    detail: str


@dataclass
class _Alloc:
    """What the history says of one acknowledged allocation."""

    id: str
    revision: int
    gpus: frozenset[str]
    acks: list[Op] = field(default_factory=list)
    releases: list[Op] = field(default_factory=list)
    keepalives: list[Op] = field(default_factory=list)

    @property
    def first_ack(self) -> Op:
        return min(self.acks, key=lambda o: o.completed)

    def deletion_revision(self) -> int | None:
        """The revision its keys were deleted at, when a release answered it (exact)."""
        revs = [r.revision for r in self.releases if r.outcome == "ok" and r.found and r.revision > 0]
        return min(revs) if revs else None

    def first_release_invoked(self) -> float | None:
        times = [r.invoked for r in self.releases]
        return min(times) if times else None


def _collect(ops: Sequence[Op]) -> dict[str, _Alloc]:
    allocs: dict[str, _Alloc] = {}
    for op in ops:
        if op.kind == "allocate" and op.outcome == "ok" and op.allocation_id:
            a = allocs.setdefault(op.allocation_id, _Alloc(op.allocation_id, op.revision, op.gpus))
            a.acks.append(op)
    for op in ops:
        held = allocs.get(op.allocation_id) if op.allocation_id else None
        if held is None:
            continue
        if op.kind == "release":
            held.releases.append(op)
        elif op.kind == "keepalive":
            held.keepalives.append(op)
    return allocs


def _live_until(a: _Alloc, expired: Collection[str]) -> float:
    """A time (monotonic) before which `a` was certainly still live, or -inf when none is known.

    Not expired (the caller says so): nothing but a release deletes it, and no release can act
    before it is invoked, so it is live until its first release's invocation, or forever without
    one. Expired: only an answered keepalive proves it was live then (the lease was renewed at some
    moment after the keepalive was sent), so the latest such invocation."""
    if a.id not in expired:
        first = a.first_release_invoked()
        return math.inf if first is None else first
    proofs = [k.invoked for k in a.keepalives if k.outcome == "ok" and k.found]
    proofs += [r.invoked for r in a.releases if r.outcome == "ok" and r.found]
    return max(proofs) if proofs else -math.inf


def check(
    history: History | Sequence[Op],
    *,
    final_allocations: Mapping[str, frozenset[str]],
    quiet_leaked: Mapping[str, frozenset[str]] | None = None,
    expired: Collection[str] = (),
    final_read_at: float | None = None,
) -> list[Violation]:
    """Every violation of the promise in `history`, given what etcd held afterwards.

    Terms. An *acknowledged* allocation is one some allocate op answered "ok" (id, GPUs, revision).
    Its *revision* is its fencing token: the etcd revision that created it. An allocate answered
    "unknown" may have created an allocation nobody knows of; the checker never assumes it did
    or did not, so unknown outcomes are no violation by themselves (but such an allocation shows
    up in final_allocations and quiet_leaked, and is judged there).

    Arguments:
    - final_allocations: allocation id -> GPUs ("node/uuid"), every allocation etcd held when read
      after the storm stopped and before anything released what was left. `final_read_at`: the
      time.monotonic() of that read (None: after every op of the history).
    - quiet_leaked: allocation id -> GPUs still held after every client released what it knew of
      and the quiet period (long enough for every lease nobody renews to expire) passed.
    - expired: allocation ids whose leases may legitimately have lapsed (their holder could not
      renew them within their TTL, e.g. during a fault longer than the TTL).

    An acknowledged allocation A is *live* from its revision until it is deleted. When a release of
    A answered "released" with a revision, that revision ends it exactly. Otherwise the history
    knows a time before which A was certainly live (`_live_until`): its first release's invocation
    if A is not in `expired` (forever if never released), else its last answered keepalive.

    Rules:
    (a) overlap: two allocations hold one GPU while both are live. For A and B on a common GPU with
        rev(A) < rev(B): B was committed while A lived if rev(B) < A's deletion revision, or (the
        deletion revision unknown) if B's allocate completed before A's certainly-live time: B
        committed before its answer, and A, committed earlier, had not yet been deleted. Equal
        revisions on one GPU (one transaction granting it twice) are an overlap. Two allocations
        in final_allocations on one GPU (one read, both live) are an overlap too, acknowledged or not.
    (b) lost: an acknowledged allocation not in `expired` vanished before anyone released it:
        - it is absent from final_allocations although no release of it was invoked before the
          final read, or
        - a keepalive answered NOT_FOUND, or a release answered "not found", before any earlier
          release of it had been invoked.
    (c) leak: any allocation in quiet_leaked: GPUs held by nobody once everything was released.
    (d) duplicate: one request id answered with two different allocation ids.
    (e) unclean: an op failed (fail or unknown) with gRPC code INTERNAL or UNKNOWN: faults must
        surface as clean errors (UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED, ...), never as crashes.
    """
    ops = history.ops if isinstance(history, History) else list(history)
    expired = set(expired)
    read_at = math.inf if final_read_at is None else final_read_at
    violations: list[Violation] = []
    allocs = _collect(ops)

    # (a) overlap, per GPU, in revision order.
    by_gpu: dict[str, list[_Alloc]] = defaultdict(list)
    for a in allocs.values():
        for g in a.gpus:
            by_gpu[g].append(a)
    for g, holders in sorted(by_gpu.items()):
        holders.sort(key=lambda a: (a.revision, a.id))
        # Earlier holders that may still have been live: (alloc, deletion revision or None, live-until).
        open_: list[tuple[_Alloc, int | None, float]] = []
        for b in holders:
            b_done = b.first_ack.completed
            still: list[tuple[_Alloc, int | None, float]] = []
            for a, a_del, a_until in open_:
                if a.revision == b.revision:
                    overlap = True
                elif a_del is not None:
                    overlap = b.revision < a_del
                else:
                    overlap = b_done < a_until
                if overlap:
                    violations.append(Violation("overlap", f"GPU {g}: {b.id} (rev {b.revision}, answered at "
                        f"{b_done:.3f}) granted while {a.id} (rev {a.revision}, deleted at rev {a_del}, "
                        f"live until >= {a_until:.3f}) held it"))  # fmt: skip
                # A revision-closed holder cannot overlap anything later in revision order.
                if a_del is None or a_del > b.revision:
                    still.append((a, a_del, a_until))
            still.append((b, b.deletion_revision(), _live_until(b, expired)))
            open_ = still
    held: dict[str, str] = {}
    for alloc_id, gpus in sorted(final_allocations.items()):
        for g in gpus:
            if g in held and held[g] != alloc_id:
                violations.append(Violation("overlap", f"GPU {g} held by {held[g]} and {alloc_id} in the final read"))
            held[g] = alloc_id

    # (b) lost.
    for a in allocs.values():
        if a.id in expired:
            continue
        first_release = a.first_release_invoked()
        released_before_read = first_release is not None and first_release < read_at
        if a.id not in final_allocations and not released_before_read:
            violations.append(Violation("lost", f"{a.id} (request {a.first_ack.request_id}, rev {a.revision}) "
                                        "acknowledged, never released, absent from etcd after the storm"))  # fmt: skip
            continue
        for op in sorted(a.keepalives + a.releases, key=lambda o: o.completed):
            gone = (op.kind == "keepalive" and op.outcome == "fail" and op.code == "NOT_FOUND") or (
                op.kind == "release" and op.outcome == "ok" and not op.found
            )
            earlier_release = any(r.invoked < op.invoked for r in a.releases if r is not op)
            if gone and not earlier_release:
                why = f"{op.kind} {op.outcome} {op.error or 'not found'}"
                violations.append(Violation("lost", f"{a.id} (rev {a.revision}) gone at {op.completed:.3f}: {why}"))
                break

    # (c) leak.
    for alloc_id, gpus in sorted((quiet_leaked or {}).items()):
        known = "acknowledged" if alloc_id in allocs else "never acknowledged"
        violations.append(Violation("leak", f"{alloc_id} ({known}) still holds {sorted(gpus)} after the quiet period"))

    # (d) duplicate request ids.
    by_request: dict[str, set[str]] = defaultdict(set)
    for op in ops:
        if op.kind == "allocate" and op.outcome == "ok" and op.allocation_id:
            by_request[op.request_id].add(op.allocation_id)
    for rid, ids in sorted(by_request.items()):
        if len(ids) > 1:
            violations.append(Violation("duplicate", f"request {rid} acknowledged as {sorted(ids)}"))

    # (e) unclean errors.
    for op in ops:
        if op.outcome in ("fail", "unknown") and op.code in UNCLEAN_CODES:
            violations.append(Violation("unclean", f"{op.kind} {op.request_id} by {op.process}: {op.error}"))
    return violations


def summary(violations: Sequence[Violation], limit: int = 20) -> str:
    """A readable list for an assertion message."""
    lines = [f"{len(violations)} violation(s):"]
    lines += [f"  [{v.kind}] {v.detail}" for v in violations[:limit]]
    if len(violations) > limit:
        lines.append(f"  ... and {len(violations) - limit} more")
    return "\n".join(lines)
