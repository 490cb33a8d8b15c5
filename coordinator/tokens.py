"""Bearer tokens: made by admins, stored as hashes, checked from memory on every call.

A token is 256 random bits (``gpl_`` + 43 URL-safe characters). etcd holds only its SHA-256 (a
slow hash buys nothing against 256 random bits) under tokens/<name>, with the role, the tenant
and the expiry. Every replica's view follows tokens/ through its watch, so checking a token costs
no etcd call, and a revoke (a delete) reaches every replica within the watch's latency, well
under a second.

Bootstrap, after Nomad's `acl bootstrap`: the first coordinator to start against an empty prefix
makes one admin token and writes it to --bootstrap-token-file (mode 0600, never to a log). The
bootstrapped key makes it happen once for the cluster, however many replicas race.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from gpulease.common.identity import NAME_RE, Kind, Principal, Role, parse_role
from gpulease.coordinator.audit import AuditLog
from gpulease.coordinator.keys import Keys
from gpulease.coordinator.store import Cmp, Delete, Put, Store
from gpulease.coordinator.view import ClusterView
from gpulease.errors import AlreadyExists, InvalidRequest, NotFound

log = logging.getLogger(__name__)

TOKEN_PREFIX = "gpl_"
BOOTSTRAP_NAME = "bootstrap-admin"
MAX_TOKEN_TTL_S = 10 * 365 * 86400


@dataclass(frozen=True)
class TokenRecord:
    name: str
    digest: str
    role: Role
    tenant: str
    created_ms: int
    expires_ms: int  # 0: never
    created_by: str

    def principal(self) -> Principal:
        return Principal(Kind.USER, self.name, self.role, self.tenant)

    def expired(self, now_ms: int) -> bool:
        return bool(self.expires_ms) and now_ms >= self.expires_ms


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def encode(r: TokenRecord) -> bytes:
    doc = {"sha256": r.digest, "role": r.role.value, "tenant": r.tenant, "created_ms": r.created_ms,
           "expires_ms": r.expires_ms, "by": r.created_by}  # fmt: skip
    return json.dumps(doc, separators=(",", ":")).encode()


def decode(name: str, raw: bytes) -> TokenRecord | None:
    try:
        d = json.loads(raw)
        return TokenRecord(name, str(d["sha256"]), Role(d["role"]), str(d.get("tenant") or name),
                           int(d.get("created_ms", 0)), int(d.get("expires_ms", 0)), str(d.get("by", "")))  # fmt: skip
    except (ValueError, KeyError, TypeError):
        log.warning("token record %s is unreadable; ignoring it", name)
        return None


class Tokens:
    def __init__(self, store: Store, keys: Keys, view: ClusterView, audit: AuditLog) -> None:
        self._store = store
        self._keys = keys
        self._view = view
        self._audit = audit
        self._by_digest: dict[str, TokenRecord] = {}
        self._version = -1

    def _index(self) -> dict[str, TokenRecord]:
        # Rebuilt when the view's tokens table changed: tokens are few and change rarely.
        if self._version != self._view.table_version("tokens"):
            records = (decode(n, raw) for n, raw in self._view.table("tokens").items())
            self._by_digest = {r.digest: r for r in records if r}
            self._version = self._view.table_version("tokens")
        return self._by_digest

    def lookup(self, secret: str) -> TokenRecord | None:
        """The live token with this secret, or None (unknown, revoked or expired). No etcd call."""
        if not secret.startswith(TOKEN_PREFIX):
            return None
        d = digest(secret)
        record = self._index().get(d)
        if record is None or not hmac.compare_digest(record.digest, d):
            return None
        return None if record.expired(int(time.time() * 1000)) else record

    def list(self) -> list[TokenRecord]:
        return sorted(self._index().values(), key=lambda r: r.name)

    async def create(
        self, by: Principal, name: str, role: str, tenant: str = "", ttl_s: int = 0
    ) -> tuple[str, TokenRecord]:
        """A new token; returns (secret, record). The secret is not kept anywhere."""
        if not NAME_RE.match(name):
            raise InvalidRequest(f"{name!r} is not a valid token name: use 1-63 letters, digits, '.', '_' or '-'")
        if tenant and not NAME_RE.match(tenant):
            raise InvalidRequest(f"{tenant!r} is not a valid tenant name")
        try:
            role_ = parse_role(role)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        if not 0 <= ttl_s <= MAX_TOKEN_TTL_S:
            raise InvalidRequest(f"a token's lifetime must be 0 (never expires) to {MAX_TOKEN_TTL_S}s")
        secret = new_secret()
        now = int(time.time() * 1000)
        record = TokenRecord(
            name, digest(secret), role_, tenant or name, now, now + ttl_s * 1000 if ttl_s else 0, by.id
        )
        key = self._keys.token(name)
        audit = self._audit.entry_put(by, "token-create", name, detail=f"role={role_.value} tenant={record.tenant}")
        out = await self._store.txn([Cmp(key, "create", "==", 0)], [Put(key, encode(record)), audit])
        if not out.succeeded:
            raise AlreadyExists(f"a token named {name!r} exists; revoke it first or pick another name")
        await self._view.wait_for_revision(out.revision, 1.0)  # usable on this replica once answered
        return secret, record

    async def revoke(self, by: Principal, name: str) -> int:
        key = self._keys.token(name)
        audit = self._audit.entry_put(by, "token-revoke", name)
        out = await self._store.txn([Cmp(key, "create", ">", 0)], [Delete(key), audit])
        if not out.succeeded:
            raise NotFound(f"no token named {name!r}")
        await self._view.wait_for_revision(out.revision, 1.0)
        return out.revision

    async def bootstrap(self, path: str) -> bool:
        """Make the first admin token and write it to ``path`` (0600), once per cluster. True when
        this call made it. The file is written before the transaction and removed if another
        replica won, so a crash can leave at most an unused file, never a token nobody has."""
        if not path:
            return False
        target = Path(path)
        if (await self._store.get(self._keys.bootstrapped())) is not None:
            return False
        secret = new_secret()
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        now = int(time.time() * 1000)
        record = TokenRecord(BOOTSTRAP_NAME, digest(secret), Role.ADMIN, "admin", now, 0, "bootstrap")
        marker, key = self._keys.bootstrapped(), self._keys.token(BOOTSTRAP_NAME)
        try:
            out = await self._store.txn(
                [Cmp(marker, "create", "==", 0), Cmp(key, "create", "==", 0)],
                [Put(marker, b""), Put(key, encode(record)),
                 self._audit.entry_put("bootstrap", "token-create", BOOTSTRAP_NAME, detail="role=admin")],
            )  # fmt: skip
        except Exception:
            # The outcome may be unknown: keep the file only if the stored token is this one.
            kv = await self._store.get(key)
            stored = decode(BOOTSTRAP_NAME, kv.value) if kv else None
            if stored is None or stored.digest != record.digest:
                tmp.unlink(missing_ok=True)
                raise
            out = None
        if out is not None and not out.succeeded:
            tmp.unlink(missing_ok=True)
            return False
        os.replace(tmp, target)
        log.info("bootstrap: the first admin token was written to %s (mode 0600)", target)
        return True
