"""etcd's own auth: the coordinator logs in with --etcd-user and --etcd-password-file and works with
a user that may touch only its prefix (watch, leases, transactions included); a wrong password
stops it at start with a clear message that never shows the password (issue 13)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from etcd3aio import Etcd3Client
from etcd3aio.auth import PermissionType

from gpulease.coordinator.keys import range_end
from gpulease.dev.cluster import LocalCluster
from gpulease.v1 import coordinator_pb2 as pb
from tests.support import harness

PREFIX = "/authed/"
PASSWORD = "s3cret-Pw-4-gpulease"


async def _enable_auth(url: str) -> None:
    client = Etcd3Client([url.removeprefix("http://")])
    await client.connect()
    try:
        auth = client.auth
        assert auth is not None
        await auth.user_add("root", "rootpw")
        await auth.role_add("root")
        await auth.user_grant_role("root", "root")
        await auth.user_add("gpulease", PASSWORD)
        await auth.role_add("gpulease")
        await auth.role_grant_permission(
            "gpulease", PREFIX.encode(), range_end(PREFIX), perm_type=PermissionType.READWRITE
        )
        await auth.user_grant_role("gpulease", "gpulease")
        await auth.auth_enable()
    finally:
        await client.close()


@pytest.fixture
def authed_etcd(tmp_path: Path) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path / "c", prefix=PREFIX, node_ttl=60, heartbeat_interval=2).start(coordinators=0)
    try:
        asyncio.run(_enable_auth(cluster.etcd_url))
        yield cluster
    finally:
        cluster.stop()


def test_the_coordinator_works_as_a_prefix_scoped_etcd_user(authed_etcd: LocalCluster, tmp_path: Path) -> None:
    secret = tmp_path / "etcd.password"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    c = harness.start_coordinator(authed_etcd, extra=["--etcd-user", "gpulease", "--etcd-password-file", str(secret)])
    try:
        harness.register(c.stub, "n1", gpus=2)
        a = c.stub.Allocate(pb.AllocateRequest(gpus=1, ttl_seconds=30)).allocation
        assert c.stub.KeepAlive(pb.KeepAliveRequest(allocation_id=a.id)).ttl_seconds > 0
        # The view follows the watch (our own stream, with the token): the allocation shows.
        harness.wait_until(lambda: harness.summary(c.stub).totals.gpus_free == 1, 5, "the view to see it")
        assert c.stub.Release(pb.ReleaseRequest(allocation_id=a.id)).released
        harness.wait_until(lambda: harness.summary(c.stub).totals.gpus_free == 2, 5, "the release")
    finally:
        c.channel.close()


def test_a_wrong_password_stops_the_coordinator_with_a_clear_message(authed_etcd: LocalCluster, tmp_path: Path) -> None:
    secret = tmp_path / "etcd.password"
    secret.write_text("not-the-password")
    child = authed_etcd.add_coordinator(extra_args=["--etcd-user", "gpulease", "--etcd-password-file", str(secret)],
                                        wait=False)  # fmt: skip
    assert child.process.popen.wait(20) != 0
    log = child.process.log_tail()
    assert "etcd refused user 'gpulease'" in log and "not-the-password" not in log
