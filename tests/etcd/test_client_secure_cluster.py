"""The client library against a secure cluster (issue 13): a real etcd, coordinators serving TLS with
bearer tokens and a mutual-TLS port, and an agent, all from LocalCluster(secure=True).

What a library user sees: a token works, no token or a bad one is Unauthenticated, a role or an
ownership that does not allow a call is PermissionDenied naming the rule, a user certificate works
on the mutual-TLS port, tokens can be made, listed (never their secret) and revoked, the audit
log reads back, and the asyncio client does the same. No error message holds a token.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpulease import errors
from gpulease.client import Client, ClientConfig, TLSConfig, WhoAmI
from gpulease.client.aio import AsyncClient
from gpulease.common.identity import Kind, Role
from gpulease.dev.cluster import Child, LocalCluster
from tests.support import harness

NODE = "sec-node"
RULE = re.compile(r"rule '(\w+)'")


@pytest.fixture
def cluster(etcd: harness.Etcd, prefix: str, tmp_path: Path) -> Iterator[LocalCluster]:
    local = harness.new_cluster(etcd, prefix, tmp_path, secure=True)
    try:
        local.add_coordinator()
        local.add_agent(NODE, 4)
        local.wait_nodes_up([NODE])
        yield local
    finally:
        local.stop()


@pytest.fixture
def coordinator(cluster: LocalCluster) -> Child:
    return cluster.coordinator(cluster.coordinator_address)


def client(cluster: LocalCluster, token: str | None = None, *, address: str | None = None,
           tls: TLSConfig | None = None, retry_deadline: float | None = None) -> Client:  # fmt: skip
    """A client of the cluster with only the given credential (no token: none at all)."""
    config = ClientConfig.of(
        address or cluster.coordinator_address,
        tls=tls or TLSConfig(str(cluster.ca_file)),
        token=token,
        timeout=10,
        retry_deadline=retry_deadline,
    )
    return Client(config=config, handle_sigterm=False)


def rule_of(err: errors.GpuLeaseError) -> str:
    """The rule a PermissionDenied names ("rule 'use': ...")."""
    found = RULE.search(err.message)
    assert found, f"no rule named in {err.message!r}"
    return found.group(1)


def refusal(cls: type[errors.GpuLeaseError], call: object, *secrets: str) -> errors.GpuLeaseError:
    """The error ``call()`` raises, of exactly ``cls``; it holds none of ``secrets``."""
    assert callable(call)
    with pytest.raises(errors.GpuLeaseError) as info:
        call()
    err = info.value
    assert type(err) is cls, f"{type(err).__name__}: {err}"
    for secret in secrets:
        assert secret not in str(err) and secret not in repr(err)
    return err


def test_allocate_and_release_with_the_admin_token(cluster: LocalCluster) -> None:
    with cluster.client() as admin:
        me = admin.whoami()
        assert (me.role, me.method) == ("admin", "token") and me.principal.startswith("user:")
        with admin.allocate(gpus=2, ttl="30s", owner="secure-test") as alloc:
            assert alloc.node == NODE and len(alloc.gpus) == 2
            assert alloc.principal == me.principal and alloc.tenant == me.tenant
            assert alloc.to_dict()["principal"] == me.principal
            [listed] = admin.list_allocations()
            assert listed.id == alloc.id and listed.principal == me.principal
        assert admin.list_allocations() == []
        assert admin.cluster_summary().totals.gpus_free == 4


def test_no_token_is_unauthenticated(cluster: LocalCluster) -> None:
    with client(cluster) as anonymous:
        err = refusal(errors.Unauthenticated, anonymous.whoami)
        assert "token" in err.message  # says what to give
        refusal(errors.Unauthenticated, lambda: anonymous.allocate(gpus=1))
        refusal(errors.Unauthenticated, anonymous.list_nodes)


def test_a_bad_token_is_unauthenticated_and_never_quoted(cluster: LocalCluster) -> None:
    admin_token = cluster.admin_token()
    bad = "gpl_" + "x" * 43
    almost = admin_token[:-1] + ("A" if admin_token[-1] != "A" else "B")  # one character off the real one
    for token in (bad, almost):
        with client(cluster, token) as c:
            refusal(errors.Unauthenticated, c.whoami, token, admin_token)
            refusal(errors.Unauthenticated, functools.partial(c.allocate, gpus=1), token, admin_token)


def test_a_viewer_reads_but_may_not_allocate_and_is_told_the_rule(cluster: LocalCluster) -> None:
    with cluster.client() as admin:
        secret, info = admin.create_token("viewer-1", Role.VIEWER)
    assert (info.name, info.role) == ("viewer-1", "viewer")
    with client(cluster, secret) as viewer:
        assert viewer.whoami().role == "viewer"
        assert [n.name for n in viewer.list_nodes()] == [NODE]
        err = refusal(errors.PermissionDenied, lambda: viewer.allocate(gpus=1, ttl="30s"), secret)
        assert rule_of(err) == "use"
        assert "viewer" in err.message
        err = refusal(errors.PermissionDenied, viewer.list_tokens, secret)
        assert rule_of(err) == "admin"
        refusal(errors.PermissionDenied, lambda: viewer.delete_node(NODE), secret)
    with cluster.client() as admin:
        assert admin.list_allocations() == []  # the refusal changed nothing


def test_another_users_allocation_is_refused_by_the_owner_rule(cluster: LocalCluster) -> None:
    with cluster.client() as admin:
        alice, _ = admin.create_token("alice", "user")
        bob, _ = admin.create_token("bob", "user")
    with client(cluster, alice) as a, client(cluster, bob) as b:
        alloc = a.allocate(gpus=1, ttl="30s")
        assert alloc.principal == "user:alice" and alloc.tenant == "alice"
        err = refusal(errors.PermissionDenied, lambda: b.release(alloc.id), alice, bob)
        assert rule_of(err) == "owner"
        refusal(errors.PermissionDenied, lambda: b.keep_alive(alloc.id), alice, bob)
        assert a.get_allocation(alloc.id).id == alloc.id  # still hers, still live
        assert a.release(alloc.id) is True


def test_a_user_certificate_works_on_the_mutual_tls_port(cluster: LocalCluster, coordinator: Child) -> None:
    carol = cluster.issue(Kind.USER, "carol", role=Role.USER)
    tls = TLSConfig(str(cluster.ca_file), str(carol.cert), str(carol.key))
    with client(cluster, address=coordinator.mtls_address, tls=tls) as c:
        me = c.whoami()
        assert (me.principal, me.role, me.tenant, me.method) == ("user:carol", "user", "carol", "certificate")
        with c.allocate(gpus=1, ttl="30s") as alloc:
            assert alloc.principal == "user:carol"
            assert c.keep_alive(alloc.id) > 0
        refusal(errors.PermissionDenied, c.list_tokens)
    # The token port does not ask for certificates: there the same client has no credential.
    with client(cluster, tls=tls) as c:
        refusal(errors.Unauthenticated, c.whoami)
    # And the mutual-TLS port refuses a connection without one (the handshake fails).
    with client(cluster, address=coordinator.mtls_address, retry_deadline=0) as c:
        err = refusal(errors.Unavailable, c.whoami)
        assert "--cert and --key" in err.message


def test_tokens_are_made_listed_without_their_secret_and_revoked(cluster: LocalCluster) -> None:
    with cluster.client() as admin:
        admin_principal = admin.whoami().principal
        secret, info = admin.create_token("dave", "user", tenant="team-a", ttl_seconds=3600)
        assert (info.name, info.role, info.tenant, info.created_by) == ("dave", "user", "team-a", admin_principal)
        assert info.expires_unix_ms - info.created_unix_ms == 3600 * 1000
        listed = {t.name: t for t in admin.list_tokens()}
        assert listed["dave"] == info
        assert secret not in repr(admin.list_tokens())
        refusal(errors.AlreadyExists, lambda: admin.create_token("dave", "user"), secret)
        with client(cluster, secret) as dave:
            assert dave.whoami() == WhoAmI("user:dave", "user", "team-a", "token")
            assert admin.revoke_token("dave") is True

            def refused() -> bool:
                try:
                    dave.whoami()
                except errors.Unauthenticated as err:
                    assert secret not in str(err)
                    return True
                return False

            harness.wait_until(refused, 5, "a revoked token refused")
        assert "dave" not in {t.name for t in admin.list_tokens()}
        refusal(errors.NotFound, lambda: admin.revoke_token("dave"))
        refusal(errors.InvalidRequest, lambda: admin.create_token("eve", "superuser"))
        with pytest.raises(errors.InvalidRequest):
            admin.create_token("eve", "user", ttl_seconds=-1)  # refused before anything is sent

        # The audit log has both, by the admin, and nowhere a secret.
        entries = admin.read_audit(actor=admin_principal)
        assert [(e.action, e.target) for e in entries if e.target == "dave"] == [
            ("token-create", "dave"),
            ("token-revoke", "dave"),
        ]
        assert all(e.actor == admin_principal for e in entries)
        assert len(admin.read_audit(limit=1)) == 1
        assert admin.read_audit(since_unix_ms=entries[-1].time_unix_ms + 60_000) == []
        everything = repr(admin.read_audit())
        assert secret not in everything and cluster.admin_token() not in everything


def test_delete_node_is_an_admin_call_that_returns_a_revision(cluster: LocalCluster) -> None:
    with cluster.client() as admin:
        refusal(errors.NodeNotFound, lambda: admin.delete_node("no-such-node"))
        err = refusal(errors.Conflict, lambda: admin.delete_node(NODE))
        assert "up" in err.message
    # The node registers again through a coordinator with short node leases, then its agent stops.
    fast = cluster.add_coordinator(node_ttl=3)
    cluster.stop_agent(NODE)
    cluster.add_agent(NODE, 4, coordinator=fast.address)
    cluster.stop_agent(NODE)
    with cluster.client() as admin:
        harness.wait_until(lambda: admin.list_nodes()[0].state == "down", 30, "the node down")
        revision = admin.delete_node(NODE)
        assert isinstance(revision, int) and revision > 0
        assert admin.list_nodes() == []
        [entry] = [e for e in admin.read_audit() if e.action == "node-delete"]
        assert (entry.target, entry.revision) == (NODE, revision)


def test_the_rate_limit_is_rate_limited(cluster: LocalCluster) -> None:
    limited = cluster.add_coordinator(extra_args=["--rate-limit", "1"])
    with cluster.client(targets=[limited.address]) as admin:

        def hammer() -> errors.GpuLeaseError | None:
            for _ in range(50):
                try:
                    admin.whoami()
                except errors.GpuLeaseError as err:
                    return err
            return None

        err = hammer()
        assert type(err) is errors.RateLimited, err
        assert cluster.admin_token() not in str(err)


def test_the_async_client_with_a_token_and_without(cluster: LocalCluster) -> None:
    async def main() -> None:
        async with AsyncClient(config=cluster.client_config()) as admin:
            assert (await admin.whoami()).role == "admin"
            alloc = await admin.allocate(gpus=1, ttl="30s")
            async with alloc:
                assert alloc.principal == (await admin.whoami()).principal
            secret, _ = await admin.create_token("async-viewer", "viewer")
            assert "async-viewer" in {t.name for t in await admin.list_tokens()}
        anonymous = ClientConfig.of(cluster.coordinator_address, tls=TLSConfig(str(cluster.ca_file)), timeout=10)
        async with AsyncClient(config=anonymous) as c:
            with pytest.raises(errors.Unauthenticated):
                await c.whoami()
        viewer = ClientConfig.of(cluster.coordinator_address, tls=TLSConfig(str(cluster.ca_file)), token=secret)
        async with AsyncClient(config=viewer) as c:
            assert (await c.whoami()).principal == "user:async-viewer"
            with pytest.raises(errors.PermissionDenied, match="rule 'use'") as info:
                await c.allocate(gpus=1)
            assert secret not in str(info.value)

    asyncio.run(main())
