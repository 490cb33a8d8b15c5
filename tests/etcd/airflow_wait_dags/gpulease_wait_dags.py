"""DAGs of tests/etcd/test_airflow_wait.py: an allocate task that waits in the coordinator's queue,
in the worker or deferred to the triggerer, then a release teardown. The cluster they run on has
one GPU, which the test holds while the DAG starts. The connection is AIRFLOW_CONN_GPULEASE_DEFAULT,
set by the test."""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import DAG

from gpulease.airflow.operators import GpuAllocateOperator, GpuReleaseOperator

START = pendulum.datetime(2026, 1, 1, tz="UTC")
SMALL: dict[str, Any] = {"gpus": 1, "cpus": 1, "memory": "256MiB", "ttl": 60}


def allocate_release(dag_id: str, **allocate: Any) -> DAG:
    with DAG(dag_id=dag_id, start_date=START, schedule=None, catchup=False, tags=["gpulease-test"]) as dag:
        alloc = GpuAllocateOperator(task_id="allocate", **SMALL, **allocate)
        release = GpuReleaseOperator(task_id="release", allocation=alloc.output)
        alloc >> release
        release.as_teardown(setups=alloc)
    return dag


deferred = allocate_release("gpulease_wait_deferred", wait="2m", max_runtime="10m", priority="high", deferrable=True)
in_worker = allocate_release("gpulease_wait_in_worker", wait="2m", max_runtime="10m", priority="high")
runs_out_deferred = allocate_release("gpulease_wait_runs_out_deferred", wait="3s", deferrable=True)
runs_out_in_worker = allocate_release("gpulease_wait_runs_out_in_worker", wait="3s")
