"""The Airflow provider (gpulease.airflow).

Unit tests need no cluster and do not import Airflow here: registration (get_provider_info, the
entry point, Airflow's own schema for it) and the plain helpers (request ids, allocation ids,
connection parsing, log lines).

DAG tests run real Airflow: tests/support/airflow_runner.py, a child process with its own AIRFLOW_HOME,
runs dag.test() on the DAGs in tests/support/airflow_dags/ against a live local cluster (real etcd, a
coordinator, and an agent with 4 simulated GPUs on the test dockerd). Each checks the task
states, the XComs, the task log, and that the cluster's GPUs are all free afterwards.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gpulease import __version__
from gpulease.airflow import get_provider_info
from gpulease.airflow._util import (
    MAX_OWNER,
    ConnectionSettings,
    LineSplitter,
    allocation_id_of,
    owner_for,
    request_id_for,
    settings_from,
    targets_from,
)
from gpulease.client import Client, TLSConfig
from gpulease.coordinator import validation
from gpulease.dev.cluster import LocalCluster
from gpulease.errors import InvalidRequest
from tests.support import harness
from tests.support.airflow_runner import AirflowRunner
from tests.support.dockerd import Dockerd

ROOT = Path(__file__).resolve().parents[2]
HAVE_AIRFLOW = importlib.util.find_spec("airflow") is not None
needs_airflow = pytest.mark.skipif(not HAVE_AIRFLOW, reason="apache-airflow is not installed (pip install -e '.[dev]')")
NODE = "af-node"
GPUS = 4
# The first request also waits for `airflow db migrate` and the first dag.test() of the process.
RUN_TIMEOUT_S = 240
TOKEN = "gpl_not-a-real-token_0123456789"


# --------------------------------------------------------------------------------------------
# Registration


def test_provider_info_declares_the_connection_type_and_modules() -> None:
    info = get_provider_info()
    assert info["package-name"] == "gpulease"
    assert __version__ in info["versions"]
    assert info["connection-types"] == [
        {"connection-type": "gpulease", "hook-class-name": "gpulease.airflow.hooks.GpuLeaseHook"}
    ]
    modules = [m for key in ("operators", "hooks", "triggers") for entry in info[key] for m in entry["python-modules"]]
    assert sorted(modules) == ["gpulease.airflow.hooks", "gpulease.airflow.operators", "gpulease.airflow.triggers"]
    for module in modules:  # found without importing it (that would import Airflow)
        assert importlib.util.find_spec(module) is not None, module
    json.dumps(info)  # plain data


@needs_airflow
def test_provider_info_satisfies_airflows_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    spec = importlib.util.find_spec("airflow")
    assert spec is not None and spec.submodule_search_locations
    schema_path = Path(next(iter(spec.submodule_search_locations))) / "provider_info.schema.json"
    if not schema_path.exists():
        pytest.skip(f"this Airflow has no {schema_path.name}")
    jsonschema.validate(get_provider_info(), json.loads(schema_path.read_text()))


def test_entry_point_is_discoverable() -> None:
    found = [
        ep for ep in importlib.metadata.entry_points(group="apache_airflow_provider") if ep.value.startswith("gpulease")
    ]
    assert found, "no gpulease entry point: is the package installed? (pip install -e . --no-deps)"
    assert [ep.value for ep in found] == ["gpulease.airflow:get_provider_info"]
    assert found[0].load() is get_provider_info


# --------------------------------------------------------------------------------------------
# Helpers


def ti(dag_id: str = "train_dag", run_id: str = "manual__2026-01-01T00:00:00+00:00", task_id: str = "allocate",
       map_index: int = -1, try_number: int = 1) -> SimpleNamespace:  # fmt: skip
    return SimpleNamespace(dag_id=dag_id, run_id=run_id, task_id=task_id, map_index=map_index, try_number=try_number)


def test_request_id_is_the_same_for_every_try_of_a_task() -> None:
    first = request_id_for({"ti": ti(try_number=1)})
    assert request_id_for({"ti": ti(try_number=2)}) == first
    assert request_id_for(ti(try_number=7)) == first  # the task instance alone will do


@pytest.mark.parametrize(
    "other",
    [
        {"dag_id": "other_dag"},
        {"run_id": "manual__2026-01-01T00:00:01+00:00"},
        {"task_id": "allocate2"},
        {"map_index": 0},
    ],
)
def test_request_id_differs_between_task_instances(other: dict[str, Any]) -> None:
    assert request_id_for(ti(**other)) != request_id_for(ti())
    assert request_id_for(ti(), "container") != request_id_for(ti())


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"run_id": "scheduled__2026-01-01T00:00:00+00:00"},
        {"run_id": "a run id with spaces, ünïcödé and / slashes"},
        {"dag_id": "d" * 250, "task_id": "group.t" + "t" * 243, "map_index": 12345},
        {"dag_id": "dag-with.dots_and-dashes", "task_id": "tg.inner_task"},
    ],
)
def test_request_id_is_accepted_by_the_coordinator(fields: dict[str, Any]) -> None:
    rid = request_id_for(ti(**fields))
    assert validation.request_id(rid) == rid
    assert rid.startswith("af.")


def test_request_id_map_index_none_counts_as_unmapped() -> None:
    assert request_id_for(ti(map_index=None)) == request_id_for(ti(map_index=-1))  # type: ignore[arg-type]


def test_owner_fits_the_coordinators_limit() -> None:
    assert owner_for(ti()) == "airflow:train_dag.allocate"
    long = owner_for(ti(dag_id="d" * 250, task_id="t" * 250))
    assert len(long) == MAX_OWNER and validation.owner(long) == long


ALLOC_ID = "1a20806a0433171e2c4c1"


@pytest.mark.parametrize(
    "value",
    [
        {"id": ALLOC_ID, "node": "n", "gpus": []},
        json.dumps({"id": ALLOC_ID, "node": "n"}),
        str({"id": ALLOC_ID, "node": "n", "gpus": [{"index": 0}]}),  # "{{ ti.xcom_pull(...) }}" renders a repr
        ALLOC_ID,
        f"  {ALLOC_ID}\n",
    ],
    ids=["dict", "json", "python-repr", "id", "id-with-whitespace"],
)
def test_allocation_id_of_accepts_what_a_dag_can_pass(value: Any) -> None:
    assert allocation_id_of(value) == ALLOC_ID


@pytest.mark.parametrize("value", [None, "", "   ", "None", {}, {"node": "n"}, {"id": ""}, "{not a dict", 42, []])
def test_allocation_id_of_rejects_anything_else_clearly(value: Any) -> None:
    with pytest.raises(InvalidRequest, match="allocation="):
        allocation_id_of(value)


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("coord", None, ["coord:50051"]),
        ("coord", 6000, ["coord:6000"]),
        ("coord:7000", 6000, ["coord:7000"]),
        ("a:1, b ,c:3", None, ["a:1", "b:50051", "c:3"]),
        ("a,,b,", 5, ["a:5", "b:5"]),
        ("[::1]", None, ["[::1]:50051"]),
        ("[::1]:7000", None, ["[::1]:7000"]),
        ("::1", 6000, ["[::1]:6000"]),
    ],
)
def test_targets_from_connection_host_and_port(host: str, port: int | None, expected: list[str]) -> None:
    assert targets_from(host, port) == expected


@pytest.mark.parametrize("host", ["", " ", " , "])
def test_targets_from_without_a_host_says_so(host: str) -> None:
    with pytest.raises(InvalidRequest, match="no host"):
        targets_from(host, 50051)


def test_settings_from_connection_fields(tmp_path: Path) -> None:
    s = settings_from("a:1,b", 2, {"timeout": "2.5"})
    assert s == ConnectionSettings(targets=("a:1", "b:2"), timeout=2.5)
    assert not s.tls and s.client_config().tls is None
    assert settings_from("h", None, None) == ConnectionSettings(targets=("h:50051",), timeout=10.0)
    assert settings_from("h", None, None, password="") == ConnectionSettings(targets=("h:50051",), timeout=10.0)


def test_the_token_is_the_password_and_the_ca_comes_from_the_extra() -> None:
    s = settings_from("h", None, {"ca": " /etc/ca.pem "}, password=f" {TOKEN}\n")
    assert (s.ca, s.token, s.tls) == ("/etc/ca.pem", TOKEN, True)
    assert TOKEN not in repr(s) and TOKEN not in str(s)
    config = s.client_config()
    assert config.tls == TLSConfig("/etc/ca.pem") and config.token == TOKEN and TOKEN not in repr(config)
    assert settings_from("h", None, {"ca": "/c", "tls": "true"}).tls
    mutual = settings_from("h", None, {"ca": "/c", "cert": "/u.pem", "key": "/u.key"}).client_config()
    assert mutual.tls == TLSConfig("/c", "/u.pem", "/u.key") and mutual.token is None


def test_ca_as_pem_text_goes_to_a_private_file() -> None:
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"
    first = settings_from("h", None, {"ca": pem}).ca
    assert Path(first).read_text() == pem + "\n"
    assert settings_from("h", None, {"ca": "\n" + pem + "\n"}).ca == first  # one file per text
    assert Path(first).parent.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize(
    ("extra", "password", "words"),
    [
        ({}, TOKEN, "no CA"),  # a token never travels in clear text
        ({"tls": False}, TOKEN, "no CA"),
        ({"token": TOKEN, "ca": "/c"}, None, "password field"),  # the extra is the wrong place
        ({"tls": True}, None, "names no CA"),
        ({"ca": "/c", "tls": False}, None, "remove one"),
        ({"cert": "/u.pem", "key": "/u.key"}, None, "no CA"),
        ({"ca": "/c", "cert": "/u.pem"}, None, "--cert and --key"),
        ({"ca": "/c"}, "two words", "spaces"),
        ({"ca": 7}, None, "file path"),
    ],
)
def test_settings_from_refuses_insecure_or_broken_security_without_quoting_the_token(
    extra: dict[str, Any], password: str | None, words: str
) -> None:
    with pytest.raises(InvalidRequest, match=words) as info:
        settings_from("h", None, extra, password=password)
    assert TOKEN not in str(info.value) and "two words" not in str(info.value)


@pytest.mark.parametrize("extra", [{"timeout": 0}, {"timeout": "soon"}, {"timeout": None}, {"tls": "maybe"}])
def test_settings_from_rejects_bad_extras(extra: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        settings_from("h", None, extra)


def test_line_splitter_joins_lines_split_across_chunks() -> None:
    lines = LineSplitter()
    assert lines.feed("stdout", b"gpus=GPU-0,") == []
    assert lines.feed("stderr", b"warn\r\nhalf") == ["warn"]
    assert lines.feed("stdout", b"GPU-1\nnext\n\nlast") == ["gpus=GPU-0,GPU-1", "next", ""]
    assert lines.feed("stdout", "é".encode()[:1]) == []
    assert sorted(lines.flush()) == [("stderr", "half"), ("stdout", "last\ufffd")]
    assert lines.flush() == []


# --------------------------------------------------------------------------------------------
# Real Airflow against a live cluster


@dataclass
class Cluster:
    address: str
    busybox: str

    def client(self) -> Client:
        return Client(self.address, timeout=10)


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AirflowRunner]:
    if not HAVE_AIRFLOW:
        pytest.skip("apache-airflow is not installed (pip install -e '.[dev]')")
    tmp = tmp_path_factory.mktemp("airflow")
    child = AirflowRunner(home=tmp / "home", log_path=tmp / "runner.log")
    child.start()  # `airflow db migrate` runs meanwhile
    try:
        yield child
    finally:
        child.stop()


@pytest.fixture(scope="module")
def cluster(
    etcd: harness.Etcd, dockerd: Dockerd, busybox: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    local = harness.new_cluster(etcd, harness.new_prefix(), tmp_path_factory.mktemp("af-cluster"))
    try:
        coordinator = harness.start_coordinator(local)
        with coordinator.channel:
            dockerd.add_agent(local, NODE, GPUS)
            harness.wait_nodes_up(coordinator.stub, {NODE}, timeout=30)
            yield Cluster(coordinator.address, busybox)
    finally:
        local.stop()


@pytest.fixture
def live(cluster: Cluster) -> Iterator[Cluster]:
    """The cluster, all free before the test; whatever a test leaves allocated is released after it."""
    with cluster.client() as c:
        for a in c.list_allocations():
            c.release(a.id)
    yield cluster
    with cluster.client() as c:
        for a in c.list_allocations():
            c.release(a.id)


def run_dag(runner: AirflowRunner, cluster: Cluster, dag_id: str) -> dict[str, Any]:
    env = {
        "AIRFLOW_CONN_GPULEASE_DEFAULT": json.dumps(
            {"conn_type": "gpulease", "host": cluster.address, "extra": {"timeout": 10}}
        ),
        "GPULEASE_TEST_IMAGE": cluster.busybox,
    }
    answer = runner.request({"op": "test", "dag_id": dag_id, "env": env}, timeout=RUN_TIMEOUT_S)
    assert answer["ok"], f"{answer.get('error')}\n--- log ---\n{answer.get('log', '')[-6000:]}"
    return answer


def states(answer: dict[str, Any]) -> dict[str, tuple[str, int]]:
    return {task: (t["state"], t["try_number"]) for task, t in answer["tasks"].items()}


def container_says(answer: dict[str, Any], key: str) -> list[str]:
    """Values of the KEY=VALUE lines the container printed, from the task log."""
    return re.findall(rf"\[stdout\] {re.escape(key)}=(\S*)", answer["log"])


def assert_all_free(cluster: Cluster) -> None:
    def free() -> bool:
        with cluster.client() as c:
            return c.cluster_summary().totals.gpus_free == GPUS and not c.list_allocations()

    harness.wait_until(free, 15, f"all {GPUS} GPUs free and no allocation left")


def allocation_xcom(answer: dict[str, Any]) -> dict[str, Any]:
    alloc: dict[str, Any] = answer["xcoms"]["allocate"]["return_value"]
    assert alloc["node"] == NODE and len(alloc["gpus"]) == 2
    return alloc


@pytest.mark.slow
def test_success_path_runs_on_the_allocated_gpus_and_frees_them(runner: AirflowRunner, live: Cluster) -> None:
    answer = run_dag(runner, live, "gpulease_test_success")
    assert answer["state"] == "success"
    assert states(answer) == {"allocate": ("success", 1), "train": ("success", 1), "release": ("success", 1)}
    alloc = allocation_xcom(answer)
    assert alloc["request_id"].startswith("af.gpulease_test_success.allocate.")
    assert alloc["owner"] == "airflow:gpulease_test_success.allocate"
    # The container saw exactly the allocated GPUs, and its templated env.
    assert container_says(answer, "gpus") == [",".join(g["uuid"] for g in alloc["gpus"])]
    assert container_says(answer, "run") == [answer["run_id"]]
    assert answer["xcoms"]["train"]["return_value"] == 0
    assert answer["xcoms"]["release"]["return_value"] is True  # it ended the live allocation
    assert_all_free(live)


@pytest.mark.slow
def test_failing_train_fails_the_run_and_the_teardown_still_frees_the_gpus(
    runner: AirflowRunner, live: Cluster
) -> None:
    answer = run_dag(runner, live, "gpulease_test_failing_train")
    assert answer["state"] == "failed"
    assert states(answer) == {"allocate": ("success", 1), "train": ("failed", 1), "release": ("success", 1)}
    alloc = allocation_xcom(answer)
    assert container_says(answer, "gpus") == [",".join(g["uuid"] for g in alloc["gpus"])]
    assert "exited with code 3" in answer["log"]
    assert "return_value" not in answer["xcoms"].get("train", {})
    assert answer["xcoms"]["release"]["return_value"] is True
    assert_all_free(live)


@pytest.mark.slow
def test_retried_allocate_gets_back_the_allocation_of_its_first_try(runner: AirflowRunner, live: Cluster) -> None:
    answer = run_dag(runner, live, "gpulease_test_retried_allocate")
    assert answer["state"] == "success"
    assert states(answer) == {"allocate": ("success", 2), "train": ("success", 1), "release": ("success", 1)}
    assert answer["tasks"]["allocate"]["earlier_tries"] == [{"try_number": 1, "state": "failed"}]
    first_try = re.findall(r"FIRST-TRY-ALLOCATION (\w+)", answer["log"])
    alloc = allocation_xcom(answer)
    assert first_try == [alloc["id"]], "the retry made a second allocation"
    assert set(re.findall(r"allocated (\w+) on", answer["log"])) == {alloc["id"]}
    assert container_says(answer, "gpus") == [",".join(g["uuid"] for g in alloc["gpus"])]
    assert answer["xcoms"]["release"]["return_value"] is True
    assert_all_free(live)


@pytest.mark.slow
def test_container_operator_alone_allocates_runs_and_releases(runner: AirflowRunner, live: Cluster) -> None:
    answer = run_dag(runner, live, "gpulease_test_container_alone")
    assert answer["state"] == "success"
    assert states(answer) == {"train": ("success", 1)}
    assert answer["xcoms"]["train"]["return_value"] == 0
    [alloc_id] = re.findall(r"allocated (\w+) on", answer["log"])
    assert re.search(rf"released {alloc_id}\b", answer["log"])
    [gpus] = container_says(answer, "gpus")
    assert gpus.count("GPU-SIM-") == 2
    assert_all_free(live)


@pytest.mark.slow
def test_container_operator_alone_releases_when_the_container_fails(runner: AirflowRunner, live: Cluster) -> None:
    answer = run_dag(runner, live, "gpulease_test_container_alone_fails")
    assert answer["state"] == "failed"
    assert states(answer) == {"train": ("failed", 1)}
    assert "exited with code 7" in answer["log"]
    [alloc_id] = re.findall(r"allocated (\w+) on", answer["log"])
    assert re.search(rf"released {alloc_id}\b", answer["log"])
    assert_all_free(live)


@pytest.mark.slow
def test_container_operator_retried_after_a_release_allocates_again(runner: AirflowRunner, live: Cluster) -> None:
    """The first try's release left a tombstone on the task's stable request id (issue 17): the retry
    is not refused, it asks under an id of its own."""
    answer = run_dag(runner, live, "gpulease_test_container_alone_retried")
    assert answer["state"] == "success"
    assert states(answer) == {"train": ("success", 2)}
    assert "exited with code 7" in answer["log"] and "second try" in answer["log"]
    assert "the task's request id was released by an earlier try" in answer["log"]
    first, second = re.findall(r"allocated (\w+) on", answer["log"])
    assert first != second
    assert re.search(rf"released {first}\b", answer["log"]) and re.search(rf"released {second}\b", answer["log"])
    assert_all_free(live)


@pytest.mark.slow
def test_container_operator_stops_its_container_and_releases_on_timeout(
    runner: AirflowRunner, live: Cluster, dockerd: Dockerd
) -> None:
    answer = run_dag(runner, live, "gpulease_test_container_alone_timeout")
    assert answer["state"] == "failed"
    assert states(answer) == {"train": ("failed", 1)}
    assert container_says(answer, "started") == ["yes"]
    assert "AirflowTaskTimeout" in answer["log"]
    [alloc_id] = re.findall(r"allocated (\w+) on", answer["log"])
    assert re.search(r"stopped container \w+", answer["log"])
    assert re.search(rf"released {alloc_id}\b", answer["log"])
    docker = dockerd.client()
    try:
        assert docker.api.containers(filters={"label": f"io.gpulease.allocation={alloc_id}"}) == []  # none running
    finally:
        docker.close()
    assert_all_free(live)


@pytest.mark.slow
@pytest.mark.parametrize("dag_id", ["gpulease_test_deferrable", "gpulease_test_container_alone_deferrable"])
def test_deferrable_mode_completes(runner: AirflowRunner, live: Cluster, dag_id: str) -> None:
    answer = run_dag(runner, live, dag_id)
    assert answer["state"] == "success"
    assert answer["tasks"]["train"]["state"] == "success"
    assert all(t["state"] == "success" for t in answer["tasks"].values())
    assert answer["xcoms"]["train"]["return_value"] == 0
    # It waited in the trigger (dag.test() runs it inline), then resumed in execute_complete.
    assert answer["log"].index("deferring: container") < answer["log"].index("resumed: container")
    [gpus] = container_says(answer, "gpus")
    if "allocate" in answer["tasks"]:
        assert gpus == ",".join(g["uuid"] for g in allocation_xcom(answer)["gpus"])
        assert answer["xcoms"]["release"]["return_value"] is True
    else:
        assert gpus.count("GPU-SIM-") == 2
    assert container_says(answer, "run") == [answer["run_id"]]
    assert_all_free(live)


@pytest.mark.slow
def test_releasing_an_allocation_already_gone_is_a_success(runner: AirflowRunner, live: Cluster) -> None:
    answer = run_dag(runner, live, "gpulease_test_release_twice")
    assert answer["state"] == "success"
    assert states(answer) == {"allocate": ("success", 1), "release": ("success", 1), "release_again": ("success", 1)}
    assert answer["xcoms"]["release"]["return_value"] is True
    assert answer["xcoms"]["release_again"]["return_value"] is False
    alloc_id = answer["xcoms"]["allocate"]["return_value"]["id"]
    assert f"{alloc_id} had already ended" in answer["log"]
    assert_all_free(live)


@pytest.mark.slow
def test_example_dag_parses_with_release_as_teardown_of_allocate(runner: AirflowRunner) -> None:
    folder = ROOT / "gpulease" / "airflow" / "example_dags"
    answer = runner.request({"op": "parse", "folder": str(folder)}, timeout=RUN_TIMEOUT_S)
    assert answer["ok"], answer.get("error")
    assert answer["import_errors"] == {}
    tasks = answer["dags"]["gpulease_train"]
    assert tasks["allocate"]["is_setup"] and tasks["allocate"]["type"] == "GpuAllocateOperator"
    assert tasks["release"]["is_teardown"] and tasks["release"]["type"] == "GpuReleaseOperator"
    assert tasks["train"]["upstream"] == ["allocate"]
    assert tasks["release"]["upstream"] == ["allocate", "train"]


@pytest.mark.slow
def test_airflow_discovers_the_provider_and_its_hook(runner: AirflowRunner) -> None:
    answer = runner.request({"op": "providers"}, timeout=RUN_TIMEOUT_S)
    assert answer["ok"], answer.get("error")
    assert answer["provider"] is not None, "Airflow did not find the gpulease provider (is the package installed?)"
    assert answer["provider"]["version"] == __version__
    assert answer["hook"] == {"class": "gpulease.airflow.hooks.GpuLeaseHook", "attr": "gpulease_conn_id"}


# --------------------------------------------------------------------------------------------
# A secure cluster (issue 13): TLS, the token in the connection's password, the CA in its extra.
# These DAGs allocate and release only, so the agent needs no dockerd; the deferrable one runs a
# container, waited for by the trigger with the token, on a secure cluster of its own.

SECURE_NODE = "af-secure-node"


@dataclass
class SecureCluster:
    local: LocalCluster
    address: str
    # name -> secret: a user's and a viewer's token, made by the admin.
    tokens: dict[str, str]

    def client(self) -> Client:
        """The admin's client."""
        return self.local.client(targets=[self.address], timeout=10)


