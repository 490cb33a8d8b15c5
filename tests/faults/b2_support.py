"""Helpers of the agent, proxy and state-machine fault scenarios (test_agent_faults.py,
test_proxy_faults.py, test_state_machine.py): seeded randomness, the long-version switch, Docker
inspection, a keepalive pump the test can pause, and a TCP proxy that drops or delays answers.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from gpulease.client import Client
from gpulease.errors import GpuLeaseError
from gpulease.v1 import coordinator_pb2 as pb
from tests.faults.history import History, check, summary
from tests.faults.storm import UNKNOWN_CODES, gpu_names, read_allocations, wait_quiet
from tests.support.tcp_proxy import TcpProxy

LONG_ENV = "GPULEASE_FAULTS_LONG"
SEED_ENV = "GPULEASE_FAULTS_SEED"


def long_run() -> bool:
    """The long version (more rounds) when GPULEASE_FAULTS_LONG=1."""
    return os.environ.get(LONG_ENV) == "1"


def seeded(name: str) -> random.Random:
    """A Random whose seed is printed (shown by pytest for a failed test), so a failing run can be
    replayed with GPULEASE_FAULTS_SEED=<seed>."""
    seed = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(2**32))
    print(f"{name}: seed {seed} (replay with {SEED_ENV}={seed})")
    return random.Random(seed)


# -- Docker ----------------------------------------------------------------------------------


def docker_time(text: str) -> float | None:
    """Docker's RFC 3339 timestamp (nanoseconds, 'Z') as Unix seconds; None for the zero time."""
    if not text or text.startswith("0001-01-01"):
        return None
    head, _, frac = text.rstrip("Z").partition(".")
    seconds = datetime.fromisoformat(head + "+00:00").timestamp()
    return seconds + (float("0." + frac) if frac else 0.0)


@dataclass(frozen=True)
class ContainerState:
    id: str
    allocation: str
    running: bool
    restart_count: int
    started_at: str
    finished_at: float | None
    gpu_uuids: tuple[str, ...]


def containers(docker: Any, label: str = "io.gpulease.managed") -> list[ContainerState]:
    """Every container (running or not) carrying ``label``, inspected."""
    found = []
    for c in docker.api.containers(all=True, filters={"label": label}):
        with contextlib.suppress(Exception):  # removed between the listing and the inspection
            found.append(inspect(docker, c["Id"]))
    return found


def inspect(docker: Any, container_id: str) -> ContainerState:
    info = docker.api.inspect_container(container_id)
    labels = info["Config"]["Labels"] or {}
    uuids = tuple(u for u in labels.get("io.gpulease.gpu-uuids", "").split(",") if u)
    return ContainerState(
        id=info["Id"],
        allocation=labels.get("io.gpulease.allocation", ""),
        running=bool(info["State"]["Running"]),
        restart_count=int(info["RestartCount"]),
        started_at=info["State"]["StartedAt"],
        finished_at=docker_time(info["State"]["FinishedAt"]) if not info["State"]["Running"] else None,
        gpu_uuids=uuids,
    )


# Exits 0 on SIGTERM (the trap runs between sleeps), so a stop ends it at once rather than after the
# SIGKILL grace: PID 1 in a container ignores SIGTERM unless it handles it.
TRAPPING = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 0.2; done"]


# -- keepalives the test can pause ----------------------------------------------------------


