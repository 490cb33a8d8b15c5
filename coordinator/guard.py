"""Every RPC passes here first: who is asking (from the connection only), may they, and not too often.

    @rpc
    async def Release(self, request, context): ...  # caller() is the authenticated Principal

Identity comes from a verified client certificate (the mutual-TLS port) or from a bearer token
(`authorization: Bearer <token>` metadata, on a TLS connection), never from a request field. A
coordinator without TLS (loopback, or --insecure) trusts every caller as the local admin: that is
the one-team dev mode, which the transport rules confine. Refusals are UNAUTHENTICATED (no or a bad
credential) or PERMISSION_DENIED (a rule of coordinator/authz.py), and each is audited.

Per-caller rate limiting (a token bucket per authenticated principal) answers
RESOURCE_EXHAUSTED with reason RATE_LIMITED.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from gpulease.common import pki
from gpulease.common.grpc_errors import grpc_errors
from gpulease.common.identity import LOCAL_ADMIN, Principal
from gpulease.coordinator import authz
from gpulease.coordinator.audit import AuditLog
from gpulease.coordinator.tokens import Tokens
from gpulease.errors import GpuLeaseError, PermissionDenied, RateLimited, Unauthenticated, Unavailable

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
_CALLER: ContextVar[Principal] = ContextVar("gpulease_caller")
_METHOD: ContextVar[str] = ContextVar("gpulease_auth_method")
_BUCKETS_KEPT = 65536


def caller() -> Principal:
    """The authenticated caller of the RPC being served (set by @rpc before the method runs)."""
    return _CALLER.get()


def auth_method() -> str:
    return _METHOD.get("none")


@dataclass(frozen=True)
class RateLimit:
    per_second: float = 200.0  # 0: no limit
    burst: float = 400.0


class _Buckets:
    def __init__(self, limit: RateLimit) -> None:
        self._limit = limit
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> bool:
        if self._limit.per_second <= 0:
            return True
        now = time.monotonic()
        tokens, at = self._buckets.pop(key, (self._limit.burst, now))
        tokens = min(self._limit.burst, tokens + (now - at) * self._limit.per_second)
        ok = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if ok else tokens, now)
        while len(self._buckets) > _BUCKETS_KEPT:
            self._buckets.popitem(last=False)
        return ok


class Guard:
    def __init__(self, tokens: Tokens | None, audit: AuditLog | None, *, tls: bool, rate: RateLimit | None = None):
        self._tokens = tokens
        self._audit = audit
        self.tls = tls
        self._rate = rate or RateLimit()
        self._buckets = _Buckets(self._rate)
        # Told of every RPC served through @rpc: (method name, "ok" | "error" | "cancelled", the
        # error's reason, seconds). The coordinator's metrics (coordinator/metrics.py); None: off.
        self.observer: Callable[[str, str, str, float], None] | None = None

    def identify(self, context: Any) -> tuple[Principal, str]:
        if not self.tls:
            return LOCAL_ADMIN, "none"
        auth = context.auth_context() or {}
        pems = auth.get("x509_pem_cert")
        if pems:
            who = pki.principal_of(bytes(pems[0]))
            if who is None:
                raise Unauthenticated(
                    "the client certificate names no gpulease identity (it needs one URI SAN "
                    "spiffe://gpulease/<user|agent|coordinator>/<name>)"
                )
            return who, "certificate"
        secret = ""
        for key, value in context.invocation_metadata() or ():
            if key == AUTHORIZATION:
                text = value.decode() if isinstance(value, bytes) else str(value)
                scheme, _, secret = text.partition(" ")
                if scheme.lower() != "bearer":
                    raise Unauthenticated("the authorization metadata must be 'Bearer <token>'")
                secret = secret.strip()
                break
        if not secret:
            raise Unauthenticated(
                "no credentials: give a token (GPULEASE_TOKEN_FILE or --token-file) or a client certificate "
                "(--cert/--key, on the coordinator's mutual-TLS port)"
            )
        record = self._tokens.lookup(secret) if self._tokens else None
        if record is None:  # never echo the token, not even in part
            raise Unauthenticated("the token is not valid: unknown, revoked or expired")
        return record.principal(), "token"

    def admit(self, rpc: str, context: Any) -> Principal:
        try:
            who, method = self.identify(context)
        except Unauthenticated as exc:
            self._deny(f"anonymous@{_peer(context)}", rpc, exc)
            raise
        try:
            authz.check(rpc, who)
        except PermissionDenied as exc:
            self._deny(who, rpc, exc)
            raise
        # Clear text has no caller identity (everyone is the local admin): nothing to limit per caller.
        if self.tls and not self._buckets.take(who.id):
            raise RateLimited(f"{who} sent more than {self._rate.per_second:g} requests a second; slow down")
        _CALLER.set(who)
        _METHOD.set(method)
        return who

    def deny_later(self, who: Principal, rpc: str, exc: PermissionDenied) -> None:
        """An object-level refusal (not the caller's allocation, another node): audited too."""
        self._deny(who, rpc, exc)

    def _deny(self, who: Principal | str, rpc: str, exc: Exception) -> None:
        log.info("refused %s for %s: %s", rpc, who, exc)
        if self._audit is not None:
            self._audit.denied(who, rpc, getattr(exc, "reason", "DENIED"))


def _peer(context: Any) -> str:
    """The caller's address without its port ('ipv4:10.0.0.5'): refusals are audited per actor at
    a bounded rate, and a flood from one host must not count as a new actor per connection."""
    try:
        peer = str(context.peer())
    except Exception:
        return "unknown"
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() and host not in ("ipv4", "ipv6") else peer


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def rpc(fn: F) -> F:
    """Error catalog + guard for a servicer method. The servicer has ``SERVICE`` (its full name)
    and ``_guard``; object-level refusals raised by the method are audited as well."""

    @functools.wraps(fn)
    async def guarded(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        name = f"{self.SERVICE}/{fn.__name__}"
        who = self._guard.admit(name, context)
        try:
            return await fn(self, request, context)
        except PermissionDenied as exc:
            self._guard.deny_later(who, name, exc)
            raise
        except Unavailable as exc:
            # Its text names etcd URLs or agents' addresses: for operators' eyes only.
            if who.is_admin():
                raise
            error_id = secrets.token_hex(6)
            log.warning("%s for %s unavailable (error id %s): %s", name, who, error_id, exc.message)
            raise Unavailable(
                f"the cluster cannot serve this now; retry in a moment (error id {error_id}; an operator "
                "can find the cause in the coordinator's log)"
            ) from None

    @functools.wraps(fn)
    async def observed(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        observe = self._guard.observer
        if observe is None:
            return await guarded(self, request, context)
        started = time.monotonic()
        outcome, reason = "error", "INTERNAL"
        try:
            result = await guarded(self, request, context)
            outcome, reason = "ok", ""
            return result
        except GpuLeaseError as exc:
            reason = exc.reason
            raise
        except asyncio.CancelledError:
            outcome, reason = "cancelled", ""
            raise
        finally:
            observe(fn.__name__, outcome, reason, time.monotonic() - started)

    return grpc_errors(observed)  # type: ignore[return-value]