def start_secure(etcd: harness.Etcd, tmp: Path, add_agent: Any) -> SecureCluster:
    local = harness.new_cluster(etcd, harness.new_prefix(), tmp, secure=True)
    coordinator = local.add_coordinator()
    add_agent(local)
    local.wait_nodes_up([SECURE_NODE])
    with local.client() as admin:
        tokens = {
            name: admin.create_token(name, role)[0] for name, role in (("af-user", "user"), ("af-viewer", "viewer"))
        }
    return SecureCluster(local, coordinator.address, tokens)


@pytest.fixture(scope="module")
def secure_cluster(etcd: harness.Etcd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureCluster]:
    tmp = tmp_path_factory.mktemp("af-secure")
    cluster = None
    try:
        cluster = start_secure(etcd, tmp, lambda local: local.add_agent(SECURE_NODE, GPUS))
        yield cluster
    finally:
        if cluster is not None:
            cluster.local.stop()


def run_secure_dag(
    runner: AirflowRunner, cluster: SecureCluster, dag_id: str, token: str, extra: dict[str, Any] | None = None,
    image: str = "",
) -> dict[str, Any]:  # fmt: skip
    conn = {
        "conn_type": "gpulease",
        "host": cluster.address,
        "password": token,
        "extra": {"timeout": 10, "ca": str(cluster.local.ca_file), **(extra or {})},
    }
    env = {"AIRFLOW_CONN_GPULEASE_DEFAULT": json.dumps(conn), "GPULEASE_TEST_IMAGE": image}
    answer = runner.request({"op": "test", "dag_id": dag_id, "env": env}, timeout=RUN_TIMEOUT_S)
    assert answer["ok"], f"{answer.get('error')}\n--- log ---\n{answer.get('log', '')[-6000:]}"
    return answer


