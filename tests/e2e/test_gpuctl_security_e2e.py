"""gpuctl against a secure cluster (LocalCluster(secure=True): TLS and tokens on the coordinator's
--listen port, mutual TLS on --mtls-listen), as a user runs it: a real subprocess with its
credentials in GPULEASE_CA / GPULEASE_TOKEN_FILE (or the flags), a real coordinator and etcd.

Covers `gpuctl token create|list|revoke`, `whoami`, `audit`, `node delete`, certificate login with
`gpuctl certs issue`, and the exit codes: 3 for UNAUTHENTICATED, 4 for PERMISSION_DENIED with the
reason (naming the rule) on stderr. A token never shows in gpuctl's output but `token create`'s
stdout.
"""

from __future__ import annotations

import os
import re
import stat
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpulease.common.identity import Kind
from gpulease.dev.cluster import LocalCluster
from tests.support import gpuctl as cli
from tests.support import harness
from tests.support import secure as raw
from tests.support.gpuctl import Run

TOKEN_RE = re.compile(r"gpl_[A-Za-z0-9_-]{43}")
EXIT_FAILED, EXIT_UNAUTHENTICATED, EXIT_PERMISSION_DENIED = 1, 3, 4
TOKEN_KEYS = {"name", "role", "tenant", "created_unix_ms", "expires_unix_ms", "created_by"}
AUDIT_KEYS = {"time_unix_ms", "actor", "tenant", "action", "target", "outcome", "revision", "detail"}


@dataclass
class Secure:
    """A secure cluster with one coordinator, and what gpuctl needs to reach it as the admin."""

    cluster: LocalCluster
    tmp: Path
    secrets: list[str]  # every token seen: none may appear where it should not

    @property
    def address(self) -> str:
        return self.cluster.coordinator_address

    @property
    def mtls_address(self) -> str:
        return self.cluster.coordinator(self.address).mtls_address

    def env(self, token_file: Path | None = None) -> dict[str, str]:
        """The environment of a gpuctl run: the cluster's CA and a token file (default: the admin's)."""
        return {
            "GPULEASE_COORDINATOR": self.address,
            "GPULEASE_CA": str(self.cluster.ca_file),
            "GPULEASE_TOKEN_FILE": str(token_file or self.cluster.token_file),
        }

    def gpuctl(self, *args: str, env: Mapping[str, str] | None = None) -> Run:
        """gpuctl ARGS as the admin unless env says otherwise; no traceback, no token on stderr."""
        run = cli.run(args, self.env() if env is None else env)
        assert not TOKEN_RE.search(run.stderr), f"a token on stderr: {run}"
        if args[:2] != ("token", "create"):
            assert not TOKEN_RE.search(run.stdout), f"a token on stdout: {run}"
        return run

    def ok(self, *args: str, env: Mapping[str, str] | None = None) -> Run:
        run = self.gpuctl(*args, env=env)
        assert run.rc == 0, str(run)
        return run

    def refused(self, rc: int, *args: str, env: Mapping[str, str] | None = None) -> Run:
        """A run that must exit rc with one `gpuctl: error:` line first and nothing on stdout."""
        run = self.gpuctl(*args, env=env)
        assert run.rc == rc, str(run)
        assert run.stdout == "", str(run)
        assert run.stderr.startswith("gpuctl: error: "), str(run)
        return run

    def create_token(self, name: str, role: str, *extra: str) -> Path:
        """`gpuctl token create` as the admin; the secret saved as tmp/<name>.token (0600)."""
        run = self.ok("token", "create", name, "--role", role, *extra)
        assert TOKEN_RE.fullmatch(run.stdout.rstrip("\n")) and run.stdout.count("\n") == 1, str(run)
        secret = run.stdout.strip()
        assert f"created token {name}" in run.stderr, str(run)
        self.secrets.append(secret)
        path = self.tmp / f"{name}.token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        return path


@pytest.fixture
def secure(secure_cluster: LocalCluster, tmp_path: Path) -> Iterator[Secure]:
    s = Secure(secure_cluster, tmp_path, [secure_cluster.admin_token()])
    yield s
    # Nothing the coordinator logged holds a token.
    for log in secure_cluster.logs_dir.glob("*.log"):
        text = log.read_text(errors="replace")
        assert not any(secret in text for secret in s.secrets), f"a token in {log}"


def register(s: Secure, node: str, gpus: int = 4, *, address: str | None = None) -> None:
    """Register `node` as its agent would: with the node's agent certificate on the mutual-TLS port."""
    channel = raw.channel(s.cluster, address or s.mtls_address, s.cluster.issue(Kind.AGENT, node))
    try:
        harness.register(harness.AnyService(channel), node, gpus=gpus, cpus=16, memory=64 * harness.GiB)
    finally:
        channel.close()


