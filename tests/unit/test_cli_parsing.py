"""Size/duration parsing and gpuctl's argument handling, with a fake client (no servers)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace, TracebackType
from typing import Any

import pytest

from gpulease.cli.config import CliConfig
from gpulease.cli.devconfig import DevClusterConfig
from gpulease.cli.main import main
from gpulease.client import (
    AllocatedGpu,
    AllocationInfo,
    AuditEntry,
    ClusterSummary,
    Gpu,
    Node,
    NodeSummary,
    TokenInfo,
    WhoAmI,
)
from gpulease.common.units import format_size, parse_duration, parse_size
from gpulease.errors import GpuLeaseError, InvalidRequest, NotFound, PermissionDenied, Unauthenticated


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1024", 1024),
        ("16GiB", 16 * 2**30),
        ("16Gi", 16 * 2**30),
        ("16gib", 16 * 2**30),
        ("512Mi", 512 * 2**20),
        ("1.5GiB", 3 * 2**29),
        ("2G", 2 * 10**9),
        ("500M", 500 * 10**6),
        ("10k", 10_000),
        ("1Ti", 2**40),
        (" 8 GiB ", 8 * 2**30),
        ("0", 0),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "16 GB extra", "-1GiB", "GiB", "1.2.3G", "16X"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(InvalidRequest, match=r"cannot parse size .*e\.g\. 16GiB"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("60s", 60), ("90", 90), ("5m", 300), ("1h", 3600), ("2d", 172800), ("10S", 10), (" 30s ", 30)],
)
def test_parse_duration(text: str, expected: int) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "soon", "1.5s", "-5s", "5 minutes", "1w"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(InvalidRequest, match=r"cannot parse duration .*e\.g\. 60s"):
        parse_duration(text)


def test_format_size() -> None:
    assert format_size(16 * 2**30) == "16.0GiB"
    assert format_size(512) == "512B"


# --- gpuctl with a fake client -------------------------------------------------------------

ALLOC = AllocationInfo(
    id="a1b2",
    node="node-0",
    gpus=(AllocatedGpu(0, "GPU-0", "sim"), AllocatedGpu(1, "GPU-1", "sim")),
    cpus=2,
    memory_bytes=16 * 2**30,
    ttl_seconds=60,
    revision=42,
    owner="alice",
    request_id="r1",
    created_unix_ms=1,
    node_address="10.0.0.1:50052",
)
NODE = Node(
    name="node-0",
    state="up",
    address="10.0.0.1:50052",
    gpus=tuple(Gpu(i, f"GPU-{i}", "NVIDIA H100", 80 * 2**30, True, True, "") for i in range(8)),
    cpus_total=64,
    memory_total_bytes=512 * 2**30,
    labels={"zone": "a"},
    hostname="host0",
    cordoned=False,
    allocated_gpu_indexes=(0, 1),
    cpus_allocated=2,
    memory_allocated_bytes=16 * 2**30,
)
SECRET = "gpl_" + "s" * 43
TOKEN = TokenInfo("ci", "viewer", "ci", 1_700_000_000_000, 1_702_592_000_000, "user:root")
AUDIT = AuditEntry(1_700_000_000_000, "user:alice", "ml", "allocate", "a1b2", "ok", 42, "node=node-0 gpus=2")
SUMMARY = ClusterSummary(
    nodes=(NodeSummary("node-0", "up", 8, 6, 64, 62, 512 * 2**30, 496 * 2**30),),
    totals=NodeSummary("", "", 8, 6, 64, 62, 512 * 2**30, 496 * 2**30),
    revision=7,
)


class FakeClient:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        # Raised by every call when set: how gpuctl reports a refusal.
        self.fail: GpuLeaseError | None = None

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        pass

    def allocate(self, **kwargs: Any) -> AllocationInfo:
        self.calls.append(("allocate", kwargs))
        return ALLOC

    def release(self, allocation_id: str) -> bool:
        self.calls.append(("release", {"allocation_id": allocation_id}))
        return allocation_id == ALLOC.id

    def list_allocations(self, node: str = "", owner: str = "") -> list[AllocationInfo]:
        self.calls.append(("list_allocations", {"node": node, "owner": owner}))
        return [ALLOC]

    def list_nodes(self) -> list[Node]:
        return [NODE]

    def cluster_summary(self) -> ClusterSummary:
        if self.fail is not None:
            raise self.fail
        return SUMMARY

    def whoami(self) -> WhoAmI:
        return WhoAmI("user:alice", "user", "ml", "token")

    def create_token(self, name: str, role: str, *, tenant: str = "", ttl_seconds: int = 0) -> tuple[str, TokenInfo]:
        self.calls.append(("create_token", {"name": name, "role": role, "tenant": tenant, "ttl_seconds": ttl_seconds}))
        return SECRET, TOKEN

    def list_tokens(self) -> list[TokenInfo]:
        return [TOKEN, TokenInfo("root", "admin", "admin", 1_700_000_000_000, 0, "bootstrap")]

    def revoke_token(self, name: str) -> bool:
        self.calls.append(("revoke_token", {"name": name}))
        if name != "ci":
            raise NotFound(f"no token named {name!r}")
        return True

    def read_audit(self, *, since_unix_ms: int = 0, actor: str = "", limit: int = 0) -> list[AuditEntry]:
        self.calls.append(("read_audit", {"since_unix_ms": since_unix_ms, "actor": actor, "limit": limit}))
        return [AUDIT]

    def delete_node(self, name: str) -> int:
        self.calls.append(("delete_node", {"name": name}))
        return 99

    def cordon(self, node: str, cordoned: bool = True) -> Node:
        self.calls.append(("cordon", {"node": node, "cordoned": cordoned}))
        return NODE


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    client = FakeClient()
    monkeypatch.setattr(CliConfig, "client", lambda self: client)
    return client


def test_allocate_passes_parsed_values_and_leaves_ranges_to_the_server(
    fake: FakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["allocate", "--gpus", "-1", "--cpus", "0", "--memory", "16GiB", "--min-gpu-memory", "40G"]
    argv += ["--selector", "zone=a", "--selector", "rack=r1=x", "--ttl", "5m", "--owner", "bob"]
    assert main([*argv, "--request-id", "rid"]) == 0
    assert fake.calls == [
        (
            "allocate",
            {
                "gpus": -1,
                "cpus": 0,
                "memory": 16 * 2**30,
                "gpu_model": "",
                "min_gpu_memory": 40 * 10**9,
                "node_selector": {"zone": "a", "rack": "r1=x"},
                "ttl": 300,
                "owner": "bob",
                "request_id": "rid",
            },
        )
    ]
    out = capsys.readouterr().out
    assert out.startswith("allocated a1b2 on node-0: GPUs 0,1 (2 CPUs, 16.0GiB) ttl 60s revision 42\n")
    assert "gpuctl release a1b2" in out


def test_allocate_json(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["allocate", "--gpus", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "id": "a1b2",
        "node": "node-0",
        "gpus": [{"index": 0, "uuid": "GPU-0"}, {"index": 1, "uuid": "GPU-1"}],
        "cpus": 2,
        "memory_bytes": 16 * 2**30,
        "ttl_seconds": 60,
        "revision": 42,
    }


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--memory", "lots", "gpuctl: error: --memory: cannot parse size 'lots'"),
        ("--min-gpu-memory", "big", "gpuctl: error: --min-gpu-memory: cannot parse size 'big'"),
        ("--ttl", "soon", "gpuctl: error: --ttl: cannot parse duration 'soon'"),
    ],
)
def test_bad_sizes_and_durations_are_errors_not_tracebacks(
    fake: FakeClient, capsys: pytest.CaptureFixture[str], flag: str, value: str, message: str
) -> None:
    assert main(["allocate", "--gpus", "1", flag, value]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(message)
    assert captured.out == "" and fake.calls == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["allocate"], "the following arguments are required: --gpus"),
        (["allocate", "--gpus", "two"], "argument --gpus/--gpus-per-node: invalid int value: 'two'"),
        (["allocate", "--gpus", "1", "--selector", "zone"], "expected KEY=VALUE"),
        (["--timeout", "0", "status"], "argument --timeout: must be positive"),
        (["dev", "--nodes", "0"], "argument --nodes: must be between 1 and 64, got 0"),
        (["dev", "--nodes", "65"], "must be between 1 and 64"),
        (["dev", "--gpus-per-node", "17"], "argument --gpus-per-node: must be between 0 and 16, got 17"),
        (["dev", "--gpus-per-node", "-1"], "must be between 0 and 16"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: COMMAND"),
        (["--coordinator", " , ", "status"], "no coordinator address"),
    ],
)
def test_usage_errors_exit_2(
    fake: FakeClient, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert fake.calls == []


def test_coordinator_from_flag_env_or_default(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[CliConfig] = []

    def record(self: CliConfig) -> FakeClient:
        seen.append(self)
        return FakeClient()

    monkeypatch.setattr(CliConfig, "client", record)
    monkeypatch.delenv("GPULEASE_COORDINATOR", raising=False)
    main(["status"])
    monkeypatch.setenv("GPULEASE_COORDINATOR", "c1:1, c2:2")
    main(["--timeout", "3", "status"])
    main(["status", "--coordinator", "flag:9"])  # also accepted after the command
    assert [(c.targets, c.timeout) for c in seen] == [
        (("127.0.0.1:50051",), 10.0),
        (("c1:1", "c2:2"), 3.0),
        (("flag:9",), 10.0),
    ]


def test_status_table_and_json(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NODE", "STATE", "GPUS", "CPUS", "MEMORY"]
    assert lines[1].split() == ["node-0", "up", "6/8", "62/64", "496.0GiB/512.0GiB"]
    assert lines[2].split() == ["TOTAL", "6/8", "62/64", "496.0GiB/512.0GiB"]

    assert main(["status", "--json"]) == 0
    counters = {
        "gpus_total": 8,
        "gpus_free": 6,
        "cpus_total": 64,
        "cpus_free": 62,
        "memory_total_bytes": 512 * 2**30,
        "memory_free_bytes": 496 * 2**30,
    }
    assert json.loads(capsys.readouterr().out) == {
        "nodes": [{"name": "node-0", "state": "up", **counters}],
        "totals": counters,
    }


def test_nodes_table_and_json(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nodes"]) == 0
    out = capsys.readouterr().out
    assert "8x NVIDIA H100 (simulated)" in out and "zone=a" in out

    assert main(["nodes", "--json"]) == 0
    [node] = json.loads(capsys.readouterr().out)
    assert set(node) == {"name", "state", "address", "gpus", "cpus_total", "memory_total_bytes", "labels"}
    assert node["gpus"][0] == {
        "index": 0,
        "uuid": "GPU-0",
        "model": "NVIDIA H100",
        "memory_total_bytes": 80 * 2**30,
        "healthy": True,
        "simulated": True,
        "foreign_processes": False,
    }


def test_allocs_filters_and_table(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["allocs", "--node", "node-0", "--owner", "alice"]) == 0
    assert fake.calls == [("list_allocations", {"node": "node-0", "owner": "alice"})]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "NODE", "GPUS", "CPUS", "MEMORY", "TTL", "OWNER", "REVISION"]
    assert lines[1].split() == ["a1b2", "node-0", "0,1", "2", "16.0GiB", "60s", "alice", "42"]


def test_release_live_and_gone(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["release", "a1b2"]) == 0
    assert main(["release", "zzz"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "released a1b2",
        "zzz was not live (already released or expired); nothing to do",
    ]


def test_cordon_and_uncordon(fake: FakeClient) -> None:
    assert main(["cordon", "node-0"]) == 0
    assert main(["uncordon", "node-0"]) == 0
    assert fake.calls == [
        ("cordon", {"node": "node-0", "cordoned": True}),
        ("cordon", {"node": "node-0", "cordoned": False}),
    ]


def test_dev_hands_a_config_to_the_dev_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[DevClusterConfig] = []

    def run_dev_cluster(config: DevClusterConfig) -> int:
        received.append(config)
        return 3

    # Stands in for gpulease.dev.ui, which gpuctl imports only when `dev` runs.
    monkeypatch.setitem(sys.modules, "gpulease.dev.ui", SimpleNamespace(run_dev_cluster=run_dev_cluster))
    assert main(["dev"]) == 3
    assert main(["dev", "--nodes", "3", "--gpus-per-node", "0", "--port", "6000", "--data-dir", "/d", "--demo"]) == 3
    assert main(["dev", "--auth", "--data-dir", "/s"]) == 3
    assert received == [
        DevClusterConfig(nodes=2, gpus_per_node=8, port=50051, data_dir=None, demo=False),
        DevClusterConfig(nodes=3, gpus_per_node=0, port=6000, data_dir="/d", demo=True),
        DevClusterConfig(nodes=2, gpus_per_node=8, port=50051, data_dir="/s", demo=False, auth=True),
    ]


# --- security commands and credentials -------------------------------------------------------


def test_token_create_prints_the_secret_alone_on_stdout(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "create", "ci", "--role", "viewer", "--tenant", "t", "--expires", "30d"]) == 0
    assert fake.calls == [("create_token", {"name": "ci", "role": "viewer", "tenant": "t", "ttl_seconds": 30 * 86400})]
    captured = capsys.readouterr()
    assert captured.out == SECRET + "\n"
    assert SECRET not in captured.err
    assert "created token ci (role viewer, tenant ci, expires 2023-12-14T22:13:20Z)" in captured.err
    assert main(["token", "create", "ci", "--role", "admin"]) == 0
    assert fake.calls[-1][1]["ttl_seconds"] == 0  # never expires


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["token", "create", "ci"], "the following arguments are required: --role"),
        (["token", "create", "ci", "--role", "root"], "invalid choice: 'root'"),
        (["token", "create", "ci", "--role", "user", "--json"], "unrecognized arguments: --json"),
        (["token"], "the following arguments are required: COMMAND"),
        (["token", "revoke"], "the following arguments are required: NAME"),
        (["node", "delete"], "the following arguments are required: NODE"),
        (["audit", "--limit", "0"], "argument --limit: must be between"),
    ],
)
def test_security_usage_errors_exit_2(
    fake: FakeClient, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert fake.calls == []


def test_token_create_with_a_bad_duration(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "create", "ci", "--role", "user", "--expires", "soon"]) == 1
    assert capsys.readouterr().err.startswith("gpuctl: error: --expires: cannot parse duration 'soon'")
    assert fake.calls == []


def test_token_list_and_revoke(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["token", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split() for line in lines] == [
        ["NAME", "ROLE", "TENANT", "CREATED", "EXPIRES", "CREATED_BY"],
        ["ci", "viewer", "ci", "2023-11-14T22:13:20Z", "2023-12-14T22:13:20Z", "user:root"],
        ["root", "admin", "admin", "2023-11-14T22:13:20Z", "never", "bootstrap"],
    ]
    assert main(["token", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0] == {
        "name": "ci",
        "role": "viewer",
        "tenant": "ci",
        "created_unix_ms": 1_700_000_000_000,
        "expires_unix_ms": 1_702_592_000_000,
        "created_by": "user:root",
    }
    assert main(["token", "revoke", "ci"]) == 0
    assert capsys.readouterr().out == "revoked token ci: it no longer authenticates anyone\n"
    assert main(["token", "revoke", "nope"]) == 1
    assert capsys.readouterr().err == "gpuctl: error: no token named 'nope'\n"


def test_audit_filters_table_and_json(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    before = time.time()
    assert main(["audit", "--since", "1h", "--actor", "user:alice", "--limit", "5"]) == 0
    [(name, kwargs)] = fake.calls
    assert name == "read_audit" and kwargs["actor"] == "user:alice" and kwargs["limit"] == 5
    assert (before - 3600) * 1000 - 1000 <= kwargs["since_unix_ms"] <= (time.time() - 3600) * 1000 + 1000
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["TIME", "ACTOR", "TENANT", "ACTION", "TARGET", "OUTCOME", "REVISION", "DETAIL"]
    assert lines[1].split() == ["2023-11-14T22:13:20Z", "user:alice", "ml", "allocate", "a1b2", "ok", "42",
                                "node=node-0", "gpus=2"]  # fmt: skip
    assert main(["audit", "--json"]) == 0
    assert fake.calls[-1] == ("read_audit", {"since_unix_ms": 0, "actor": "", "limit": 0})
    assert json.loads(capsys.readouterr().out) == [
        {
            "time_unix_ms": 1_700_000_000_000,
            "actor": "user:alice",
            "tenant": "ml",
            "action": "allocate",
            "target": "a1b2",
            "outcome": "ok",
            "revision": 42,
            "detail": "node=node-0 gpus=2",
        }
    ]


def test_whoami_and_node_delete(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["whoami", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "principal": "user:alice",
        "role": "user",
        "tenant": "ml",
        "method": "token",
    }
    assert main(["node", "delete", "node-0"]) == 0
    assert capsys.readouterr().out == "deleted node node-0 (revision 99)\n"
    assert main(["node", "delete", "node-0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"node": "node-0", "deleted": True, "revision": 99}


@pytest.mark.parametrize(
    ("error", "rc", "line"),
    [
        (Unauthenticated("the token is not valid: unknown, revoked or expired"), 3,
         "gpuctl: error: not authenticated: the token is not valid: unknown, revoked or expired"),
        (PermissionDenied("rule 'use': Allocate needs role user or admin; user:v has role viewer"), 4,
         "gpuctl: error: permission denied: rule 'use': Allocate needs role user or admin; user:v has role viewer"),
        (NotFound("gone"), 1, "gpuctl: error: gone"),
    ],
)  # fmt: skip
def test_refusals_have_their_own_exit_codes(
    fake: FakeClient, capsys: pytest.CaptureFixture[str], error: GpuLeaseError, rc: int, line: str
) -> None:
    fake.fail = error
    assert main(["status"]) == rc
    captured = capsys.readouterr()
    assert captured.err == line + "\n" and captured.out == ""


def write_ca(tmp_path: Path) -> Path:
    from gpulease.common import pki

    pki.init_ca(tmp_path / "pki")
    return tmp_path / "pki" / "ca.pem"


def test_credentials_from_flags_beat_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[CliConfig] = []

    def record(self: CliConfig) -> FakeClient:
        seen.append(self)
        return FakeClient()

    monkeypatch.setattr(CliConfig, "client", record)
    ca = write_ca(tmp_path)
    env_token, flag_token = tmp_path / "env.token", tmp_path / "flag.token"
    for path, text in ((env_token, "gpl_env"), (flag_token, "gpl_flag")):
        path.write_text(text + "\n")
        path.chmod(0o600)
    for name in ("GPULEASE_TOKEN", "GPULEASE_CERT", "GPULEASE_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GPULEASE_CA", str(ca))
    monkeypatch.setenv("GPULEASE_TOKEN_FILE", str(env_token))
    assert main(["status"]) == 0
    assert main(["status", "--token-file", str(flag_token)]) == 0
    assert main(["--ca", str(ca), "--token-file", str(flag_token), "status"]) == 0
    assert [(c.client_config.tls.ca if c.client_config.tls else None, c.client_config.token) for c in seen] == [
        (str(ca), "gpl_env"),
        (str(ca), "gpl_flag"),
        (str(ca), "gpl_flag"),
    ]


def test_unusable_credentials_are_usage_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: FakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("GPULEASE_CA", "GPULEASE_TOKEN", "GPULEASE_TOKEN_FILE", "GPULEASE_CERT", "GPULEASE_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert main(["status", "--token-file", str(tmp_path / "missing.token"), "--ca", "ca.pem"]) == 2
    assert "missing.token" in capsys.readouterr().err
    monkeypatch.setenv("GPULEASE_TOKEN", SECRET)
    assert main(["status"]) == 2  # a token without a CA would travel in clear text
    err = capsys.readouterr().err
    assert "TLS" in err and SECRET not in err
    assert fake.calls == []


def test_no_message_carries_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: FakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("GPULEASE_TOKEN_FILE", raising=False)
    monkeypatch.setenv("GPULEASE_CA", str(write_ca(tmp_path)))
    monkeypatch.setenv("GPULEASE_TOKEN", SECRET)
    fake.fail = Unauthenticated(f"refused {SECRET}")  # as if a server quoted it
    assert main(["status"]) == 3
    assert capsys.readouterr().err == "gpuctl: error: not authenticated: refused <token>\n"
