"""gpuctl quota / priority, and allocate --tenant/--preemptible, with a fake client (no servers);
plus what the client library sends for them (request building and answer conversion)."""

from __future__ import annotations

import asyncio
import inspect
import json
import re
from collections.abc import Callable
from types import TracebackType
from typing import Any

import pytest
from google.protobuf.message import Message

from gpulease.cli.config import CliConfig
from gpulease.cli.main import main
from gpulease.client import (
    AllocatedGpu,
    AllocationInfo,
    Client,
    PriorityClassInfo,
    Quota,
    QuotaInfo,
)
from gpulease.client.aio import AsyncClient
from gpulease.errors import GpuLeaseError, InvalidRequest, NotFound, PermissionDenied, QuotaExceeded
from gpulease.v1 import coordinator_pb2 as pb
from gpulease.v1 import coordinator_pb2_grpc
from gpulease.v1 import types_pb2 as tpb
from tests.support import harness

GiB = 2**30
A100 = "NVIDIA A100-SXM4-80GB"
H100 = "NVIDIA H100 80GB HBM3"

ALLOC = AllocationInfo(
    id="a1b2",
    node="node-0",
    gpus=(AllocatedGpu(0, "GPU-0", A100),),
    cpus=2,
    memory_bytes=16 * GiB,
    ttl_seconds=60,
    revision=42,
    owner="alice",
    request_id="r1",
    created_unix_ms=1,
    node_address="10.0.0.1:50052",
    tenant="team-a",
    preemptible=True,
    priority_class="low",
)
TEAM_A = Quota("team-a", gpus=8, models={A100: 4}, borrow=2, max_lifetime_seconds=86400, weight=2.0)
DEFAULT = Quota("*", gpus=2)
QUOTAS = [
    QuotaInfo("*", DEFAULT, False, 0, {}, 0, 0, 0, 0, 0.0),
    QuotaInfo("team-a", TEAM_A, False, 9, {A100: 5, H100: 4}, 18, 9 * GiB, 1, 2, 12.345),
    QuotaInfo("team-b", Quota("team-b", gpus=2), True, 1, {H100: 1}, 2, GiB, 0, 0, 0.5),
    QuotaInfo("team-c", None, False, 0, {}, 0, 0, 0, 1, 0.0),
]
CLASSES = [
    PriorityClassInfo("high", 100, False, 30, 600),
    PriorityClassInfo("default", 0, True, 30, 0),
    PriorityClassInfo("low", -100, False, 90, 0),
]


class FakeClient:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        # Raised by every call when set: how gpuctl reports a refusal.
        self.fail: GpuLeaseError | None = None

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        pass

    def _call(self, call: str, /, **kwargs: Any) -> None:
        self.calls.append((call, kwargs))
        if self.fail is not None:
            raise self.fail

    def allocate(self, **kwargs: Any) -> AllocationInfo:
        self._call("allocate", **kwargs)
        return ALLOC

    def list_quotas(self) -> list[QuotaInfo]:
        self._call("list_quotas")
        return QUOTAS

    def set_quota(self, tenant: str, **kwargs: Any) -> Quota:
        self._call("set_quota", tenant=tenant, **kwargs)
        return Quota(
            tenant,
            gpus=kwargs["gpus"],
            models=kwargs["models"],
            cpus=kwargs["cpus"],
            memory_bytes=kwargs["memory"],
            borrow=kwargs["borrow"],
            max_lifetime_seconds=kwargs["max_lifetime"] or 0,
            weight=kwargs["weight"],
        )

    def delete_quota(self, tenant: str) -> bool:
        self._call("delete_quota", tenant=tenant)
        return tenant == "team-a"

    def list_priority_classes(self) -> list[PriorityClassInfo]:
        self._call("list_priority_classes")
        return CLASSES

    def set_priority_class(self, name: str, value: int, **kwargs: Any) -> PriorityClassInfo:
        self._call("set_priority_class", name=name, value=value, **kwargs)
        return PriorityClassInfo(name, value, kwargs["default"], kwargs["grace"] or 30, kwargs["min_runtime"] or 0)

    def delete_priority_class(self, name: str) -> bool:
        self._call("delete_priority_class", name=name)
        if name != "urgent":
            raise NotFound(f"no stored priority class {name!r}")
        return True


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    client = FakeClient()
    monkeypatch.setattr(CliConfig, "client", lambda self: client)
    return client


