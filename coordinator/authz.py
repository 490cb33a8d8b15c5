"""Who may call what: one rule per RPC, and the ownership and node checks that go with them.

The table is keyed by the full RPC name and covers every RPC of every service; a test builds the
authorization matrix from the service descriptors, so a new RPC without a rule fails it. Rules:

    read      any user role (viewer, user, admin): the cluster's state is visible to everyone
    use       user or admin: may create allocations
    owner     user or admin, and the allocation must be the caller's own (admins: any)
    admin     admin only
    node      an agent, about its own node only (Kubernetes' NodeRestriction)

Agents and coordinators call nothing but NodeService; users never call NodeService.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from gpulease.common.identity import Kind, Principal, Role
from gpulease.errors import PermissionDenied
from gpulease.v1 import coordinator_pb2


class Rule(StrEnum):
    READ = "read"
    USE = "use"
    OWNER = "owner"
    ADMIN = "admin"
    NODE = "node"


_C = "gpulease.v1.CoordinatorService/"
_N = "gpulease.v1.NodeService/"
_A = "gpulease.v1.AdminService/"

RULES: dict[str, Rule] = {
    _C + "Allocate": Rule.USE,
    _C + "WaitAllocate": Rule.USE,
    _C + "ListPending": Rule.READ,
    _C + "Release": Rule.OWNER,
    # A request id is scoped to its caller: one can only cancel one's own.
    _C + "CancelRequest": Rule.USE,
    _C + "KeepAlive": Rule.OWNER,
    _C + "GetAllocation": Rule.OWNER,
    _C + "ListAllocations": Rule.READ,
    _C + "ListNodes": Rule.READ,
    _C + "GetClusterSummary": Rule.READ,
    _C + "WhoAmI": Rule.READ,
    _C + "ListQuotas": Rule.READ,
    _C + "ListPriorityClasses": Rule.READ,
    _C + "ListReservations": Rule.READ,
    _C + "WatchEvents": Rule.READ,
    _C + "RunContainer": Rule.OWNER,
    _C + "WaitContainer": Rule.OWNER,
    _C + "StreamLogs": Rule.OWNER,
    _C + "StopContainer": Rule.OWNER,
    _C + "ListContainers": Rule.OWNER,
    _N + "RegisterNode": Rule.NODE,
    _N + "Heartbeat": Rule.NODE,
    _N + "ListNodeAllocations": Rule.NODE,
    _N + "GetNodeAllocation": Rule.NODE,
    _A + "CordonNode": Rule.ADMIN,
    _A + "DeleteNode": Rule.ADMIN,
    _A + "GetStats": Rule.ADMIN,
    _A + "CreateToken": Rule.ADMIN,
    _A + "ListTokens": Rule.ADMIN,
    _A + "RevokeToken": Rule.ADMIN,
    _A + "ReadAudit": Rule.ADMIN,
    _A + "SetQuota": Rule.ADMIN,
    _A + "DeleteQuota": Rule.ADMIN,
    _A + "SetPriorityClass": Rule.ADMIN,
    _A + "DeletePriorityClass": Rule.ADMIN,
    _A + "CreateReservation": Rule.ADMIN,
    _A + "DeleteReservation": Rule.ADMIN,
}

_ROLES = {
    Rule.READ: (Role.VIEWER, Role.USER, Role.ADMIN),
    Rule.USE: (Role.USER, Role.ADMIN),
    Rule.OWNER: (Role.USER, Role.ADMIN),
    Rule.ADMIN: (Role.ADMIN,),
}


def all_rpcs() -> list[str]:
    """Every RPC the coordinator serves, from the descriptors (what RULES must cover)."""
    return [
        f"{service.full_name}/{method.name}"
        for service in coordinator_pb2.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    ]


@dataclass(frozen=True)
class Denied:
    rule: Rule
    why: str


def check(rpc: str, who: Principal) -> Rule:
    """The rule of ``rpc`` if ``who`` passes its role part; PermissionDenied naming the rule otherwise.
    The object part (whose allocation, which node) is checked by check_owner / check_node."""
    rule = RULES.get(rpc)
    if rule is None:  # unreachable while the table test passes; refuse rather than allow
        raise PermissionDenied(f"{rpc} has no authorization rule; refused")
    if who.kind is Kind.LOCAL:  # a clear-text coordinator (loopback or --insecure) trusts its callers
        return rule
    if rule is Rule.NODE:
        if who.kind is not Kind.AGENT:
            raise PermissionDenied(f"rule '{rule}': only an agent's certificate may call {_short(rpc)}, not {who}")
        return rule
    if who.kind is Kind.AGENT or who.kind is Kind.COORDINATOR:
        raise PermissionDenied(f"rule '{rule}': {who} is not a user; agents may only call NodeService")
    if who.role not in _ROLES[rule]:
        allowed = " or ".join(r.value for r in _ROLES[rule])
        raise PermissionDenied(f"rule '{rule}': {_short(rpc)} needs role {allowed}; {who} has role {who.role}")
    return rule


def check_owner(who: Principal, owner: str, what: str) -> None:
    """An allocation (or what remains of it) is its owner's and the admins'. Records made before
    ownership existed have no owner: admins only."""
    if who.is_admin() or (owner and owner == who.id):
        return
    raise PermissionDenied(f"rule 'owner': {what} belongs to {owner or 'nobody recorded'}, not to {who}")


def check_tenant(who: Principal, tenant: str) -> str:
    """The tenant a request counts against: the caller's own, or another one named by an admin
    (with auth off every caller is the local admin, so a dev cluster may name any tenant)."""
    if not tenant or tenant == who.tenant or who.is_admin():
        return tenant or who.tenant
    raise PermissionDenied(f"rule 'tenant': {who} belongs to tenant {who.tenant!r} and may not count a request "
                           f"against tenant {tenant!r} (only admins may)")  # fmt: skip


def check_node(who: Principal, node: str | Sequence[str]) -> None:
    """An agent speaks only for the node its certificate names. ``node`` may list a gang's member
    nodes: the agent of any member may read the allocation (as seen on its node), no other."""
    if who.kind is Kind.LOCAL:
        return
    nodes = (node,) if isinstance(node, str) else tuple(node)
    if who.node not in nodes:
        named = repr(nodes[0]) if len(nodes) == 1 else f"the gang's member nodes {', '.join(nodes)}"
        raise PermissionDenied(
            f"rule 'node': {who} may act only for node {who.node}, not for {'node ' if len(nodes) == 1 else ''}{named}"
        )


def _short(rpc: str) -> str:
    return rpc.rsplit("/", 1)[-1]