def test_token_create_list_whoami_and_revoke(secure: Secure) -> None:
    s = secure
    admin = s.ok("whoami", "--json").json()
    assert admin == {"principal": admin["principal"], "role": "admin", "tenant": admin["tenant"], "method": "token"}

    before = time.time()
    viewer = s.create_token("ci-viewer", "viewer", "--expires", "30d")
    assert stat.S_IMODE(viewer.stat().st_mode) == 0o600

    tokens = s.ok("token", "list", "--json").json()
    assert all(set(t) == TOKEN_KEYS for t in tokens), tokens
    [made] = [t for t in tokens if t["name"] == "ci-viewer"]
    assert made["role"] == "viewer" and made["tenant"] == "ci-viewer"
    assert made["created_by"] == admin["principal"]
    expires = made["expires_unix_ms"] / 1000
    assert before + 30 * 86400 - 60 <= expires <= time.time() + 30 * 86400 + 60, made
    table = s.ok("token", "list").stdout.splitlines()
    assert table[0].split() == ["NAME", "ROLE", "TENANT", "CREATED", "EXPIRES", "CREATED_BY"]
    assert any(line.split()[:3] == ["ci-viewer", "viewer", "ci-viewer"] for line in table[1:]), table

    me = s.ok("whoami", "--json", env=s.env(viewer)).json()
    assert me == {"principal": "user:ci-viewer", "role": "viewer", "tenant": "ci-viewer", "method": "token"}
    lines = s.ok("whoami", env=s.env(viewer)).stdout.splitlines()
    assert [line.split(None, 1) for line in lines] == [
        ["principal:", "user:ci-viewer"],
        ["role:", "viewer"],
        ["tenant:", "ci-viewer"],
        ["method:", "token"],
    ]

    assert s.ok("token", "revoke", "ci-viewer").stdout.strip() == (
        "revoked token ci-viewer: it no longer authenticates anyone"
    )
    gone = s.refused(EXIT_UNAUTHENTICATED, "status", env=s.env(viewer))
    assert "not authenticated" in gone.stderr and "revoked" in gone.stderr, str(gone)
    assert all(t["name"] != "ci-viewer" for t in s.ok("token", "list", "--json").json())
    again = s.refused(EXIT_FAILED, "token", "revoke", "ci-viewer")
    assert "no token named 'ci-viewer'" in again.stderr, str(again)


def test_a_viewer_may_look_but_not_allocate_or_run(secure: Secure) -> None:
    s = secure
    register(s, "gpu-a")
    viewer = s.create_token("watcher", "viewer")
    status = s.ok("status", "--json", env=s.env(viewer)).json()
    assert [n["name"] for n in status["nodes"]] == ["gpu-a"]

    for argv in (["allocate", "--gpus", "1"], ["run", "--gpus", "1", "busybox", "true"]):
        run = s.refused(EXIT_PERMISSION_DENIED, *argv, env=s.env(viewer))
        first = run.stderr.splitlines()[0]
        assert first.startswith("gpuctl: error: permission denied: rule 'use': "), str(run)
        assert "needs role user or admin" in first and "viewer" in first, str(run)
    assert s.ok("allocs", "--json").json() == []
    # Admin-only commands name their rule too.
    for argv in (["token", "list"], ["audit"], ["node", "delete", "gpu-a"], ["cordon", "gpu-a"]):
        run = s.refused(EXIT_PERMISSION_DENIED, *argv, env=s.env(viewer))
        assert "permission denied: rule 'admin': " in run.stderr, str(run)


def test_missing_or_bad_credentials_are_unauthenticated(secure: Secure, tmp_path: Path) -> None:
    s = secure
    no_token = {"GPULEASE_COORDINATOR": s.address, "GPULEASE_CA": str(s.cluster.ca_file)}
    run = s.refused(EXIT_UNAUTHENTICATED, "status", env=no_token)
    assert run.stderr.startswith("gpuctl: error: not authenticated: no credentials"), str(run)

    forged = tmp_path / "forged.token"
    forged.write_text("gpl_" + "A" * 43 + "\n")
    forged.chmod(0o600)
    run = s.refused(EXIT_UNAUTHENTICATED, "whoami", env=s.env(forged))
    assert run.stderr.startswith("gpuctl: error: not authenticated: the token is not valid"), str(run)
    assert "A" * 43 not in run.stderr  # the token given is never echoed, even a wrong one

    # A token file others may read is used, with the client library's warning as a gpuctl line.
    loose = tmp_path / "loose.token"
    loose.write_text(s.cluster.token_file.read_text())
    loose.chmod(0o644)
    run = s.ok("whoami", env=s.env(loose))
    assert f"gpuctl: the token file {loose} can be read or changed by other users" in run.stderr, str(run)

    # Settings gpuctl cannot use are a usage error (2) before any call: a token file that is not there.
    run = s.gpuctl("status", env=s.env(tmp_path / "missing.token"))
    assert run.rc == 2 and "missing.token" in run.stderr, str(run)


def test_flags_beat_the_environment(secure: Secure) -> None:
    s = secure
    viewer = s.create_token("v", "viewer")
    flags = ["--token-file", str(s.cluster.token_file), "--ca", str(s.cluster.ca_file)]
    env = {"GPULEASE_COORDINATOR": s.address, "GPULEASE_TOKEN_FILE": str(viewer), "GPULEASE_CA": "/nonexistent"}
    assert s.ok("whoami", "--json", *flags, env=env).json()["role"] == "admin"  # after the command
    assert s.ok(*flags, "whoami", "--json", env=env).json()["role"] == "admin"  # and before it
    # GPULEASE_TOKEN: the token itself in the environment.
    env = {"GPULEASE_COORDINATOR": s.address, "GPULEASE_CA": str(s.cluster.ca_file),
           "GPULEASE_TOKEN": viewer.read_text().strip()}  # fmt: skip
    assert s.ok("whoami", "--json", env=env).json()["principal"] == "user:v"


