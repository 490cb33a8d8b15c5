"""Who is asking: the principal a verified connection or token names, and how certificates say it.

Identity comes only from the connection (a verified client certificate, or a bearer token the
coordinator recognises), never from a field of the request. A certificate names its holder in a
URI subject alternative name, SPIFFE style, so that an existing PKI (step-ca, Vault,
cert-manager) can issue them too:

    spiffe://gpulease/coordinator/<name>     a coordinator replica
    spiffe://gpulease/agent/<node>           the agent of one node (and nothing else)
    spiffe://gpulease/user/<name>            a user; role and tenant from the subject's
                                             OU (role) and O (tenant), defaults user / <name>

Pure data and parsing: no grpc, no cryptography, so both daemons and the client side share it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

SPIFFE_PREFIX = "spiffe://gpulease/"
# Same rule as node names: safe in etcd keys, logs and DNS names.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class Kind(StrEnum):
    USER = "user"
    AGENT = "agent"
    COORDINATOR = "coordinator"
    # A clear-text coordinator trusts every caller (loopback only, or --insecure): one local admin.
    LOCAL = "local"


class Role(StrEnum):
    ADMIN = "admin"
    USER = "user"
    VIEWER = "viewer"


ROLE_NAMES = tuple(r.value for r in Role)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. ``name`` is unique per kind; ``tenant`` is what quotas count."""

    kind: Kind
    name: str
    role: Role | None = None  # users (and the local admin) only
    tenant: str = ""

    @property
    def id(self) -> str:
        """'user:alice', 'agent:node-1': what allocations record as their owner and audit as actor."""
        return f"{self.kind.value}:{self.name}"

    @property
    def node(self) -> str | None:
        """The one node an agent may speak for (Kubernetes' NodeRestriction)."""
        return self.name if self.kind is Kind.AGENT else None

    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    def __str__(self) -> str:
        return self.id


LOCAL_ADMIN = Principal(Kind.LOCAL, "local", Role.ADMIN, "local")


def uri_for(kind: Kind, name: str) -> str:
    return f"{SPIFFE_PREFIX}{kind.value}/{name}"


def parse_uri(uri: str) -> tuple[Kind, str] | None:
    """'spiffe://gpulease/agent/n1' -> (Kind.AGENT, 'n1'); None for any other URI."""
    if not uri.startswith(SPIFFE_PREFIX):
        return None
    kind, _, name = uri[len(SPIFFE_PREFIX) :].partition("/")
    if kind not in (Kind.USER.value, Kind.AGENT.value, Kind.COORDINATOR.value) or not NAME_RE.match(name):
        return None
    return Kind(kind), name


def parse_role(text: str) -> Role:
    try:
        return Role(text)
    except ValueError:
        raise ValueError(f"unknown role {text!r}: use one of {', '.join(ROLE_NAMES)}") from None
