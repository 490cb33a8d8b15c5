"""The Airflow provider waiting in the coordinator's queue (issue 15), for real: real etcd, a real
coordinator and an agent with one simulated GPU, and real Airflow (dag.test(), in a child process:
tests/support/airflow_runner.py) running the DAGs of tests/etcd/airflow_wait_dags/.

- an allocate task that finds the only GPU held waits, deferred to the triggerer (dag.test() runs
  the trigger inline) or in the worker, logs its pending statuses, and gets the GPU once the test
  releases the holder; the XCom is the allocation, the teardown releases it;
- a wait that runs out fails the task with the coordinator's last pending reason;
- the trigger run again after a "triggerer restart" (the first run cancelled) takes over the same
  pending request, with its place ahead of a later request, and gets the allocation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gpulease.client import Allocation, Client
from tests.support import harness
from tests.support.airflow_runner import AirflowRunner

pytestmark = pytest.mark.slow
pytest.importorskip("airflow", reason="apache-airflow is not installed (pip install -e '.[dev]')")

ROOT = Path(__file__).resolve().parents[2]
DAGS = Path(__file__).resolve().parent / "airflow_wait_dags"
NODE = "af-wait-node"
# The first request also waits for `airflow db migrate` and the first dag.test() of the process.
RUN_TIMEOUT_S = 240


@dataclass
class Cluster:
    address: str

    def client(self) -> Client:
        return Client(self.address, timeout=10)

    def conn_env(self) -> dict[str, str]:
        conn = {"conn_type": "gpulease", "host": self.address, "extra": {"timeout": 10}}
        return {"AIRFLOW_CONN_GPULEASE_DEFAULT": json.dumps(conn)}


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AirflowRunner]:
    tmp = tmp_path_factory.mktemp("airflow-wait")
    child = AirflowRunner(home=tmp / "home", log_path=tmp / "runner.log", dags=DAGS)
    child.start()  # `airflow db migrate` runs meanwhile
    try:
        yield child
    finally:
        child.stop()


@pytest.fixture(scope="module")
def cluster(etcd: harness.Etcd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One coordinator and an agent with one simulated GPU (no containers run here)."""
    local = harness.new_cluster(etcd, harness.new_prefix(), tmp_path_factory.mktemp("af-wait-cluster"))
    try:
        coordinator = local.add_coordinator()
        local.add_agent(NODE, 1)
        local.wait_nodes_up([NODE])
        yield Cluster(coordinator.address)
    finally:
        local.stop()


@pytest.fixture
def held(cluster: Cluster) -> Iterator[Allocation]:
    """The cluster's only GPU, held by the test; whatever is left allocated is released after."""
    with cluster.client() as c:
        for a in c.list_allocations():
            c.release(a.id)
        holder = c.allocate(gpus=1, cpus=1, memory="256MiB", ttl="120s", owner="test-holder")
        yield holder
        for a in c.list_allocations():
            c.release(a.id)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as ex:
        yield ex


def start_dag(pool: ThreadPoolExecutor, runner: AirflowRunner, cluster: Cluster, dag_id: str) -> Future[dict[str, Any]]:
    request = {"op": "test", "dag_id": dag_id, "env": cluster.conn_env()}
    return pool.submit(runner.request, request, RUN_TIMEOUT_S)


def finished(run: Future[dict[str, Any]]) -> dict[str, Any]:
    answer = run.result(timeout=RUN_TIMEOUT_S + 10)
    assert answer["ok"], f"{answer.get('error')}\n--- log ---\n{answer.get('log', '')[-6000:]}"
    return answer


def pending_of(client: Client, dag_id: str) -> list[Any]:
    return [p for p in client.list_pending() if p.request_id.startswith(f"af.{dag_id}.allocate.")]


def states(answer: dict[str, Any]) -> dict[str, str]:
    return {task: t["state"] for task, t in answer["tasks"].items()}


def assert_all_free(cluster: Cluster) -> None:
    def free() -> bool:
        with cluster.client() as c:
            return harness.free_gpus(c) == 1 and not c.list_allocations() and not c.list_pending()

    harness.wait_until(free, 15, "the GPU free, no allocation and nothing pending")


@pytest.mark.parametrize("dag_id", ["gpulease_wait_deferred", "gpulease_wait_in_worker"])
def test_allocate_waits_behind_a_held_gpu_and_runs_once_it_is_released(
    runner: AirflowRunner, cluster: Cluster, held: Allocation, pool: ThreadPoolExecutor, dag_id: str
) -> None:
    run = start_dag(pool, runner, cluster, dag_id)
    with cluster.client() as c:
        # The task's request waits in the queue (not failed, not allocated) until the GPU is free.
        harness.wait_until(lambda: pending_of(c, dag_id) or run.done(), RUN_TIMEOUT_S, "the task's request pending")
        assert not run.done(), finished(run)["log"][-6000:]
        [pending] = pending_of(c, dag_id)
        assert pending.priority_class == "high" and pending.max_runtime_seconds == 600
        assert "no node has room for 1 GPU" in pending.reason, pending.reason
        held.release()
    answer = finished(run)
    log = answer["log"]
    assert answer["state"] == "success", log[-6000:]
    assert states(answer) == {"allocate": "success", "release": "success"}
    alloc = answer["xcoms"]["allocate"]["return_value"]
    # The XCom of the path without waiting: the allocation as a dict, made under the task's request id.
    assert alloc["request_id"] == pending.request_id
    assert alloc["node"] == NODE and [g["index"] for g in alloc["gpus"]] == [0]
    assert alloc["owner"] == f"airflow:{dag_id}.allocate" and alloc["ttl_seconds"] == 60
    assert alloc["id"] != held.id
    assert answer["xcoms"]["release"]["return_value"] is True
    # The pending statuses went to the task log, position and reason.
    assert f"request {pending.request_id} pending (position 1" in log
    assert "no node has room for 1 GPU" in log
    if dag_id == "gpulease_wait_deferred":
        # It waited deferred, the trigger run inline by dag.test(), and resumed in execute_complete.
        order = [f"deferring: request {pending.request_id}", "running trigger in line", "resumed: request"]
        positions = [log.index(marker) for marker in order]
        assert positions == sorted(positions), order
    else:
        assert "deferring" not in log and "running trigger in line" not in log
    assert_all_free(cluster)