def assert_token_hidden(answer: dict[str, Any], *tokens: str) -> None:
    """No token in the task logs, the XComs or anything else the run answered; nor a masked one
    (Airflow's masker writes *** for a secret it knows: nothing should have tried)."""
    everything = json.dumps(answer, default=str)
    for token in tokens:
        assert token not in everything, "a token reached the task log, an XCom or the run's answer"
    assert "***" not in answer["log"], "something logged a masked secret"


def assert_secure_free(cluster: SecureCluster) -> None:
    def free() -> bool:
        with cluster.client() as c:
            return not c.list_allocations()

    harness.wait_until(free, 15, "no allocation left")


@pytest.mark.slow
@pytest.mark.parametrize("ca_as", ["path", "pem"])
def test_secure_connection_allocates_and_releases_and_the_token_stays_hidden(
    runner: AirflowRunner, secure_cluster: SecureCluster, ca_as: str
) -> None:
    token = secure_cluster.tokens["af-user"]
    extra = {"ca": secure_cluster.local.ca_file.read_text()} if ca_as == "pem" else None
    answer = run_secure_dag(runner, secure_cluster, "gpulease_test_release_twice", token, extra)
    assert answer["state"] == "success", answer["log"][-4000:]
    assert states(answer) == {"allocate": ("success", 1), "release": ("success", 1), "release_again": ("success", 1)}
    alloc = answer["xcoms"]["allocate"]["return_value"]
    assert (alloc["node"], alloc["principal"], alloc["tenant"]) == (SECURE_NODE, "user:af-user", "af-user")
    assert answer["xcoms"]["release"]["return_value"] is True
    assert_token_hidden(answer, token, secure_cluster.local.admin_token())
    assert_secure_free(secure_cluster)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("who", "error", "words"),
    [
        ("af-viewer", "PermissionDenied", "rule 'use'"),
        ("bad", "Unauthenticated", "not valid"),
        ("no-ca", "InvalidRequest", "no CA"),
    ],
)
def test_secure_connection_refusals_fail_the_task_without_the_token(
    runner: AirflowRunner, secure_cluster: SecureCluster, who: str, error: str, words: str
) -> None:
    token = secure_cluster.tokens.get(who, "gpl_" + "b" * 43)
    extra = {"ca": ""} if who == "no-ca" else None
    answer = run_secure_dag(runner, secure_cluster, "gpulease_test_release_twice", token, extra)
    assert answer["state"] == "failed"
    assert answer["tasks"]["allocate"]["state"] == "failed"
    assert "return_value" not in answer["xcoms"].get("allocate", {})
    assert error in answer["log"] and words in answer["log"]
    assert_token_hidden(answer, token, *secure_cluster.tokens.values(), secure_cluster.local.admin_token())
    assert_secure_free(secure_cluster)