@dataclass
class KeepAlives:
    """Renews chosen allocations every ``period`` from a thread; ``drop(id)`` stops renewing one (its
    holder 'pauses'), and ``acked[id]`` is the wall-clock time of its last answered renewal."""

    client: Client
    period: float
    history: History | None = None
    process: str = "keeper"
    ids: set[str] = field(default_factory=set)
    acked: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def add(self, alloc_id: str) -> None:
        with self._lock:
            self.ids.add(alloc_id)
            self.acked[alloc_id] = time.time()

    def drop(self, alloc_id: str) -> float:
        """Stop renewing; returns the wall-clock time of its last answered renewal."""
        with self._lock:
            self.ids.discard(alloc_id)
            return self.acked[alloc_id]

    def __enter__(self) -> KeepAlives:
        self._thread = threading.Thread(target=self._run, name="b2-keepalives", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            with self._lock:
                ids = sorted(self.ids)
            for alloc_id in ids:
                asked = time.time()
                try:
                    if self.history is not None:
                        recorded_keepalive(self.history, self.process, self.client, alloc_id)
                    else:
                        self.client.keep_alive(alloc_id)
                except GpuLeaseError as e:
                    self.errors.append(f"{alloc_id}: {type(e).__name__}: {e.message}")
                    continue
                with self._lock:
                    if alloc_id in self.ids:
                        self.acked[alloc_id] = max(self.acked.get(alloc_id, 0.0), asked)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll until truthy (bounded); AssertionError naming ``what`` and the last value otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


# -- a TCP proxy that drops or delays answers -----------------------------------------------


@dataclass(frozen=True)
class Fault:
    """What the proxy does to one answer: ``drop`` closes the connection instead of passing the
    answer on (the request went through and was acted on; the caller sees the connection break),
    ``delay`` holds the answer that long before passing it on, ``pass`` leaves it alone."""

    kind: str  # "pass", "drop" or "delay"
    delay: float = 0.0


PASS = Fault("pass")


class FaultProxy(TcpProxy):
    """A loopback TCP proxy in front of one gRPC server (clear-text HTTP/2). It reads the server's
    frames and, at the first frame of each answer (a HEADERS or DATA frame on a new stream), asks
    ``choose()`` what to do with it. So a fault hits an answer, never a request: a dropped call was
    received, and usually acted on, by the server. Threads, so a test can change ``choose`` from
    anywhere. ``counts`` says how many answers got each fault."""

    def __init__(self, target: str, choose: Callable[[], Fault]) -> None:
        self.choose = choose
        self.counts: dict[str, int] = {"pass": 0, "drop": 0, "delay": 0}
        host, port = target.rsplit(":", 1)
        super().__init__(host, int(port))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _answers(self, src: socket.socket, dst: socket.socket) -> None:
        # The server side of HTTP/2 is frames from its first byte (no preface): 9-byte headers,
        # length (3), type (1), flags (1), stream id (4). Frames are forwarded whole.
        buf = b""
        answered: set[int] = set()
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                buf += data
                while len(buf) >= 9:
                    length = int.from_bytes(buf[:3], "big")
                    if len(buf) < 9 + length:
                        break
                    frame, buf = buf[: 9 + length], buf[9 + length :]
                    kind, stream = frame[3], int.from_bytes(frame[5:9], "big") & 0x7FFFFFFF
                    if stream and kind in (0x0, 0x1) and stream not in answered:
                        answered.add(stream)
                        fault = self.choose()
                        with self._lock:
                            self.counts[fault.kind] = self.counts.get(fault.kind, 0) + 1
                        if fault.kind == "drop":
                            return  # finally: both sides see the break, this answer never arrives
                        if fault.kind == "delay":
                            time.sleep(fault.delay)
                    dst.sendall(frame)
        except OSError:
            pass
        finally:
            self._end(src, dst)


@contextlib.contextmanager
def closing_all(*closers: Callable[[], object]) -> Iterator[None]:
    """Run every closer on the way out, even when one of them (or the body) raises."""
    try:
        yield
    finally:
        for close in closers:
            with contextlib.suppress(Exception):
                close()


# -- what etcd committed, from its history ----------------------------------------------------


@dataclass
class Committed:
    """Every allocation etcd ever held under a prefix between two revisions, from a watch replayed
    from the first: its request id and the revisions it was created and deleted at (0: still live)."""

    request_id: dict[str, str] = field(default_factory=dict)  # allocation id -> scoped request id
    created: dict[str, int] = field(default_factory=dict)
    deleted: dict[str, int] = field(default_factory=dict)
    # reqs/<scoped request id> -> every allocation id it was ever put with ("" is a settler's block).
    reqs: dict[str, set[str]] = field(default_factory=dict)
    # allocation id -> revision of its "release" audit entry, written in the releasing transaction.
    release_entries: dict[str, int] = field(default_factory=dict)

    def released_by_release(self, alloc_id: str) -> bool:
        """Its keys went in a Release transaction (not by lease expiry, nor any other way)."""
        rev = self.release_entries.get(alloc_id)
        return rev is not None and rev == self.deleted.get(alloc_id)

    def by_request(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for alloc_id, rid in self.request_id.items():
            out.setdefault(rid, []).append(alloc_id)
        return {rid: sorted(ids, key=lambda a: self.created[a]) for rid, ids in out.items()}

    def duplicates(self) -> list[str]:
        """One line per request id that more than one allocation was committed for, saying whether
        they were live at the same time or one after the other."""
        lines = []
        for rid, ids in sorted(self.by_request().items()):
            if len(ids) < 2:
                continue
            spans = [(a, self.created[a], self.deleted.get(a, 0)) for a in ids]
            together = any(c2 < (d1 or float("inf")) for (_, _, d1), (_, c2, _) in itertools.pairwise(spans))
            shown = ", ".join(f"{a} (rev {c}..{d or 'live'})" for a, c, d in spans)
            lines.append(f"request {rid}: {len(ids)} allocations, {'overlapping' if together else 'in turn'}: {shown}")
        return lines


def etcd_revision(urls: list[str], prefix: str) -> int:
    """etcd's current revision (one read under prefix)."""
    import asyncio

    from gpulease.coordinator.keys import range_end
    from gpulease.coordinator.store import Store

    async def read() -> int:
        store = Store(urls)
        await store.start()
        try:
            revision, _ = await store.get_prefix(prefix + "marker", range_end(prefix + "marker"))
            return revision
        finally:
            await store.close()

    return asyncio.run(read())


def committed_since(urls: list[str], prefix: str, start_revision: int, timeout: float = 30.0) -> Committed:
    """Replay allocs/ and reqs/ under prefix from start_revision up to etcd's revision now."""
    import asyncio
    import json

    from gpulease.coordinator.keys import range_end
    from gpulease.coordinator.store import Store

    out = Committed()
    allocs, reqs, audit = prefix + "allocs/", prefix + "reqs/", prefix + "audit/"

    async def replay() -> None:
        store = Store(urls)
        await store.start()
        try:
            # The coordinators' own marker key (a rewrite means nothing to them): its revision is
            # one the watch is sure to deliver, which ends the replay.
            now = await store.put(prefix + "marker", b"")
            async with asyncio.timeout(timeout):
                async for batch in store.watch(prefix, range_end(prefix), start_revision):
                    if batch.resync:
                        raise AssertionError(f"etcd history under {prefix} was compacted past {start_revision}")
                    for ev in batch.events:
                        key = ev.kv.key
                        if key.startswith(allocs):
                            alloc_id = key[len(allocs) :]
                            if ev.kind == "put" and alloc_id not in out.created:
                                out.created[alloc_id] = ev.kv.mod_revision
                                out.request_id[alloc_id] = json.loads(ev.kv.value).get("request_id", "")
                            elif ev.kind == "delete":
                                out.deleted[alloc_id] = ev.kv.mod_revision
                        elif key.startswith(reqs) and ev.kind == "put":
                            out.reqs.setdefault(key[len(reqs) :], set()).add(ev.kv.value.decode())
                        elif key.startswith(audit) and key.endswith(".release") and ev.kind == "put":
                            # audit/<ms>-<allocation id>.release
                            alloc_id = key[len(audit) :].split("-", 1)[1].rsplit(".", 1)[0]
                            out.release_entries[alloc_id] = ev.kv.mod_revision
                    if batch.revision >= now:
                        return
        finally:
            await store.close()

    asyncio.run(replay())
    return out


# -- recorded calls ---------------------------------------------------------------------------


def recorded_allocate(history: History, process: str, client: Client, **kw: Any) -> Any:
    """client.allocate(**kw) with a fresh request id (unless given), recorded in history; raises
    what the client raised."""
    request_id = kw.pop("request_id", None) or uuid.uuid4().hex
    h = history.invoke("allocate", process, request_id)
    try:
        alloc = client.allocate(request_id=request_id, **kw)
    except GpuLeaseError as e:
        (h.unknown if e.code in UNKNOWN_CODES else h.fail)(e)
        raise
    h.ok(alloc.id, gpu_names(alloc.info), alloc.revision, ttl=int(kw.get("ttl") or 0))
    return alloc


def recorded_release(history: History, process: str, client: Client, alloc_id: str) -> bool:
    """Release (the raw call, for the deletion's revision), recorded; raises what the client raised."""
    h = history.invoke("release", process, alloc_id)
    try:
        request = pb.ReleaseRequest(allocation_id=alloc_id, release_id=uuid.uuid4().hex)
        answer = client._rpc.call("Release", request, pb.ReleaseResponse)
    except GpuLeaseError as e:
        (h.unknown if e.code in UNKNOWN_CODES else h.fail)(e, alloc_id)
        raise
    h.ok(alloc_id, revision=int(answer.revision), found=bool(answer.released))
    return bool(answer.released)


def recorded_keepalive(history: History, process: str, client: Client, alloc_id: str) -> int:
    h = history.invoke("keepalive", process, alloc_id)
    try:
        ttl = int(client.keep_alive(alloc_id))
    except GpuLeaseError as e:
        (h.unknown if e.code in UNKNOWN_CODES else h.fail)(e, alloc_id)
        raise
    h.ok(alloc_id, found=ttl > 0, ttl=ttl)
    return ttl


def check_history(history: History, etcd_urls: list[str], prefix: str, *, expired: set[str] = frozenset(),
                  quiet_s: float = 0.0) -> None:  # fmt: skip
    """The history checker on a scenario's ops and what etcd holds now; with quiet_s, also what is
    still held after that long (every allocation should have been released or have lapsed)."""
    final = read_allocations(etcd_urls, prefix)
    leaked = wait_quiet(lambda: read_allocations(etcd_urls, prefix), quiet_s) if quiet_s else None
    violations = check(history, final_allocations=final, quiet_leaked=leaked, expired=expired)
    assert not violations, summary(violations)