# --- gpuctl quota ----------------------------------------------------------------------------------


def test_quota_set_passes_every_limit_parsed(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["quota", "set", "team-a", "--gpus", "8", "--model", f"{A100}=4", "--model", f"{H100}=2", "--borrow", "2"]
    argv += ["--cpus", "64", "--memory", "64GiB", "--lifetime", "24h", "--weight", "2.5"]
    assert main(argv) == 0
    assert fake.calls == [
        (
            "set_quota",
            {
                "tenant": "team-a",
                "gpus": 8,
                "models": {A100: 4, H100: 2},
                "cpus": 64,
                "memory": 64 * GiB,
                "borrow": 2,
                "max_lifetime": 86400,
                "weight": 2.5,
            },
        )
    ]
    out = capsys.readouterr().out
    assert out == (
        f"set the quota of tenant team-a: 8 GPUs (+2 borrowable), {A100} 4, {H100} 2, 64 CPUs, 64.0GiB memory, "
        "lifetime 1d, weight 2.5\n"
    )


def test_quota_set_leaves_unset_limits_unlimited(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quota", "set", "team-b", "--lifetime", "90m", "--json"]) == 0
    assert fake.calls == [
        ("set_quota", {"tenant": "team-b", "gpus": None, "models": {}, "cpus": None, "memory": None, "borrow": 0,
                       "max_lifetime": 5400, "weight": 0.0}),
    ]  # fmt: skip
    assert json.loads(capsys.readouterr().out) == {
        "tenant": "team-b",
        "gpus": None,
        "models": {},
        "cpus": None,
        "memory_bytes": None,
        "borrow": 0,
        "max_lifetime_seconds": 5400,
        "weight": 0.0,
    }


@pytest.mark.parametrize("which", [["*"], ["--default"]])
def test_the_default_quota_is_tenant_star(
    fake: FakeClient, capsys: pytest.CaptureFixture[str], which: list[str]
) -> None:
    assert main(["quota", "set", *which, "--gpus", "1"]) == 0
    assert fake.calls[0][1]["tenant"] == "*"
    assert capsys.readouterr().out == "set the default quota ('*'): 1 GPU\n"
    assert main(["quota", "delete", *which]) == 0
    assert fake.calls[1] == ("delete_quota", {"tenant": "*"})


@pytest.mark.parametrize("argv", [["quota"], ["quota", "list"], ["--timeout", "3", "quota"]])
def test_quota_alone_or_list_prints_the_table(
    fake: FakeClient, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    assert main(argv) == 0
    assert fake.calls == [("list_quotas", {})]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["TENANT", "GPUS", "MODELS", "BORROWED", "CPUS", "MEMORY", "PENDING", "GPU-HOURS",
                                "LIFETIME", "WEIGHT"]  # fmt: skip
    # Columns are two spaces or more apart; model names hold single spaces.
    rows = [re.split(r"\s{2,}", line) for line in lines[1:]]
    assert rows == [
        ["* (default)", "0/2", "-", "0", "0/-", "0B/-", "0", "0.00", "-", "-"],
        # used/nominal+borrowable, per model too (a model used without a model quota: unlimited).
        ["team-a", "9/8+2", f"{A100} 5/4+2, {H100} 4/-", "1", "18/-", "9.0GiB/-", "2", "12.35", "1d", "2"],
        ["team-b (default quota)", "1/2", f"{H100} 1/-", "0", "2/-", "1.0GiB/-", "0", "0.50", "-", "-"],
        ["team-c", "0/-", "-", "0", "0/-", "0B/-", "1", "0.00", "-", "-"],
    ]


@pytest.mark.parametrize("argv", [["quota", "--json"], ["quota", "list", "--json"], ["quota", "--json", "list"]])
def test_quota_json(fake: FakeClient, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert main(argv) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [t["tenant"] for t in listed] == ["*", "team-a", "team-b", "team-c"]
    team_a = listed[1]
    assert team_a == {
        "tenant": "team-a",
        "quota": {
            "tenant": "team-a",
            "gpus": 8,
            "models": {A100: 4},
            "cpus": None,
            "memory_bytes": None,
            "borrow": 2,
            "max_lifetime_seconds": 86400,
            "weight": 2.0,
        },
        "from_default": False,
        "used_gpus": 9,
        "used_models": {A100: 5, H100: 4},
        "used_cpus": 18,
        "used_memory_bytes": 9 * GiB,
        "borrowed_gpus": 1,
        "pending": 2,
        "fair_share_gpu_hours": 12.345,
    }
    assert listed[2]["from_default"] is True and listed[3]["quota"] is None


def test_quota_delete(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quota", "delete", "team-a"]) == 0
    assert capsys.readouterr().out == "deleted the quota of tenant team-a\n"
    assert main(["quota", "delete", "team-z"]) == 0
    assert capsys.readouterr().out == "the quota of tenant team-z was not set; nothing to do\n"
    assert main(["quota", "delete", "team-z", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"tenant": "team-z", "deleted": False}


# --- gpuctl priority -------------------------------------------------------------------------------


def test_priority_set(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["priority", "set", "urgent", "500", "--default", "--grace", "2m", "--min-runtime", "10m"]) == 0
    assert fake.calls == [
        ("set_priority_class", {"name": "urgent", "value": 500, "default": True, "grace": 120, "min_runtime": 600})
    ]
    assert capsys.readouterr().out == "set priority class urgent (500, the default; grace 2m, min runtime 10m)\n"
    # A negative value is a value, not an option; unset durations are the coordinator's defaults.
    assert main(["priority", "set", "scavenger", "-500", "--json"]) == 0
    assert fake.calls[1] == (
        "set_priority_class",
        {"name": "scavenger", "value": -500, "default": False, "grace": None, "min_runtime": None},
    )
    assert json.loads(capsys.readouterr().out) == {
        "name": "scavenger",
        "value": -500,
        "is_default": False,
        "preemption_grace_seconds": 30,
        "min_runtime_seconds": 0,
    }


@pytest.mark.parametrize("argv", [["priority"], ["priority", "list"]])
def test_priority_list(fake: FakeClient, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "VALUE", "DEFAULT", "GRACE", "MIN-RUNTIME"]
    assert [line.split() for line in lines[1:]] == [
        ["high", "100", "30s", "10m"],
        ["default", "0", "yes", "30s", "-"],
        ["low", "-100", "90s", "-"],
    ]
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[1] == {
        "name": "default",
        "value": 0,
        "is_default": True,
        "preemption_grace_seconds": 30,
        "min_runtime_seconds": 0,
    }


def test_priority_delete(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["priority", "delete", "urgent"]) == 0
    assert capsys.readouterr().out == "deleted priority class urgent\n"
    assert main(["priority", "delete", "high"]) == 1
    assert capsys.readouterr().err == "gpuctl: error: no stored priority class 'high'\n"


# --- usage and refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["quota", "set", "--gpus", "1"], "one of the arguments TENANT --default is required"),
        (["quota", "set", "a", "--default"], "argument --default: not allowed with argument TENANT"),
        (["quota", "delete"], "one of the arguments TENANT --default is required"),
        (["quota", "set", "a", "--model", "A100"], "expected MODEL=N"),
        (["quota", "set", "a", "--model", "A100=x"], "expected MODEL=N with a whole number N"),
        (["quota", "set", "a", "--gpus", "lots"], "argument --gpus: invalid int value: 'lots'"),
        (["quota", "set", "a", "--weight", "heavy"], "argument --weight: invalid float value: 'heavy'"),
        (["quota", "frobnicate"], "invalid choice: 'frobnicate'"),
        (["priority", "set", "high"], "the following arguments are required: VALUE"),
        (["priority", "set", "high", "ten"], "argument VALUE: invalid int value: 'ten'"),
        (["priority", "delete"], "the following arguments are required: NAME"),
    ],
)
def test_usage_errors_exit_2(
    fake: FakeClient, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert fake.calls == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["quota", "set", "a", "--memory", "lots"], "gpuctl: error: --memory: cannot parse size 'lots'"),
        (["quota", "set", "a", "--lifetime", "forever"], "gpuctl: error: --lifetime: cannot parse duration 'forever'"),
        (["priority", "set", "p", "1", "--grace", "soon"], "gpuctl: error: --grace: cannot parse duration 'soon'"),
        (["priority", "set", "p", "1", "--min-runtime", "1w"], "gpuctl: error: --min-runtime: cannot parse duration"),
        (["allocate", "--gpus", "1", "--tenant", "t", "--max-runtime", "x"], "gpuctl: error: --max-runtime"),
    ],
)
def test_bad_sizes_and_durations_are_errors_before_any_call(
    fake: FakeClient, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(message) and captured.out == ""
    assert fake.calls == []


@pytest.mark.parametrize(
    ("error", "code", "prefix"),
    [
        (PermissionDenied("SetQuota needs the admin role"), 4, "gpuctl: error: permission denied: "),
        (InvalidRequest("'Bad Name' is not a valid tenant name"), 1, "gpuctl: error: "),
    ],
)
def test_refusals_keep_their_exit_codes(
    fake: FakeClient, capsys: pytest.CaptureFixture[str], error: GpuLeaseError, code: int, prefix: str
) -> None:
    fake.fail = error
    for argv in (["quota", "set", "a", "--gpus", "1"], ["priority", "set", "p", "1"], ["quota"], ["priority"]):
        assert main(argv) == code
        assert capsys.readouterr().err == f"{prefix}{error.message}\n"


# --- allocate and run with --tenant / --preemptible ------------------------------------------------


def test_allocate_passes_tenant_and_preemptible_only_when_given(
    fake: FakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["allocate", "--gpus", "1", "--tenant", "team-a", "--preemptible", "--priority", "low"]) == 0
    assert main(["allocate", "--gpus", "1"]) == 0
    given, plain = (kwargs for _, kwargs in fake.calls)
    assert given["tenant"] == "team-a" and given["preemptible"] is True and given["priority"] == "low"
    assert "tenant" not in plain and "preemptible" not in plain
    out = capsys.readouterr().out
    assert "tenant team-a, priority class low, preemptible\n" in out
    assert out.count("tenant team-a") == 1  # the plain allocation prints no such line


def test_allocate_over_quota_exits_1_with_the_coordinators_reason(
    fake: FakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.fail = QuotaExceeded("quota: team-a uses 8 of 8 GPUs (asks for 1); wait in the queue")
    assert main(["allocate", "--gpus", "1", "--tenant", "team-a"]) == 1
    captured = capsys.readouterr()
    assert captured.err == "gpuctl: error: quota: team-a uses 8 of 8 GPUs (asks for 1); wait in the queue\n"
    assert captured.out == ""


def test_run_passes_tenant_and_preemptible(fake: FakeClient, capsys: pytest.CaptureFixture[str]) -> None:
    fake.fail = QuotaExceeded("quota: team-a uses 2 of 2 GPUs (asks for 1)")
    assert main(["run", "--gpus", "1", "--tenant", "team-a", "--preemptible", "img", "true"]) == 1
    assert fake.calls[0][1]["tenant"] == "team-a" and fake.calls[0][1]["preemptible"] is True
    assert "gpuctl: error: quota: team-a uses 2 of 2 GPUs" in capsys.readouterr().err


# --- what the client library sends (to a fake coordinator over gRPC) -----------------------------


class Recorder(coordinator_pb2_grpc.CoordinatorServiceServicer, coordinator_pb2_grpc.AdminServiceServicer):
    """Keeps every request; answers as a coordinator would (SetQuota and SetPriorityClass echo)."""

    def __init__(self) -> None:
        self.requests: list[Message] = []

    def Allocate(self, request: pb.AllocateRequest, context: Any) -> pb.AllocateResponse:
        self.requests.append(request)
        alloc = tpb.Allocation(id="a1", node="n1", tenant=request.tenant or "me", preemptible=request.preemptible,
                               priority_class=request.priority_class or "default",
                               max_runtime_seconds=request.max_runtime_seconds)  # fmt: skip
        return pb.AllocateResponse(allocation=alloc)

    def ListQuotas(self, request: pb.ListQuotasRequest, context: Any) -> pb.ListQuotasResponse:
        status = pb.TenantQuotaStatus(tenant="team-b", from_default=True, used_gpus=3, used_models={A100: 3},
                                      used_cpus=6, used_memory_bytes=GiB, borrowed_gpus=1, pending=2,
                                      fair_share_usage=1.5)  # fmt: skip
        status.quota.CopyFrom(pb.Quota(tenant="team-b", gpus=2, borrow=1))
        return pb.ListQuotasResponse(tenants=[status, pb.TenantQuotaStatus(tenant="c")])

    def SetQuota(self, request: pb.SetQuotaRequest, context: Any) -> pb.SetQuotaResponse:
        self.requests.append(request)
        return pb.SetQuotaResponse(quota=request.quota)

    def DeleteQuota(self, request: pb.DeleteQuotaRequest, context: Any) -> pb.DeleteQuotaResponse:
        self.requests.append(request)
        return pb.DeleteQuotaResponse(deleted=request.tenant == "team-a")

    def ListPriorityClasses(
        self, request: pb.ListPriorityClassesRequest, context: Any
    ) -> pb.ListPriorityClassesResponse:
        return pb.ListPriorityClassesResponse(
            classes=[pb.PriorityClass(name="high", value=100, is_default=True, preemption_grace_seconds=30)]
        )

    def SetPriorityClass(self, request: pb.SetPriorityClassRequest, context: Any) -> pb.SetPriorityClassResponse:
        self.requests.append(request)
        c = pb.PriorityClass()
        c.CopyFrom(request.priority_class)
        c.preemption_grace_seconds = c.preemption_grace_seconds or 30
        return pb.SetPriorityClassResponse(priority_class=c)

    def DeletePriorityClass(
        self, request: pb.DeletePriorityClassRequest, context: Any
    ) -> pb.DeletePriorityClassResponse:
        self.requests.append(request)
        return pb.DeletePriorityClassResponse(deleted=True)


@pytest.fixture
def recorder(serve_fake: harness.ServeFake) -> tuple[Recorder, str]:
    fake = Recorder()
    return fake, serve_fake(fake)


def test_allocate_sends_tenant_and_preemptible_only_when_set(recorder: tuple[Recorder, str]) -> None:
    fake, address = recorder
    with Client(address, timeout=5) as client:
        plain = client.allocate(gpus=1)
        named = client.allocate(gpus=1, tenant="team-a", preemptible=True, priority="low", max_runtime="1m")
    sent_plain, sent_named = fake.requests
    assert {f.name for f, _ in sent_plain.ListFields()} == {"gpus", "request_id"}
    assert isinstance(sent_named, pb.AllocateRequest)
    assert (sent_named.tenant, sent_named.preemptible, sent_named.priority_class) == ("team-a", True, "low")
    # The record's new fields read through the handle and its dict.
    assert (plain.tenant, plain.preemptible, plain.priority_class, plain.max_runtime_seconds) == (
        "me", False, "default", 0
    )  # fmt: skip
    assert (named.tenant, named.preemptible, named.priority_class, named.max_runtime_seconds) == (
        "team-a", True, "low", 60
    )  # fmt: skip
    assert named.info.preemptible and named.to_dict()["preemptible"] is True
    assert named.to_dict()["priority_class"] == "low" and named.to_dict()["max_runtime_seconds"] == 60


def test_quota_calls(recorder: tuple[Recorder, str]) -> None:
    fake, address = recorder
    with Client(address, timeout=5) as client:
        made = client.set_quota("team-a", gpus=0, models={A100: 4}, memory="64GiB", borrow=2, max_lifetime="24h",
                                weight=2)  # fmt: skip
        unlimited = client.set_quota("*")
        assert client.delete_quota("team-a") is True and client.delete_quota("nobody") is False
        listed = client.list_quotas()
    assert made == Quota("team-a", gpus=0, models={A100: 4}, memory_bytes=64 * GiB, borrow=2,
                         max_lifetime_seconds=86400, weight=2.0)  # fmt: skip
    assert unlimited == Quota("*")
    q = fake.requests[0].quota  # type: ignore[attr-defined]
    # 0 GPUs is a limit, not "unset"; what was left out is absent (unlimited).
    assert q.HasField("gpus") and q.gpus == 0 and not q.HasField("cpus")
    assert not any(fake.requests[1].quota.HasField(f) for f in ("gpus", "cpus", "memory_bytes"))  # type: ignore[attr-defined]
    assert [r.tenant for r in fake.requests[2:]] == ["team-a", "nobody"]  # type: ignore[attr-defined]
    assert listed == [
        QuotaInfo("team-b", Quota("team-b", gpus=2, borrow=1), True, 3, {A100: 3}, 6, GiB, 1, 2, 1.5),
        QuotaInfo("c", None, False, 0, {}, 0, 0, 0, 0, 0.0),
    ]


def test_priority_class_calls(recorder: tuple[Recorder, str]) -> None:
    fake, address = recorder
    with Client(address, timeout=5) as client:
        made = client.set_priority_class("urgent", 500, default=True, grace="45s", min_runtime="10m")
        bare = client.set_priority_class("scavenger", -5)
        assert client.list_priority_classes() == [PriorityClassInfo("high", 100, True, 30, 0)]
        assert client.delete_priority_class("urgent") is True
    assert made == PriorityClassInfo("urgent", 500, True, 45, 600)
    # Unset durations go as 0: the coordinator's defaults (a 30 s grace; no minimum runtime).
    assert bare == PriorityClassInfo("scavenger", -5, False, 30, 0)
    assert fake.requests[1].priority_class.preemption_grace_seconds == 0  # type: ignore[attr-defined]
    assert fake.requests[2].name == "urgent"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.set_quota("t", memory="lots"), "memory: cannot parse size"),
        (lambda c: c.set_quota("t", max_lifetime="forever"), "cannot parse duration"),
        (lambda c: c.set_quota("t", max_lifetime=-1), "max_lifetime must be 0"),
        (lambda c: c.set_quota("t", gpus=2**40), "invalid request"),
        (lambda c: c.set_priority_class("p", 1, grace=0), "grace must be positive"),
        (lambda c: c.set_priority_class("p", 1, min_runtime=-5), "min_runtime must be 0"),
        (lambda c: c.set_priority_class("p", 2**40), "invalid request"),
    ],
)
def test_bad_arguments_are_refused_before_sending(
    recorder: tuple[Recorder, str], call: Callable[[Client], object], message: str
) -> None:
    fake, address = recorder
    with Client(address, timeout=5) as client, pytest.raises(InvalidRequest, match=message):
        call(client)
    assert fake.requests == []


def test_the_async_client_has_the_same_calls(recorder: tuple[Recorder, str]) -> None:
    _, address = recorder
    names = ["list_quotas", "set_quota", "delete_quota", "list_priority_classes", "set_priority_class",
             "delete_priority_class"]  # fmt: skip
    for name in names:
        assert inspect.signature(getattr(Client, name)) == inspect.signature(getattr(AsyncClient, name)), name
        assert getattr(Client, name).__doc__ == getattr(AsyncClient, name).__doc__, name

    async def calls() -> tuple[object, ...]:
        async with AsyncClient(address, timeout=5) as client:
            alloc = await client.allocate(gpus=1, tenant="team-a", preemptible=True)
            return (
                (alloc.tenant, alloc.preemptible),
                await client.set_quota("team-a", gpus=4, max_lifetime="1h"),
                await client.list_quotas(),
                await client.delete_quota("team-a"),
                await client.set_priority_class("urgent", 500, min_runtime="10m"),
                await client.list_priority_classes(),
                await client.delete_priority_class("urgent"),
            )

    allocated, quota, quotas, deleted, klass, classes, gone = asyncio.run(calls())
    assert allocated == ("team-a", True)
    assert quota == Quota("team-a", gpus=4, max_lifetime_seconds=3600)
    assert [q.tenant for q in quotas] == ["team-b", "c"] and deleted is True  # type: ignore[attr-defined]
    assert klass == PriorityClassInfo("urgent", 500, False, 30, 600)
    assert classes == [PriorityClassInfo("high", 100, True, 30, 0)] and gone is True
