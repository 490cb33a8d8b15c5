"""Example: allocate GPUs, train in a container on them, always release.

`release` is a teardown of `allocate`: it runs whatever happens to `train`, and a failed `train`
still fails the run (a plain trigger_rule=ALL_DONE release would turn the run green instead).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from gpulease.airflow.operators import GpuAllocateOperator, GpuContainerOperator, GpuReleaseOperator

with DAG(
    dag_id="gpulease_train",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    schedule=None,
    catchup=False,
    tags=["gpulease", "example"],
) as dag:
    allocate = GpuAllocateOperator(task_id="allocate", gpus=2, cpus=8, memory="64GiB", ttl="15m")
    train = GpuContainerOperator(
        task_id="train",
        allocation=allocate.output,
        image="pytorch/pytorch:latest",
        command=["python", "-c", "import torch; print(torch.cuda.device_count())"],
        env={"RUN_ID": "{{ run_id }}"},
    )
    release = GpuReleaseOperator(task_id="release", allocation=allocate.output)
    allocate >> train >> release
    release.as_teardown(setups=allocate)