@pytest.fixture(scope="module")
def secure_docker_cluster(
    etcd: harness.Etcd, dockerd: Dockerd, busybox: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SecureCluster]:
    tmp = tmp_path_factory.mktemp("af-secure-docker")
    cluster = None
    try:
        cluster = start_secure(etcd, tmp, lambda local: dockerd.add_agent(local, SECURE_NODE, GPUS))
        yield cluster
    finally:
        if cluster is not None:
            cluster.local.stop()


@pytest.mark.slow
def test_secure_deferrable_container_waits_in_the_trigger_with_the_token(
    runner: AirflowRunner, secure_docker_cluster: SecureCluster, busybox: str
) -> None:
    cluster = secure_docker_cluster
    token = cluster.tokens["af-user"]
    answer = run_secure_dag(runner, cluster, "gpulease_test_deferrable", token, image=busybox)
    assert answer["state"] == "success", answer["log"][-4000:]
    assert all(t["state"] == "success" for t in answer["tasks"].values())
    assert answer["xcoms"]["train"]["return_value"] == 0
    assert answer["log"].index("deferring: container") < answer["log"].index("resumed: container")
    assert container_says(answer, "run") == [answer["run_id"]]
    assert_token_hidden(answer, token, cluster.local.admin_token())
    assert_secure_free(cluster)


@needs_airflow
@pytest.mark.slow
def test_the_hooks_connection_test_says_who_the_coordinator_takes_it_for(
    secure_cluster: SecureCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpulease.airflow.hooks import GpuLeaseHook

    hook = GpuLeaseHook()
    for token, expected in ((secure_cluster.tokens["af-user"], True), ("gpl_" + "b" * 43, False)):
        conn = SimpleNamespace(host=secure_cluster.address, port=None, password=token,
                               extra_dejson={"ca": str(secure_cluster.local.ca_file)})  # fmt: skip
        monkeypatch.setattr(hook, "get_connection", lambda conn_id, conn=conn: conn)
        ok, message = hook.test_connection()
        assert ok is expected, message
        assert token not in message
        if ok:
            assert message.startswith("connected as user:af-user (role user, tenant af-user, by token)")
        else:
            assert message.startswith("Unauthenticated: ")
