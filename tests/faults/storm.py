"""A bounded allocate / hold / release storm through the real client library, recording every
operation in a History, plus the etcd reads the checker judges the storm by.

Each client thread loops: allocate (fresh request id; after an unknown outcome it retries with the
same request id a few times, as a careful caller does), hold briefly with keepalives, release
(retried while the outcome is unknown). Short per-call deadlines make faults show up as unknown
outcomes instead of long stalls. It stops after duration_s, after max_ops allocate attempts in all,
or when `stop` is set, whichever comes first; every thread finishes its current cycle (release
included, bounded in time) before run_storm returns.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from gpulease.client import Client
from gpulease.errors import GpuLeaseError
from gpulease.v1 import coordinator_pb2 as pb
from tests.faults.etcd_cluster import b64, post_json, unb64
from tests.faults.history import History, Op

# Answers that leave the outcome open: the request may have been acted on, now or later.
UNKNOWN_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"})
# How often an allocate with an unknown outcome is sent again with its request id before the
# client gives up on it (an allocation made anyway then lives until its TTL, nobody renewing it).
ALLOCATE_RETRIES = 3
RELEASE_ATTEMPTS = 6


@dataclass
class StormResult:
    # Allocations whose lease may have lapsed legitimately: the holder found them gone no earlier
    # than one TTL after the last renewal it can prove.
    expired: set[str] = field(default_factory=set)
    # Acknowledged allocations no release answered for: release_all must end them.
    unreleased: dict[str, str] = field(default_factory=dict)  # allocation id -> process
    allocate_attempts: int = 0
    cycles: int = 0
    started: float = 0.0
    ended: float = 0.0


def gpu_names(info: object) -> frozenset[str]:
    """ "node/uuid" for every GPU of an AllocationInfo (every member of a gang)."""
    members = getattr(info, "members", ()) or ()
    if members:
        return frozenset(f"{m.node}/{g.uuid}" for m in members for g in m.gpus)
    return frozenset(f"{info.node}/{g.uuid}" for g in info.gpus)  # type: ignore[attr-defined]


def _code(err: BaseException) -> str:
    code = getattr(err, "code", None)
    return code if isinstance(code, str) else "UNKNOWN"


class _Budget:
    """The shared count of allocate attempts and the stop condition."""

    def __init__(self, max_ops: int, deadline: float, stop: threading.Event) -> None:
        self._lock = threading.Lock()
        self.max_ops = max_ops
        self.deadline = deadline
        self.stop = stop
        self.used = 0

    def take(self) -> bool:
        if self.stop.is_set() or time.monotonic() >= self.deadline:
            return False
        with self._lock:
            if self.used >= self.max_ops:
                return False
            self.used += 1
            return True

    def over(self) -> bool:
        return self.stop.is_set() or time.monotonic() >= self.deadline


class StormClient:
    """One client of the storm: its own Client (channels to every address) and its cycle."""

    def __init__(
        self,
        name: str,
        addresses: Sequence[str],
        history: History,
        result: StormResult,
        result_lock: threading.Lock,
        *,
        gpus: Sequence[int],
        ttl: int,
        timeout: float,
        retry_deadline: float,
        hold_s: tuple[float, float],
        seed: int,
    ) -> None:
        self.name = name
        self.history = history
        self.result = result
        self._lock = result_lock
        self.gpus = tuple(gpus)
        self.ttl = ttl
        self.hold_s = hold_s
        self.rng = random.Random(seed)
        self.client = Client(list(addresses), timeout=timeout, retry_deadline=retry_deadline)

    def close(self) -> None:
        self.client.close()

    # -- one operation each ----------------------------------------------------------------------

    def allocate(self, request_id: str, n: int) -> tuple[Op, object | None]:
        h = self.history.invoke("allocate", self.name, request_id)
        try:
            alloc = self.client.allocate(gpus=n, ttl=self.ttl, request_id=request_id, owner=self.name)
        except GpuLeaseError as e:
            return (h.unknown(e) if _code(e) in UNKNOWN_CODES else h.fail(e)), None
        except Exception as e:
            return h.unknown(e), None
        info = alloc.info
        return h.ok(info.id, gpu_names(info), info.revision, ttl=self.ttl), info

    def keepalive(self, alloc_id: str, request_id: str) -> Op:
        h = self.history.invoke("keepalive", self.name, request_id)
        try:
            ttl = self.client.keep_alive(alloc_id)
        except GpuLeaseError as e:
            return h.unknown(e, alloc_id) if _code(e) in UNKNOWN_CODES else h.fail(e, alloc_id)
        except Exception as e:
            return h.unknown(e, alloc_id)
        return h.ok(alloc_id, found=ttl > 0, ttl=int(ttl))

    def release(self, alloc_id: str, request_id: str, release_id: str = "") -> Op:
        h = self.history.invoke("release", self.name, request_id)
        try:
            # The raw call: the library's release() answers a bool, and the checker wants the
            # deletion's revision (ReleaseResponse.revision) to order it against later grants.
            # release_id, as the library sends it: one per logical release, the same in its retries,
            # so a retry after a lost answer is told "released", not "not live".
            request = pb.ReleaseRequest(allocation_id=alloc_id, release_id=release_id)
            answer = self.client._rpc.call("Release", request, pb.ReleaseResponse)
        except GpuLeaseError as e:
            return h.unknown(e, alloc_id) if _code(e) in UNKNOWN_CODES else h.fail(e, alloc_id)
        except Exception as e:
            return h.unknown(e, alloc_id)
        return h.ok(alloc_id, revision=int(answer.revision), found=bool(answer.released))

    # -- the cycle -------------------------------------------------------------------------------

    def cycle(self, budget: _Budget) -> bool:
        """One allocate / hold / release. False when the budget is spent."""
        if not budget.take():
            return False
        with self._lock:
            self.result.allocate_attempts += 1
        request_id = f"{self.name}-{uuid.uuid4().hex[:12]}"
        n = self.rng.choice(self.gpus)
        op, info = self.allocate(request_id, n)
        for _ in range(ALLOCATE_RETRIES):
            if op.outcome != "unknown" or budget.over():
                break
            time.sleep(self.rng.uniform(0.05, 0.3))
            op, info = self.allocate(request_id, n)
        if info is None:
            if op.outcome == "fail":  # nothing fits right now: don't spin
                time.sleep(self.rng.uniform(0.05, 0.2))
            return True
        alloc_id = op.allocation_id
        # The latest moment the lease certainly still had a full TTL ahead of it: the allocation
        # is renewed to its full TTL before the answer, and a keepalive after it is sent.
        proof = op.invoked
        gone_at: float | None = None
        hold_until = time.monotonic() + self.rng.uniform(*self.hold_s)
        while time.monotonic() < hold_until and gone_at is None:
            time.sleep(min(0.1, max(0.0, hold_until - time.monotonic())))
            k = self.keepalive(alloc_id, request_id)
            if k.outcome == "ok" and k.found:
                proof = k.invoked
            elif k.code == "NOT_FOUND" or (k.outcome == "ok" and not k.found):
                gone_at = k.completed
        released = False
        release_id = uuid.uuid4().hex
        for attempt in range(RELEASE_ATTEMPTS):
            r = self.release(alloc_id, request_id, release_id)
            if r.outcome == "ok":
                released = True
                if not r.found and gone_at is None:
                    gone_at = r.completed
                break
            if r.outcome == "fail":
                break
            time.sleep(min(2.0, 0.1 * 2**attempt))
        with self._lock:
            if gone_at is not None and gone_at >= proof + 0.99 * self.ttl:
                self.result.expired.add(alloc_id)
            if not released:
                self.result.unreleased[alloc_id] = self.name
            self.result.cycles += 1
        return True

    def run(self, budget: _Budget) -> None:
        try:
            while self.cycle(budget):
                pass
        finally:
            self.close()


def run_storm(
    addresses: list[str],
    history: History,
    *,
    clients: int,
    duration_s: float,
    max_ops: int,
    gpus: Sequence[int] = (1, 2),
    ttl: int = 30,
    stop: threading.Event | None = None,
    timeout: float = 2.0,
    retry_deadline: float | None = None,
    hold_s: tuple[float, float] = (0.05, 0.4),
    seed: int = 0,
    name_prefix: str = "c",
) -> StormResult:
    """Run `clients` client threads against the coordinators at `addresses` for at most duration_s
    and max_ops allocate attempts (or until `stop` is set); returns once every thread has
    finished its cycle. timeout: each call's deadline per attempt; retry_deadline: how long
    UNAVAILABLE is retried across the addresses (default: timeout)."""
    stop = stop or threading.Event()
    result = StormResult(started=time.monotonic())
    budget = _Budget(max_ops, result.started + duration_s, stop)
    lock = threading.Lock()
    workers = [
        StormClient(
            f"{name_prefix}{i}",
            addresses,
            history,
            result,
            lock,
            gpus=gpus,
            ttl=ttl,
            timeout=timeout,
            retry_deadline=timeout if retry_deadline is None else retry_deadline,
            hold_s=hold_s,
            seed=seed * 1000 + i,
        )
        for i in range(clients)
    ]
    threads = [threading.Thread(target=w.run, args=(budget,), name=w.name, daemon=True) for w in workers]
    for t in threads:
        t.start()
    # A cycle is bounded: allocate attempts (timeout + retry_deadline each), the hold, and the
    # release attempts with their backoff.
    per_cycle = (ALLOCATE_RETRIES + 1 + RELEASE_ATTEMPTS) * (2 * timeout + 2.5) + hold_s[1] + 10
    join_deadline = time.monotonic() + duration_s + per_cycle
    for t in threads:
        t.join(max(0.0, join_deadline - time.monotonic()))
    stop.set()
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck:
        raise AssertionError(f"storm clients did not finish: {stuck}")
    result.ended = time.monotonic()
    return result


# -- etcd reads ------------------------------------------------------------------------------------


def read_allocations(etcd_urls: Iterable[str], prefix: str) -> dict[str, frozenset[str]]:
    """Every allocation etcd holds under prefix: id -> GPUs ("node/uuid"), from the gpus/ keys (an
    allocs/ record with no GPU key is listed with none). One linearizable read, from the first
    member that answers."""
    last: Exception | None = None
    for url in etcd_urls:
        try:
            return _read(url, prefix)
        except (OSError, ValueError) as e:
            last = e
    raise AssertionError(f"no etcd member answered: {last}")


def _read(url: str, prefix: str) -> dict[str, frozenset[str]]:
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    answer = post_json(url, "/v3/kv/range", {"key": b64(prefix), "range_end": b64(end)}, timeout=5.0)
    held: dict[str, set[str]] = {}
    for kv in answer.get("kvs", []):
        key = unb64(kv["key"])[len(prefix) :]
        if key.startswith("gpus/"):
            held.setdefault(unb64(kv.get("value", "")), set()).add(key[len("gpus/") :])
        elif key.startswith("allocs/"):
            held.setdefault(key[len("allocs/") :], set())
    return {k: frozenset(v) for k, v in held.items()}


def release_all(addresses: Sequence[str], allocation_ids: Iterable[str], history: History | None = None,
                timeout: float = 5.0, retry_deadline: float = 20.0) -> None:  # fmt: skip
    """Release each allocation (what the storm's clients knew of and could not release), through
    the coordinators, retrying UNAVAILABLE for up to retry_deadline; recorded as process "final"."""
    with Client(list(addresses), timeout=timeout, retry_deadline=retry_deadline) as client:
        for alloc_id in allocation_ids:
            h = history.invoke("release", "final", alloc_id) if history is not None else None
            try:
                request = pb.ReleaseRequest(allocation_id=alloc_id, release_id=uuid.uuid4().hex)
                answer = client._rpc.call("Release", request, pb.ReleaseResponse)
            except GpuLeaseError as e:
                if h is not None:
                    (h.unknown if _code(e) in UNKNOWN_CODES else h.fail)(e, alloc_id)
                continue
            if h is not None:
                h.ok(alloc_id, revision=int(answer.revision), found=bool(answer.released))


def wait_quiet(read: Callable[[], Mapping[str, frozenset[str]]], timeout: float,
               interval: float = 0.5) -> dict[str, frozenset[str]]:  # fmt: skip
    """Poll read() until it holds nothing or timeout passes; the last read."""
    deadline = time.monotonic() + timeout
    while True:
        held = dict(read())
        if not held or time.monotonic() >= deadline:
            return held
        time.sleep(interval)


def recovery_after(history: History, fault_at: float) -> float | None:
    """Seconds from fault_at to the first successful operation sent at or after it (None: none)."""
    done = [op.completed for op in history.ops if op.outcome == "ok" and op.invoked >= fault_at]
    return min(done) - fault_at if done else None


def unavailable_spells(history: History, min_gap: float = 0.0) -> list[tuple[float, float]]:
    """(start, end) of each spell in which no operation succeeded while some failed unclearly, for
    reports: the longest spell is how long clients saw the cluster as down."""
    ops = sorted(history.ops, key=lambda o: o.completed)
    spells: list[tuple[float, float]] = []
    start: float | None = None
    for op in ops:
        if op.outcome == "ok":
            if start is not None and op.completed - start >= min_gap:
                spells.append((start, op.completed))
            start = None
        elif op.outcome == "unknown" and start is None:
            start = op.invoked
    return spells