@pytest.mark.parametrize("dag_id", ["gpulease_wait_runs_out_deferred", "gpulease_wait_runs_out_in_worker"])
def test_a_wait_that_runs_out_fails_the_task_with_the_last_reason(
    runner: AirflowRunner, cluster: Cluster, held: Allocation, pool: ThreadPoolExecutor, dag_id: str
) -> None:
    answer = finished(start_dag(pool, runner, cluster, dag_id))
    log = answer["log"]
    assert answer["state"] == "failed", log[-6000:]
    # A teardown whose setup failed does not run (Airflow): there is nothing to release.
    assert states(answer) == {"allocate": "failed", "release": "upstream_failed"}
    assert "return_value" not in answer["xcoms"].get("allocate", {})
    assert "InsufficientResources" in log
    assert "without being admitted; it was: no node has room for 1 GPU" in log, log[-6000:]
    if dag_id.endswith("_deferred"):
        assert "running trigger in line" in log and "waiting in the queue failed" in log
    # The holder kept its GPU; the failed request left the queue.
    with cluster.client() as c:
        assert [a.id for a in c.list_allocations()] == [held.id]
        assert c.list_pending() == []


# A triggerer restart, as the triggerer does it: the running trigger's task is cancelled, and the
# trigger is made again from its serialized arguments and run (here at once, within queue_ttl).
RESTART_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from gpulease.airflow.triggers import GpuAllocationTrigger
    from gpulease.client import Client

    address, holder_id = sys.argv[1:3]
    request = {"gpus": 1, "cpus": 1, "memory": "256MiB", "ttl": 60, "owner": "airflow:restart.allocate",
               "request_id": "af.restart.allocate.0123", "max_runtime": None, "priority": ""}

    def until(predicate, what, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")

    def queue(client):
        return [(p.request_id, p.id, p.position) for p in client.list_pending()]

    async def main():
        out = {}
        first = GpuAllocationTrigger(gpulease_conn_id="gpulease_default", request=request,
                                     wait_until=time.time() + 60)
        classpath, kwargs = first.serialize()
        with Client(address, timeout=5) as client:
            running = asyncio.create_task(anext(first.run()))
            await asyncio.to_thread(until, lambda: queue(client), "the trigger's request pending")
            # A later request waits behind it.
            behind = asyncio.create_task(asyncio.to_thread(
                client.allocate, gpus=1, cpus=1, memory="256MiB", wait="60s", request_id="behind"))
            out["before"] = await asyncio.to_thread(until, lambda: len(queue(client)) == 2 and queue(client),
                                                    "the later request pending")
            running.cancel()  # the triggerer stops
            await asyncio.gather(running, return_exceptions=True)
            again = GpuAllocationTrigger(**kwargs)  # another triggerer runs it again
            out["classpath"] = classpath
            rerun = asyncio.create_task(anext(again.run()))
            await asyncio.sleep(1.5)
            out["after"] = queue(client)
            client.release(holder_id)
            event = await asyncio.wait_for(rerun, 30)
            out["event"] = event.payload
            out["behind_done"] = behind.done()
            client.release(event.payload["allocation"]["id"])
            out["behind"] = (await asyncio.wait_for(behind, 30)).request_id
            client.release((await behind).id)
        print("RESULT " + json.dumps(out))

    asyncio.run(main())
    """
)


def test_a_restarted_trigger_takes_over_the_same_pending_request_and_its_place(
    cluster: Cluster, held: Allocation, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(cluster.conn_env(), AIRFLOW_HOME=str(tmp_path / "af-home"), PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", RESTART_SCRIPT, cluster.address, held.id],
        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT,
    )  # fmt: skip
    results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and results, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = json.loads(results[-1].removeprefix("RESULT "))
    assert out["classpath"] == "gpulease.airflow.triggers.GpuAllocationTrigger"
    [ours, behind] = out["before"]
    assert ours[0] == "af.restart.allocate.0123" and ours[2] == 1
    assert behind[0] == "behind" and behind[2] == 2
    # After the restart: the same pending request (same id), still first; nothing queued twice.
    assert out["after"] == out["before"]
    assert out["event"]["status"] == "success", out["event"]
    assert out["event"]["allocation"]["request_id"] == "af.restart.allocate.0123"
    assert out["behind_done"] is False  # the later request was not admitted ahead of it
    assert out["behind"] == "behind"
    assert_all_free(cluster)
