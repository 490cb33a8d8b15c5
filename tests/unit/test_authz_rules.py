"""The rule table covers every RPC the coordinator serves, and each rule admits exactly its roles.

The table is built from the service descriptors: an RPC added to the proto without a rule fails
here (and is refused at run time). The end-to-end matrix over real connections is in
tests/etcd/test_authorization_matrix.py.
"""

from __future__ import annotations

import pytest

from gpulease.common.identity import LOCAL_ADMIN, Kind, Principal, Role
from gpulease.coordinator import authz
from gpulease.errors import PermissionDenied

ADMIN = Principal(Kind.USER, "root", Role.ADMIN, "ops")
USER = Principal(Kind.USER, "alice", Role.USER, "ml")
OTHER = Principal(Kind.USER, "bob", Role.USER, "ml")
VIEWER = Principal(Kind.USER, "eve", Role.VIEWER, "ml")
AGENT = Principal(Kind.AGENT, "node-1")
COORD = Principal(Kind.COORDINATOR, "c1")

ALLOWED = {
    authz.Rule.READ: {ADMIN, USER, VIEWER, LOCAL_ADMIN},
    authz.Rule.USE: {ADMIN, USER, LOCAL_ADMIN},
    authz.Rule.OWNER: {ADMIN, USER, LOCAL_ADMIN},
    authz.Rule.ADMIN: {ADMIN, LOCAL_ADMIN},
    authz.Rule.NODE: {AGENT, LOCAL_ADMIN},
}


def test_every_rpc_has_exactly_one_rule() -> None:
    rpcs = authz.all_rpcs()
    assert len(rpcs) == len(set(rpcs))
    assert set(rpcs) == set(authz.RULES), (
        f"missing rules: {sorted(set(rpcs) - set(authz.RULES))}; stale rules: {sorted(set(authz.RULES) - set(rpcs))}"
    )


@pytest.mark.parametrize("rpc", authz.all_rpcs())
@pytest.mark.parametrize("who", [ADMIN, USER, VIEWER, AGENT, COORD, LOCAL_ADMIN], ids=str)
def test_role_part_of_each_rule(rpc: str, who: Principal) -> None:
    rule = authz.RULES[rpc]
    if who in ALLOWED[rule]:
        assert authz.check(rpc, who) is rule
    else:
        with pytest.raises(PermissionDenied) as err:
            authz.check(rpc, who)
        assert f"rule '{rule}'" in err.value.message


def test_unknown_rpc_is_refused_not_allowed() -> None:
    with pytest.raises(PermissionDenied):
        authz.check("gpulease.v1.CoordinatorService/Nope", ADMIN)


def test_owner_and_node_checks() -> None:
    authz.check_owner(USER, USER.id, "allocation a")
    authz.check_owner(ADMIN, USER.id, "allocation a")
    for who, owner in ((OTHER, USER.id), (VIEWER, USER.id), (USER, "")):
        with pytest.raises(PermissionDenied, match="rule 'owner'"):
            authz.check_owner(who, owner, "allocation a")
    authz.check_node(AGENT, "node-1")
    with pytest.raises(PermissionDenied, match="rule 'node'"):
        authz.check_node(AGENT, "node-2")
    with pytest.raises(PermissionDenied):
        authz.check_node(USER, "node-1")