def test_user_certificate_from_gpuctl_certs_issue(secure: Secure) -> None:
    """`gpuctl certs issue user` with the cluster's CA, then a call on the mutual-TLS port with it."""
    s = secure
    pki_dir = str(s.cluster.pki_dir)
    s.ok("certs", "issue", "user", "carol", "--role", "user", "--tenant", "ml", "--dir", pki_dir, env={})
    cert, key = s.cluster.pki_dir / "user-carol.pem", s.cluster.pki_dir / "user-carol.key"
    env = {"GPULEASE_COORDINATOR": s.mtls_address, "GPULEASE_CA": str(s.cluster.ca_file),
           "GPULEASE_CERT": str(cert), "GPULEASE_KEY": str(key)}  # fmt: skip
    me = s.ok("whoami", "--json", env=env).json()
    assert me == {"principal": "user:carol", "role": "user", "tenant": "ml", "method": "certificate"}
    run = s.refused(EXIT_PERMISSION_DENIED, "token", "list", env=env)
    assert "rule 'admin'" in run.stderr, str(run)


def test_audit_shows_token_creation_and_allocations(secure: Secure) -> None:
    s = secure
    register(s, "gpu-a")
    alice = s.create_token("alice", "user", "--tenant", "ml")
    alloc = s.ok("allocate", "--gpus", "1", "--json", env=s.env(alice)).json()
    s.ok("release", alloc["id"], env=s.env(alice))
    admin = s.ok("whoami", "--json").json()["principal"]

    entries = s.ok("audit", "--json").json()
    assert all(set(e) == AUDIT_KEYS for e in entries), entries
    assert [e["time_unix_ms"] for e in entries] == sorted(e["time_unix_ms"] for e in entries)
    created = [e for e in entries if e["action"] == "token-create" and e["target"] == "alice"]
    assert [(e["actor"], e["outcome"]) for e in created] == [(admin, "ok")], entries
    allocated = [e for e in entries if e["action"] == "allocate"]
    assert [(e["actor"], e["tenant"], e["target"]) for e in allocated] == [("user:alice", "ml", alloc["id"])]
    assert allocated[0]["revision"] > 0
    assert any(e["action"] == "release" and e["target"] == alloc["id"] for e in entries), entries

    mine = s.ok("audit", "--json", "--actor", "user:alice", "--since", "1h").json()
    assert {e["action"] for e in mine} >= {"allocate", "release"}
    assert {e["actor"] for e in mine} == {"user:alice"}
    assert len(s.ok("audit", "--json", "--limit", "1").json()) == 1
    table = s.ok("audit", "--actor", "user:alice").stdout.splitlines()
    assert table[0].split() == ["TIME", "ACTOR", "TENANT", "ACTION", "TARGET", "OUTCOME", "REVISION", "DETAIL"]
    assert any(line.split()[1:5] == ["user:alice", "ml", "allocate", alloc["id"]] for line in table[1:]), table
    # A user may not read the audit log.
    run = s.refused(EXIT_PERMISSION_DENIED, "audit", env=s.env(alice))
    assert "rule 'admin'" in run.stderr, str(run)


def test_node_delete_removes_a_down_unused_node(secure: Secure) -> None:
    s = secure
    # A coordinator with a 2 s node lease: a node nobody heartbeats for goes down quickly.
    quick = s.cluster.add_coordinator(node_ttl=2, heartbeat_interval=1)
    register(s, "gone", address=quick.mtls_address)
    run = s.refused(EXIT_FAILED, "node", "delete", "gone")
    assert "is up" in run.stderr, str(run)

    def state() -> str:
        nodes = {n["name"]: n["state"] for n in s.ok("nodes", "--json").json()}
        return nodes.get("gone", "absent")

    harness.wait_until(lambda: state() != "up", 15, "node gone to go down")
    assert s.ok("node", "delete", "gone", "--json").json()["deleted"] is True
    assert state() == "absent"
    run = s.refused(EXIT_FAILED, "node", "delete", "gone")
    assert "not registered" in run.stderr, str(run)
    entries = s.ok("audit", "--json").json()
    assert any(e["action"] == "node-delete" and e["target"] == "gone" for e in entries), entries


def test_a_clear_text_coordinator_is_not_reached_with_a_token(secure: Secure) -> None:
    """A token never travels in clear text: without a CA, gpuctl refuses to send it (exit 2)."""
    s = secure
    env = {"GPULEASE_COORDINATOR": s.address, "GPULEASE_TOKEN_FILE": str(s.cluster.token_file)}
    run = s.gpuctl("status", env=env)
    assert run.rc == 2 and "TLS" in run.stderr, str(run)
