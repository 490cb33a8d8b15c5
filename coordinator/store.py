"""The only module that imports etcd3aio: a small typed facade over the etcd calls we use.

Transactions run with max_attempts=1. A transport error during a Txn means the outcome is
unknown (it may still commit), so the store raises OutcomeUnknown and leaves the decision
to the caller, which knows how to check (the request key) and how to fence (revoke the lease).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import grpc
from etcd3aio import Etcd3Client, EtcdError
from etcd3aio._protobuf import (
    Compare,
    LeaseKeepAliveRequest,
    LeaseStub,
    WatchCreateRequest,
    WatchRequest,
    WatchStub,
)
from etcd3aio.kv import KVService
from etcd3aio.lease import LeaseService

from gpulease.errors import InvalidRequest, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")
# etcd's auth tokens expire (simple tokens after --auth-token-ttl, 300 s by default, of disuse;
# JWTs at their TTL): authenticate again well before.
AUTH_REFRESH_S = 120.0


@dataclass(frozen=True)
class TlsFiles:
    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True)
class Event:
    kind: Literal["put", "delete"]
    kv: KV


@dataclass(frozen=True)
class Renewal:
    ttl: int  # <= 0: the lease is gone
    revision: int  # etcd's revision when it answered


@dataclass(frozen=True)
class WatchBatch:
    # The revision of the last event in `events`: what a consumer that applied them has seen.
    # Never a response header's revision (see Store.watch).
    revision: int
    events: tuple[Event, ...]
    # The watch could not resume (history compacted or stream cancelled): reload everything.
    resync: bool = False


@dataclass(frozen=True)
class Cmp:
    key: str
    target: Literal["version", "mod", "create", "lease"]
    op: Literal["==", "!=", "<", ">"]
    value: int
    range_end: bytes | None = None


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Get:
    key: str
    range_end: bytes | None = None


@dataclass(frozen=True)
class Delete:
    key: str


Op = Put | Get | Delete


@dataclass(frozen=True)
class TxnOutcome:
    succeeded: bool
    revision: int
    # One list of KVs per Get in the branch that ran, in order.
    reads: tuple[tuple[KV, ...], ...]


class StoreUnavailable(Unavailable):
    pass


class OutcomeUnknown(StoreUnavailable):
    """A transaction was sent but no answer came back: it may or may not have committed."""


class LeaseNotFound(Exception):
    pass


_OPS = {"==": 0, ">": 1, "<": 2, "!=": 3}  # etcdserverpb.Compare.CompareResult


def parse_endpoints(urls: Sequence[str]) -> tuple[list[str], str | None]:
    """http(s)://host:port URLs -> ipv4 'ip:port' targets (what etcd3aio dials) and a TLS name.

    etcd3aio dials an 'ipv4:' target list, so host names are resolved once here.
    """
    if not urls:
        raise InvalidRequest("no etcd endpoint given: pass --etcd http://HOST:2379[,http://HOST2:2379]")
    targets: list[str] = []
    tls_name: str | None = None
    for url in urls:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname or not parts.port:
            raise InvalidRequest(f"bad etcd endpoint {url!r}: expected http://HOST:PORT or https://HOST:PORT")
        host = parts.hostname
        try:
            ip = socket.getaddrinfo(host, parts.port, socket.AF_INET)[0][4][0]
        except OSError as exc:
            raise StoreUnavailable(f"cannot resolve etcd host {host!r} from --etcd {url}: {exc}") from exc
        if ip != host:
            tls_name = tls_name or host
        targets.append(f"{ip}:{parts.port}")
    return targets, tls_name


def _kv(pb: Any) -> KV:
    return KV(
        key=pb.key.decode(),
        value=bytes(pb.value),
        create_revision=pb.create_revision,
        mod_revision=pb.mod_revision,
        version=pb.version,
        lease=pb.lease,
    )


class Store:
    def __init__(
        self, urls: Sequence[str], *, tls: TlsFiles | None = None, timeout: float = 5.0,
        user: str = "", password: str = "",
    ) -> None:  # fmt: skip
        self.urls = tuple(urls)
        # etcd's own auth (username/password): a token from Authenticate, sent on every call and
        # on our own streams, renewed every AUTH_REFRESH_S (etcd's tokens expire).
        self._user = user
        self._password = password
        self._token = ""
        self._auth_task: asyncio.Task[None] | None = None
        # Read at construction (synchronously, once): a missing file fails at startup.
        self._tls_bytes: tuple[bytes | None, bytes | None, bytes | None] = (None, None, None)
        if tls:
            try:
                self._tls_bytes = (
                    Path(tls.ca_file).read_bytes(),
                    Path(tls.cert_file).read_bytes() if tls.cert_file else None,
                    Path(tls.key_file).read_bytes() if tls.key_file else None,
                )
            except OSError as exc:
                raise InvalidRequest(f"cannot read etcd TLS file: {exc}") from exc
        self._timeout = timeout
        self._client: Etcd3Client | None = None
        self._keepalives: _KeepAliveMux | None = None
        # Called with the seconds each transaction took, answered or not (the coordinator's metrics).
        self.on_txn: Callable[[float], None] | None = None

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(
            f"etcd at {','.join(self.urls)} is unreachable ({type(exc).__name__}: {exc}); "
            "check the coordinator's --etcd URL and that etcd is running"
        )

    async def start(self) -> None:
        targets, tls_name = parse_endpoints(self.urls)
        ca, cert, key = self._tls_bytes
        self._client = Etcd3Client(
            targets, tls_server_name=tls_name if ca else None, ca_cert=ca, cert_chain=cert, cert_key=key
        )
        await self._client.connect()
        if self._user:
            await self._authenticate()
            self._auth_task = asyncio.create_task(self._keep_authenticated(), name="etcd-auth")

    async def _authenticate(self) -> None:
        assert self._client is not None and self._client.auth is not None
        try:
            resp = await self._client.auth.authenticate(self._user, self._password, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                              grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):  # fmt: skip
                # Never the password; etcd's words say whether the user or the password is wrong.
                raise InvalidRequest(f"etcd refused user {self._user!r}: {exc.details()}") from None
            raise self._unavailable(exc) from exc
        self._token = str(resp.token)
        self._client.set_token(self._token)

    async def _keep_authenticated(self) -> None:
        while True:
            await asyncio.sleep(AUTH_REFRESH_S)
            try:
                await self._authenticate()
            except Exception as exc:  # the current token may still be good; retried next round
                log.warning("etcd: renewing the auth token failed: %s", exc)

    def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        return (("token", self._token),) if self._token else None

    async def close(self) -> None:
        if self._auth_task is not None:
            self._auth_task.cancel()
            await asyncio.gather(self._auth_task, return_exceptions=True)
            self._auth_task = None
        if self._keepalives is not None:
            await self._keepalives.close()
            self._keepalives = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    @property
    def _kv(self) -> KVService:
        if self._client is None or self._client.kv is None:
            raise RuntimeError("store not started")
        return self._client.kv

    @property
    def _lease(self) -> LeaseService:
        if self._client is None or self._client.lease is None:
            raise RuntimeError("store not started")
        return self._client.lease

    async def _call(self, coro: Awaitable[T]) -> T:
        # Callers pass timeout=self._timeout to etcd3aio (a gRPC deadline per attempt, inside an
        # asyncio.timeout): no extra task per call, which matters on the allocation hot path.
        try:
            return await coro
        except (EtcdError, TimeoutError, grpc.aio.AioRpcError) as exc:
            if isinstance(exc, grpc.aio.AioRpcError) and exc.code() not in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.CANCELLED,
            ):
                raise
            raise self._unavailable(exc) from exc

    # --- reads -------------------------------------------------------------------------

    async def get(self, key: str) -> KV | None:
        resp = await self._call(self._kv.get(key, timeout=self._timeout))
        kvs = resp.kvs
        return _kv(kvs[0]) if kvs else None

    async def get_prefix(self, prefix: str, range_end: bytes, *, page: int = 2000) -> tuple[int, list[KV]]:
        """Linearizable read of a whole range: (revision, kvs), in pages at one revision.

        One response per page keeps every message far below gRPC's 4 MiB default (10,000 node
        records are ~13 MB); pinning the first page's revision keeps the pages consistent.
        """
        revision = 0
        start = prefix.encode()
        out: list[KV] = []
        while True:
            resp = await self._call(
                self._kv.get(start, range_end=range_end, revision=revision, limit=page, timeout=self._timeout)
            )
            if revision == 0:
                revision = int(resp.header.revision)
            out.extend(_kv(kv) for kv in resp.kvs)
            if not resp.more or not resp.kvs:
                return revision, out
            start = bytes(resp.kvs[-1].key) + b"\x00"

    async def watch(self, prefix: str, range_end: bytes, start_revision: int) -> AsyncIterator[WatchBatch]:
        """Every event from start_revision on, batch by batch, each batch ending on a whole revision.

        A batch's revision is its last event's, never the response header's: etcd stamps every
        response (the `created` one, each part of a long catch-up) with its *current* revision,
        which is ahead of the events delivered so far. A view that took the header as "applied up
        to" would place on state it has not seen, and pass the `res/` compare with it (issue 11,
        defect 1). etcd cuts watch batches only between revisions (unless fragmenting, which we
        never ask for), so after a batch every event up to its revision has been delivered.

        The stream is our own rather than etcd3aio's watch, which reconnects from the last header
        revision + 1 and so would skip, for good, events between the last one delivered and that
        header. Here a broken stream is reopened from the last delivered event + 1; if etcd has
        compacted that history meanwhile, a resync batch tells the consumer to reload.
        Errors other than transport ones end the iteration with StoreUnavailable.
        """
        if self._client is None or self._client._channel is None:
            raise RuntimeError("store not started")
        stub = WatchStub(self._client._channel)
        next_revision = start_revision
        backoff = 0.1
        while True:
            opened = WatchCreateRequest(key=prefix.encode(), range_end=range_end, start_revision=next_revision)

            async def requests(create: WatchCreateRequest = opened) -> AsyncIterator[WatchRequest]:
                yield WatchRequest(create_request=create)
                await asyncio.Event().wait()  # keep the request side open for the stream's life

            stream = stub.Watch(requests(), metadata=self._metadata())
            try:
                async for resp in stream:
                    if resp.compact_revision > 0 or resp.canceled:
                        yield WatchBatch(next_revision - 1, (), resync=True)
                        return
                    backoff = 0.1
                    if not resp.events:  # created / progress: the header revision proves nothing here
                        continue
                    events = tuple(Event("delete" if ev.type == 1 else "put", _kv(ev.kv)) for ev in resp.events)
                    last = events[-1].kv.mod_revision
                    next_revision = last + 1
                    yield WatchBatch(last, events)
                why = "the stream ended"
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                      grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN):  # fmt: skip
                    raise self._unavailable(exc) from exc
                why = exc.code().name
            finally:
                stream.cancel()
            log.warning("etcd watch broke (%s); reopening from revision %d in %.1fs", why, next_revision, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    # --- leases ------------------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        resp = await self._call(self._lease.grant(ttl, timeout=self._timeout))
        return int(resp.ID)

    async def revoke(self, lease_id: int) -> int:
        """Revision at which the lease and its keys were deleted; 0 if the lease was already gone."""
        try:
            resp = await self._call(self._lease.revoke(lease_id, timeout=self._timeout))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return 0
            raise
        return int(resp.header.revision)

    async def keepalive_once(self, lease_id: int) -> int:
        """Renew a lease once. Returns the TTL granted again; <= 0 means the lease is gone."""
        return (await self.keepalive(lease_id)).ttl

    async def keepalive(self, lease_id: int) -> Renewal:
        """Renew a lease once: the TTL granted again (<= 0: the lease is gone) and etcd's revision
        when it did.

        All renewals share one LeaseKeepAlive stream (10,000 heartbeating nodes would otherwise
        open and tear down a stream each, every few seconds).
        """
        if self._keepalives is None:
            assert self._client is not None
            self._keepalives = _KeepAliveMux(LeaseStub(self._client._channel), self._unavailable, self._metadata)
        return await self._keepalives.renew(lease_id, self._timeout)

    # --- writes ------------------------------------------------------------------------

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Returns the revision of the put; LeaseNotFound if ``lease`` is gone."""
        try:
            resp = await self._call(self._kv.put(key, value, lease=lease, timeout=self._timeout))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:  # "requested lease not found"
                raise LeaseNotFound(exc.details() or "lease not found") from exc
            raise
        return int(resp.header.revision)

    async def delete(self, key: str) -> int:
        """Returns the revision after the delete."""
        resp = await self._call(self._kv.delete(key, timeout=self._timeout))
        return int(resp.header.revision)

    async def delete_range(self, key: str, range_end: bytes) -> int:
        """Delete every key in [key, range_end); returns how many were deleted."""
        resp = await self._call(self._kv.delete(key, range_end=range_end, timeout=self._timeout))
        return int(resp.deleted)

    async def txn(self, compares: Sequence[Cmp], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnOutcome:
        """One etcd transaction, sent once. Raises OutcomeUnknown if no answer came back."""
        kv = self._kv
        pb_cmp = [self._cmp(c) for c in compares]
        pb_ok = [self._op(o) for o in success]
        pb_fail = [self._op(o) for o in failure]
        started = time.monotonic()
        try:
            resp = await kv.txn(pb_cmp, pb_ok, pb_fail, max_attempts=1, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:  # "requested lease not found"
                raise LeaseNotFound(exc.details() or "lease not found") from exc
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                              grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN):  # fmt: skip
                raise OutcomeUnknown(str(self._unavailable(exc))) from exc
            raise
        except (EtcdError, TimeoutError) as exc:
            raise OutcomeUnknown(str(self._unavailable(exc))) from exc
        finally:
            if self.on_txn is not None:
                self.on_txn(time.monotonic() - started)
        reads = tuple(
            tuple(_kv(kv_) for kv_ in r.response_range.kvs)
            for r in resp.responses
            if r.WhichOneof("response") == "response_range"
        )
        return TxnOutcome(resp.succeeded, resp.header.revision, reads)

    @staticmethod
    def _cmp(c: Cmp) -> object:
        op = _OPS[c.op]
        if c.target == "version":
            return KVService.txn_compare_version(c.key, c.value, result=op, range_end=c.range_end)
        if c.target == "create":
            return KVService.txn_compare_create_revision(c.key, c.value, result=op, range_end=c.range_end)
        if c.target == "lease":  # the key's lease (0: none, or no such key)
            return Compare(result=op, target=Compare.LEASE, key=c.key.encode(), lease=c.value,
                           range_end=c.range_end or b"")  # fmt: skip
        # etcd3aio has no builder for mod_revision compares; the message is the same Compare.
        return Compare(
            result=op, target=Compare.MOD, key=c.key.encode(), mod_revision=c.value,
            range_end=c.range_end or b"",
        )  # fmt: skip

    @staticmethod
    def _op(o: Op) -> object:
        if isinstance(o, Put):
            return KVService.txn_op_put(o.key, o.value, lease=o.lease)
        if isinstance(o, Get):
            return KVService.txn_op_get(o.key, range_end=o.range_end)
        return KVService.txn_op_delete(o.key)


class _KeepAliveMux:
    """One bidirectional LeaseKeepAlive stream for every renewal; answers matched by lease id."""

    def __init__(self, stub: Any, unavailable: Any, metadata: Any = lambda: None) -> None:
        self._stub = stub
        self._unavailable = unavailable
        self._metadata = metadata
        self._queue: asyncio.Queue[int] = asyncio.Queue()
        self._waiters: dict[int, list[asyncio.Future[Renewal]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def renew(self, lease_id: int, timeout: float) -> Renewal:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="lease-keepalive")
        fut: asyncio.Future[Renewal] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(lease_id, []).append(fut)
        self._queue.put_nowait(lease_id)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError as exc:
            raise self._unavailable(exc) from exc
        finally:
            waiting = self._waiters.get(lease_id)
            if waiting and fut in waiting:
                waiting.remove(fut)
                if not waiting:
                    del self._waiters[lease_id]

    async def _run(self) -> None:
        async def requests() -> AsyncIterator[Any]:
            while True:
                yield LeaseKeepAliveRequest(ID=await self._queue.get())

        call = self._stub.LeaseKeepAlive(requests(), metadata=self._metadata())
        try:
            async for resp in call:
                for fut in self._waiters.pop(resp.ID, []):
                    if not fut.done():
                        fut.set_result(Renewal(int(resp.TTL), int(resp.header.revision)))
        except grpc.aio.AioRpcError as exc:
            # Fail the waiters now rather than at their timeout; the next renew() reopens.
            for waiting in self._waiters.values():
                for fut in waiting:
                    if not fut.done():
                        fut.set_exception(self._unavailable(exc))
            self._waiters.clear()
        finally:
            call.cancel()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
